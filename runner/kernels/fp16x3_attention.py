"""FP32-accurate packed attention from FP16 tensor cores ("FP16x3"), for the FP32 shadow on GPUs.

The shadow's projections already run as FP16x3 (runner.kernels.fp16x3): x ≈ x_hi + x_lo in two FP16 numbers and
x·y ≈ x_hi·y_hi + x_hi·y_lo + x_lo·y_hi with exact products summed in FP32, ~2^-22 relative. Its attention ran
as IEEE FP32 on CUDA cores (PyTorch's memory-efficient kernel over nested tensors): 29 % of a 650M shadow batch
on an H200. This kernel is a flash-attention forward over packed sequences whose two products, q·kᵀ and p·v, are
each three FP16 tensor-core products of the split operands; the softmax runs in FP32 online, as in FlashAttention.

Range: FP16 keeps 11 significant bits only for magnitudes in [2^-14, 65504], so operands are scaled by powers of
two (exact) before they are split, and the products scaled back:
- each q row and each k row (one token, one head) so its largest |value| lies in [2^14, 2^15);
- p, which is in [0, 1] after the running-max subtraction, by 2^14;
- v per column (head, channel), by a power of two from its largest |value| over the batch (`column_scale`):
  p·v sums over tokens, so a per-token scale could not be undone after the product.
Elements far below their row's (or column's) largest lose relative precision, but add at most ~2^-38 of it.

The kernel is written in Triton and defined on first use (Triton is imported only then). Tests run it on the CPU
through Triton's interpreter (TRITON_INTERPRET=1), which evaluates the same program with NumPy.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch

from runner.errors import first_line
from runner.kernels.fp16x3 import row_scale

LOG2_E = math.log2(math.e)


def fp16x3_attention_available(device: torch.device) -> bool:
    """Whether the kernel can run on `device`: CUDA with Triton importable (CPU tests use the interpreter)."""
    return torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None


def fp16x3_attention_problem(device: torch.device, head_dim: int) -> str | None:
    """Run the kernel once on a small packed batch on `device` (at the model's head width, so the compile is the one
    the model reuses) and check it against float64 attention: None when it works, else why not in one line
    (Triton cannot compile here, a GPU it does not support, wrong numbers)."""
    from runner.kernels.attention import varlen_attention

    gen = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 1, 38, 168], dtype=torch.int32)  # lengths 1, 37, 130: partial blocks, a one-token sequence
    q, k, v = torch.randn(3, 168, 2, head_dim, generator=gen).to(device).unbind(0)  # [T, H, hd] each
    scale = head_dim**-0.5
    try:
        out = fp16x3_attention(q, k, v, cu.to(device), 130, scale)  # [T, H, hd]
    except Exception as exc:  # Triton raises many types (compilation, launch, driver): each means "not here"
        return f"{type(exc).__name__}: {first_line(exc)[:200]}"
    truth = varlen_attention(q.double(), k.double(), v.double(), cu, 130, scale, "exact")  # [T, H, hd]
    error = ((out.double() - truth).abs().max() / truth.abs().max()).item()
    return None if error < 1e-5 else f"max relative error {error:.1e} against float64 attention"


def block_sizes(head_dim: int) -> dict[str, int]:
    """Launch configuration for one head width: query and key block rows, warps and pipeline stages.

    Swept on an H200 (scripts/bench_attention.py, benchmarks/results/2026-11-29-nvidia-h200-fp16x3-attention.json):
    128 query rows per program, 64 keys per step, 8 warps and 3 stages were fastest at head widths 64 (ESM-2 650M
    and 3B, DNABERT-S) and 128 (ESM-2 15B), 3-7 % ahead of the next. Wider heads would overflow shared memory.
    """
    if head_dim > 128:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}


def column_scale(v: torch.Tensor) -> torch.Tensor:
    """Power of two per (head, channel) of v [T, H, hd] that puts its largest |value| over all tokens in
    [2^14, 2^15): float32 [H, hd]."""
    # The inf-norm is one reduction pass; v.abs().amax() would first write |v| out (4 ms per 650M batch).
    largest = torch.linalg.vector_norm(v.float(), ord=float("inf"), dim=0)  # [H, hd]
    return row_scale(largest.reshape(-1, 1)).reshape(largest.shape)  # [H, hd]


def _kernel() -> Any:
    """The Triton program (imported on first use: Triton is needed only where this kernel runs)."""
    from runner.kernels import fp16x3_attention_kernel

    return fp16x3_attention_kernel.attention_kernel


def fp16x3_attention(
    q: torch.Tensor,  # float32 [T, H, hd]
    k: torch.Tensor,  # float32 [T, H, hd]
    v: torch.Tensor,  # float32 [T, H, hd]
    cu_seqlens: torch.Tensor,  # int32 [B+1] on q's device
    max_seqlen: int,  # longest sequence, in tokens
    scale: float,  # softmax scale applied to q·k
    slopes: torch.Tensor | None = None,  # float32 [H]: ALiBi bias -slope[h] * |i - j|
    config: dict[str, int] | None = None,  # launch configuration; default `block_sizes(hd)`
) -> torch.Tensor:
    """Block-diagonal softmax attention over packed sequences, FP32-accurate: [T, H, hd] in q's dtype."""
    tokens, heads, head_dim = q.shape
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k and v must have one shape, not {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty(tokens, heads, head_dim, device=q.device, dtype=q.dtype)  # [T, H, hd]
    if tokens == 0:
        return out
    launch = dict(config or block_sizes(head_dim))
    block_m = launch.pop("BLOCK_M")
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)  # [B+1]
    v_scale = column_scale(v)  # [H, hd]
    slopes_arg = v_scale if slopes is None else slopes.to(device=q.device, dtype=torch.float32)  # [H]
    grid = (cu.numel() - 1, _ceil_div(max_seqlen, block_m), heads)  # sequences first: a batch may hold > 65535
    _kernel()[grid](
        q, k, v, out, v_scale, slopes_arg, cu,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale * LOG2_E, head_dim,
        HEAD_DIM=max(16, 1 << (head_dim - 1).bit_length()), BLOCK_M=block_m, ALIBI=slopes is not None,
        **launch,
    )
    return out


def _ceil_div(a: int, b: int) -> int:
    """Ceiling division, for the launch grid."""
    return -(-a // b)
