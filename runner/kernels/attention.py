"""Variable-length (packed) self-attention with one API over several kernels.

Sequences arrive concatenated: q, k, v are [T, H, hd] and `cu_seqlens` ([B+1], int32) marks where each
sequence starts. Every backend computes bidirectional attention restricted to each sequence's own block
(no padding, no cross-sequence leakage), optionally with an ALiBi bias -slope[h] * |i - j|.

Backends, fastest first:
- "flash_attn": flash-attn 2's `flash_attn_varlen_func` (CUDA, fp16/bf16; supports ALiBi slopes).
- "torch_varlen": `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10, CUDA, fp16/bf16; no ALiBi).
- "flex": `flex_attention` with a document mask and an ALiBi score_mod, compiled once per process (CUDA).
  In float32 its two matmuls run as 3xTF32 on tensor cores (Triton's "tf32x3": ~2^-21 relative, like the
  shadow's FP16x3 projections) instead of IEEE FP32 on CUDA cores.
- "nested": one `scaled_dot_product_attention` call over a jagged nested tensor (CUDA, any dtype, no ALiBi):
  PyTorch's memory-efficient varlen kernel, IEEE FP32 on CUDA cores in float32.
- "fp16x3": runner.kernels.fp16x3_attention, a flash-attention kernel (Triton) whose products are three FP16
  tensor-core products of split operands: FP32-accurate (~2^-22), for the shadow's split maths (CUDA; ALiBi).
  Chosen by `EmbeddingModel.emulate_fp32`, not by `select_backend`: with `--shadow-math ieee` the shadow keeps
  IEEE FP32 attention too.
- "exact": one `scaled_dot_product_attention` call per sequence. Any device, any dtype; the reference.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)  # a child of "runner": actor-side, see runner.driver.console

BACKENDS: tuple[str, ...] = ("flash_attn", "torch_varlen", "flex", "nested", "fp16x3", "exact")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Standard ALiBi head slopes (Press et al.; MosaicBERT's `_get_alibi_head_slopes`): float32 [H].

    For a power of two n the slopes are the geometric sequence 2^(-8/n), 2^(-16/n), ...; otherwise the
    slopes of the nearest lower power of two come first, followed by every other slope of the next one.
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be positive, not {num_heads}")

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))  # == 2^(-8/n)
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        slopes = power_of_two_slopes(num_heads)
    else:
        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two_slopes(closest)
        slopes += power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)  # [H]


def _flash_attn_importable() -> bool:
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except (ImportError, OSError):  # OSError: a wheel built against another CUDA/torch
        return False
    return True


def _torch_varlen_importable() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _flex_importable() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _nested_sdpa_usable() -> bool:
    """Jagged nested tensors that take a known max_seqlen (no device sync per layer to find it)."""
    make = getattr(torch.nested, "nested_tensor_from_jagged", None)
    if make is None:
        return False
    import inspect

    return "max_seqlen" in inspect.signature(make).parameters


FLEX_MIN_HEAD_DIM = 16  # flex_attention's kernels need head_dim >= 16 (tiny test models fall back)
# FP32 varlen kernels on CUDA, in order of preference. Measured in the 650M shadow on an H200 (32k tokens,
# 33 layers): nested 99 ms of GPU time, flex (3xTF32) 118 ms; flex's batch finished sooner on its own (no
# per-layer nested-tensor set-up on the host), but beside the main path only the shadow's GPU time costs.
FP32_PREFERENCE: tuple[str, ...] = ("nested", "flex")


def available_backends(
    device: torch.device, alibi: bool, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> list[str]:
    """Backends usable on `device`, fastest first; "exact" is always last.

    `dtype` (optional) drops the half-precision-only kernels when the model computes in float32;
    `head_dim` (optional) drops flex for heads narrower than it supports.
    """
    device = torch.device(device)
    found: list[str] = []
    if device.type == "cuda":
        half_ok = dtype is None or dtype in _HALF_DTYPES
        if half_ok and _flash_attn_importable():
            found.append("flash_attn")
        if half_ok and not alibi and _torch_varlen_importable():
            found.append("torch_varlen")
        flex_ok = (head_dim is None or head_dim >= FLEX_MIN_HEAD_DIM) and _flex_importable()
        if half_ok:
            # flex is only worth it in half precision when the flash kernels cannot express the bias.
            if alibi and flex_ok:
                found.append("flex")
        else:
            # FP32 (the shadow) has no flash kernel; the per-sequence loop launches ~5 kernels per sequence
            # and layer and ran the 650M FP32 shadow on an H200 at half the speed of its projections.
            # With ALiBi (DNABERT) only flex applies.
            fp32_kernels = {"flex": flex_ok, "nested": not alibi and _nested_sdpa_usable()}
            found += [name for name in FP32_PREFERENCE if fp32_kernels[name]]
    found.append("exact")
    return found


def select_backend(
    device: torch.device, alibi: bool, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> str:
    """The fastest backend for `device` (see `available_backends`), logged on the "runner" logger."""
    backend = available_backends(device, alibi, dtype, head_dim)[0]
    logger.info(
        "attention backend %s (device %s, alibi %s%s)",
        backend,
        torch.device(device),
        alibi,
        f", dtype {dtype}" if dtype is not None else "",
    )
    return backend


def varlen_attention(
    q: torch.Tensor,  # [T, H, hd] queries of all sequences, concatenated
    k: torch.Tensor,  # [T, H, hd]
    v: torch.Tensor,  # [T, H, hd]
    cu_seqlens: torch.Tensor,  # int32 [B+1] sequence offsets; cu_seqlens[-1] == T
    max_seqlen: int,  # longest sequence, in tokens
    scale: float,  # softmax scale applied to q·k
    backend: str,  # one of BACKENDS
    alibi_slopes: torch.Tensor | None = None,  # float32 [H]; bias[h, i, j] = -slope[h] * |i - j|
    plan: Any = None,  # from `plan_attention` for this batch: per-batch state shared by all layers
) -> torch.Tensor:
    """Block-diagonal self-attention over packed sequences: [T, H, hd] in q's dtype."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known: {', '.join(BACKENDS)}")
    if q.dtype not in _HALF_DTYPES and backend in ("flash_attn", "torch_varlen"):
        # These kernels only exist for fp16/bf16: an fp32 reference run falls back to the exact path.
        backend = "exact"
    if alibi_slopes is not None and backend == "torch_varlen":
        raise ValueError("the torch_varlen backend cannot apply ALiBi; use flash_attn, flex or exact")
    if backend == "flash_attn":
        return _flash_attn(q, k, v, cu_seqlens, max_seqlen, scale, alibi_slopes)
    if backend == "torch_varlen":
        return _torch_varlen(q, k, v, cu_seqlens, max_seqlen, scale)
    if backend == "flex":
        return _flex(q, k, v, cu_seqlens, scale, alibi_slopes, plan)
    if backend == "nested" and alibi_slopes is None:
        return _nested(q, k, v, cu_seqlens, max_seqlen, scale, plan)
    if backend == "fp16x3":
        from runner.kernels.fp16x3_attention import fp16x3_attention

        return fp16x3_attention(q, k, v, cu_seqlens, max_seqlen, scale, alibi_slopes)
    return _exact(q, k, v, cu_seqlens, scale, alibi_slopes)


