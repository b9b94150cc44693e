"""Packed attention: the exact path against a dense block-diagonal reference, and isolation of sequences."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from runner.kernels.attention import (
    alibi_slopes,
    available_backends,
    plan_attention,
    select_backend,
    varlen_attention,
)

LENGTHS = [5, 1, 17, 9, 32]


def _packed_qkv(
    lengths: list[int], heads: int = 4, head_dim: int = 16, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q, k, v = (
        torch.randn(total, heads, head_dim, generator=g).to(dtype) for _ in range(3)
    )  # [T, H, hd] each
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)  # [B+1]
    return q, k, v, cu


def _dense_reference(
    q: torch.Tensor,  # [T, H, hd]
    k: torch.Tensor,  # [T, H, hd]
    v: torch.Tensor,  # [T, H, hd]
    cu: torch.Tensor,  # [B+1]
    scale: float,
    slopes: torch.Tensor | None,  # [H]
) -> torch.Tensor:
    """One SDPA over all tokens with an additive mask: -inf across sequences, ALiBi within."""
    total, heads, _ = q.shape
    lengths = (cu[1:] - cu[:-1]).long()  # [B]
    doc = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)  # [T]
    same = doc[:, None] == doc[None, :]  # [T, T]
    bias = torch.zeros(heads, total, total, dtype=torch.float64)  # [H, T, T]
    if slopes is not None:
        idx = torch.arange(total)
        bias = -slopes.double()[:, None, None] * (idx[:, None] - idx[None, :]).abs().double()  # [H, T, T]
    bias = bias.masked_fill(~same, float("-inf"))  # [H, T, T]
    out = F.scaled_dot_product_attention(
        q.double().transpose(0, 1),
        k.double().transpose(0, 1),
        v.double().transpose(0, 1),
        attn_mask=bias,
        scale=scale,
    )  # [H, T, hd]
    return out.transpose(0, 1)  # [T, H, hd]


@pytest.mark.parametrize("alibi", [False, True])
def test_exact_matches_dense_block_diagonal(alibi: bool) -> None:
    q, k, v, cu = _packed_qkv(LENGTHS)
    scale = 1 / math.sqrt(q.shape[-1])
    slopes = alibi_slopes(q.shape[1]) if alibi else None
    out = varlen_attention(q, k, v, cu, max(LENGTHS), scale, "exact", alibi_slopes=slopes)
    ref = _dense_reference(q, k, v, cu, scale, slopes)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alibi", [False, True])
def test_no_cross_sequence_leakage(alibi: bool) -> None:
    q, k, v, cu = _packed_qkv(LENGTHS)
    slopes = alibi_slopes(q.shape[1]) if alibi else None
    base = varlen_attention(q, k, v, cu, max(LENGTHS), 0.25, "exact", alibi_slopes=slopes)
    victim = 2  # perturb every token of sequence 2
    s, e = int(cu[victim]), int(cu[victim + 1])
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[s:e] += 10 * torch.randn(e - s, *t.shape[1:])
    out = varlen_attention(q2, k2, v2, cu, max(LENGTHS), 0.25, "exact", alibi_slopes=slopes)
    assert not torch.allclose(out[s:e], base[s:e])
    assert torch.equal(out[:s], base[:s])
    assert torch.equal(out[e:], base[e:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nested_matches_dense_block_diagonal_and_keeps_sequences_apart(dtype: torch.dtype) -> None:
    q, k, v, cu = _packed_qkv(LENGTHS, dtype=dtype)
    out = varlen_attention(q, k, v, cu, max(LENGTHS), 0.25, "nested")
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), _dense_reference(q, k, v, cu, 0.25, None), atol=1e-5, rtol=1e-5)
    q2 = q.clone()
    q2[int(cu[2]) : int(cu[3])] += 10  # only sequence 2's queries change
    changed = (varlen_attention(q2, k, v, cu, max(LENGTHS), 0.25, "nested") != out).any(dim=(1, 2))  # [T]
    assert changed.nonzero().flatten().tolist() == list(range(int(cu[2]), int(cu[3])))


def test_nested_hands_alibi_to_the_exact_path() -> None:
    q, k, v, cu = _packed_qkv(LENGTHS)
    slopes = alibi_slopes(q.shape[1])
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, max(LENGTHS), 0.25, "nested", alibi_slopes=slopes),
        varlen_attention(q, k, v, cu, max(LENGTHS), 0.25, "exact", alibi_slopes=slopes),
    )


def test_fp32_on_cuda_prefers_nested_then_flex(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")  # selection only: no CUDA needed to ask
    assert available_backends(cuda, alibi=False, dtype=torch.float32, head_dim=64) == ["nested", "flex", "exact"]
    assert available_backends(cuda, alibi=True, dtype=torch.float32, head_dim=64) == ["flex", "exact"]
    # Heads narrower than flex's kernels support (tiny models) keep the nested kernel.
    assert available_backends(cuda, alibi=False, dtype=torch.float32, head_dim=8) == ["nested", "exact"]
    assert "nested" not in available_backends(cuda, alibi=False, dtype=torch.float16)
    assert "flex" not in available_backends(cuda, alibi=False, dtype=torch.float16)

    def old_signature(values, offsets):  # a torch whose jagged tensors cannot be told their max length
        raise AssertionError("not called")

    monkeypatch.setattr(torch.nested, "nested_tensor_from_jagged", old_signature)
    assert available_backends(cuda, alibi=False, dtype=torch.float32, head_dim=8) == ["exact"]
    assert available_backends(cuda, alibi=False, dtype=torch.float32, head_dim=64) == ["flex", "exact"]


def test_flex_with_a_planned_block_mask_matches_dense_block_diagonal() -> None:
    """flex on CPU (inductor's C++ kernel), with and without ALiBi, through the once-per-batch plan that
    the models build; the CUDA run (3xTF32 in float32) is test_gpu_backends_match_reference."""
    q, k, v, cu = _packed_qkv(LENGTHS)
    plan = plan_attention(cu, q.shape[0], "flex", torch.device("cpu"))
    for slopes in (None, alibi_slopes(q.shape[1])):
        out = varlen_attention(q, k, v, cu, max(LENGTHS), 0.25, "flex", alibi_slopes=slopes, plan=plan)
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out.double(), _dense_reference(q, k, v, cu, 0.25, slopes), atol=1e-5, rtol=1e-5)


def test_nested_plan_is_the_int64_offsets() -> None:
    q, k, v, cu = _packed_qkv(LENGTHS)
    plan = plan_attention(cu, q.shape[0], "nested", torch.device("cpu"))
    assert plan.dtype == torch.int64 and plan.tolist() == cu.tolist()
    torch.testing.assert_close(
        varlen_attention(q, k, v, cu, max(LENGTHS), 0.25, "nested", plan=plan),
        varlen_attention(q, k, v, cu, max(LENGTHS), 0.25, "exact"),
    )
    assert plan_attention(cu, q.shape[0], "exact", torch.device("cpu")) is None


def test_alibi_slopes_power_of_two_and_not() -> None:
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8-head slopes, then every other one of the 16-head slopes (2^-0.5, 2^-1.5, ...).
    expected = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(i + 0.5) for i in range(4)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected))
    assert alibi_slopes(1).tolist() == [2.0**-8]


def test_cpu_selects_exact() -> None:
    cpu = torch.device("cpu")
    assert available_backends(cpu, alibi=False) == ["exact"]
    assert select_backend(cpu, alibi=True) == "exact"


def test_half_only_kernel_falls_back_in_fp32() -> None:
    q, k, v, cu = _packed_qkv(LENGTHS)
    # fp32 tensors never reach the fp16/bf16-only kernels: the exact path answers instead.
    out = varlen_attention(q, k, v, cu, max(LENGTHS), 0.25, "torch_varlen")
    torch.testing.assert_close(out, varlen_attention(q, k, v, cu, max(LENGTHS), 0.25, "exact"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        varlen_attention(q, k, v, cu, max(LENGTHS), 0.25, "nope")


def test_exact_bf16_close_to_fp32() -> None:
    q, k, v, cu = _packed_qkv(LENGTHS)
    slopes = alibi_slopes(q.shape[1])
    out = varlen_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cu, max(LENGTHS), 0.25, "exact", slopes)
    ref = _dense_reference(q, k, v, cu, 0.25, slopes)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=5e-2, rtol=5e-2)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("alibi", [False, True])
def test_gpu_backends_match_reference(alibi: bool) -> None:
    device = torch.device("cuda")
    lengths = [130, 1, 257, 64, 500]
    q, k, v, cu = _packed_qkv(lengths, heads=8, head_dim=64)
    slopes = alibi_slopes(8) if alibi else None
    scale = 1 / 8
    ref = _dense_reference(q, k, v, cu, scale, slopes)
    backends = available_backends(device, alibi=alibi, dtype=torch.float16)
    print(f"\nbackends (alibi={alibi}): {backends}")
    for backend in backends:
        out = varlen_attention(
            q.half().to(device),
            k.half().to(device),
            v.half().to(device),
            cu.to(device),
            max(lengths),
            scale,
            backend,
            alibi_slopes=slopes,
        )
        err = (out.double().cpu() - ref).abs().max().item()
        print(f"{backend}: max abs err vs fp64 dense = {err:.2e}")
        assert err < 2e-2, backend
    # FP32 (the shadow): every FP32 kernel must be FP32-accurate, like the per-sequence reference loop;
    # flex runs 3xTF32 here, the others IEEE FP32.
    fp32_backends = available_backends(device, alibi=alibi, dtype=torch.float32, head_dim=64)
    assert ("nested" in fp32_backends) == (not alibi) and "flex" in fp32_backends
    plans = {"flex": plan_attention(cu.to(device), q.shape[0], "flex", device)}
    for backend in fp32_backends:
        out = varlen_attention(q.to(device), k.to(device), v.to(device), cu.to(device), max(lengths), scale,
                               backend, alibi_slopes=slopes, plan=plans.get(backend))
        err = (out.double().cpu() - ref).abs().max().item()
        print(f"{backend} fp32: max abs err vs fp64 dense = {err:.2e}")
        assert err < 1e-5, backend