def _flash_attn(
    q: torch.Tensor,  # [T, H, hd]
    k: torch.Tensor,  # [T, H, hd]
    v: torch.Tensor,  # [T, H, hd]
    cu_seqlens: torch.Tensor,  # int32 [B+1]
    max_seqlen: int,
    scale: float,
    slopes: torch.Tensor | None,  # [H]
) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)  # [B+1]
    # flash-attn's non-causal ALiBi is -slope * |i - j| when q and k lengths match, as here.
    slopes32 = None if slopes is None else slopes.to(device=q.device, dtype=torch.float32)  # [H]
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu,
        cu,
        max_seqlen,
        max_seqlen,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=False,
        alibi_slopes=slopes32,
    )  # [T, H, hd]


def _torch_varlen(
    q: torch.Tensor,  # [T, H, hd]
    k: torch.Tensor,  # [T, H, hd]
    v: torch.Tensor,  # [T, H, hd]
    cu_seqlens: torch.Tensor,  # int32 [B+1]
    max_seqlen: int,
    scale: float,
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)  # [B+1]
    # cu/max passed positionally: their keyword names changed between torch 2.10 and 2.13.
    return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale)  # [T, H, hd]


def plan_attention(cu_seqlens: torch.Tensor, total_tokens: int, backend: str, device: torch.device) -> Any:
    """Per-batch attention state to build once and pass to every layer's `varlen_attention`.

    For flex this is the document block mask: built per layer it costs more than the attention itself
    (measured on an H200 at 65k tokens: 42 ms and 40 GiB uncompiled vs a 1.5 ms kernel). For nested, the
    int64 offsets of the jagged tensors. Others need none.
    """
    if backend == "flex":
        return _flex_block_mask(cu_seqlens, total_tokens, torch.device(device))
    if backend == "nested":
        return _nested_offsets(cu_seqlens, torch.device(device))
    return None


@functools.cache
def _compiled_create_block_mask() -> Callable[..., Any]:
    """create_block_mask compiled once per process: uncompiled it materialises a [T, T] mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask, dynamic=True)


def _flex_block_mask(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> Any:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)  # [B]
    document = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=total)  # [T]

    def same_document(b, h, q_idx, kv_idx):  # flex traces these with tensor indices
        return document[q_idx] == document[kv_idx]

    return _compiled_create_block_mask()(same_document, None, None, total, total, device=device)


# Triton's `input_precision` for flex's float32 matmuls (a code literal in inductor's template): three TF32
# products per dot, big*big + big*small + small*big, ~2^-21 relative.
FLEX_FP32_PRECISION = "'tf32x3'"


@functools.cache
def _compiled_flex() -> Callable[..., torch.Tensor]:
    """flex_attention compiled once per process: uncompiled it materialises the full score matrix."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def _flex(
    q: torch.Tensor,  # [T, H, hd]
    k: torch.Tensor,  # [T, H, hd]
    v: torch.Tensor,  # [T, H, hd]
    cu_seqlens: torch.Tensor,  # int32 [B+1]
    scale: float,
    slopes: torch.Tensor | None,  # [H]
    plan: Any = None,  # the block mask from plan_attention
) -> torch.Tensor:
    block_mask = plan if plan is not None else _flex_block_mask(cu_seqlens, q.shape[0], q.device)
    # FP32 on CUDA: 3xTF32 tensor-core products (set explicitly: inductor's default follows the global
    # TF32 switch, which would silently make the shadow's attention a 10-bit-mantissa one).
    kernel_options = {"FLOAT32_PRECISION": FLEX_FP32_PRECISION} if q.is_cuda and q.dtype == torch.float32 else None
    score_mod = None
    if slopes is not None:
        slopes_dev = slopes.to(device=q.device, dtype=torch.float32)  # [H]

        def alibi(score, b, h, q_idx, kv_idx):
            # Within one document the packed distance equals the in-sequence distance.
            return score - slopes_dev[h] * (q_idx - kv_idx).abs()

        score_mod = alibi
    out = _compiled_flex()(
        q.transpose(0, 1).unsqueeze(0),  # [1, H, T, hd]
        k.transpose(0, 1).unsqueeze(0),  # [1, H, T, hd]
        v.transpose(0, 1).unsqueeze(0),  # [1, H, T, hd]
        score_mod=score_mod,
        block_mask=block_mask,
        scale=scale,
        kernel_options=kernel_options,
    )  # [1, H, T, hd]
    return out[0].transpose(0, 1)  # [T, H, hd]


def _nested(
    q: torch.Tensor,  # [T, H, hd]
    k: torch.Tensor,  # [T, H, hd]
    v: torch.Tensor,  # [T, H, hd]
    cu_seqlens: torch.Tensor,  # int32 [B+1]
    max_seqlen: int,
    scale: float,
    plan: torch.Tensor | None = None,  # the offsets from plan_attention
) -> torch.Tensor:
    offsets = plan if plan is not None else _nested_offsets(cu_seqlens, q.device)  # int64 [B+1]

    def jagged(x: torch.Tensor) -> torch.Tensor:  # [T, H, hd] -> [B, H, j, hd], a view of the same memory
        nested = torch.nested.nested_tensor_from_jagged(x, offsets=offsets, max_seqlen=max_seqlen)  # [B, j, H, hd]
        return nested.transpose(1, 2)

    out = F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v), scale=scale)  # [B, H, j, hd]
    return out.transpose(1, 2).values()  # [T, H, hd]


def _nested_offsets(cu_seqlens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Jagged tensors' offsets: cu_seqlens as int64 [B+1] on `device`."""
    return cu_seqlens.to(device=device, dtype=torch.int64)


def _exact(
    q: torch.Tensor,  # [T, H, hd]
    k: torch.Tensor,  # [T, H, hd]
    v: torch.Tensor,  # [T, H, hd]
    cu_seqlens: torch.Tensor,  # int32 [B+1]
    scale: float,
    slopes: torch.Tensor | None,  # [H]
) -> torch.Tensor:
    out = torch.empty_like(q)  # [T, H, hd]
    offsets = cu_seqlens.tolist()
    slopes_dev = None if slopes is None else slopes.to(device=q.device, dtype=torch.float32)  # [H]
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        if end == start:
            continue
        bias = None
        if slopes_dev is not None:
            pos = torch.arange(end - start, device=q.device)  # [L]
            distance = (pos[:, None] - pos[None, :]).abs().to(torch.float32)  # [L, L]
            bias = (-slopes_dev[:, None, None] * distance).to(q.dtype)  # [H, L, L]
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),  # [H, L, hd]
            k[start:end].transpose(0, 1),  # [H, L, hd]
            v[start:end].transpose(0, 1),  # [H, L, hd]
            attn_mask=bias,
            scale=scale,
        ).transpose(0, 1)  # [L, H, hd]
    return out
