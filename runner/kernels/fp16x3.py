"""FP32-accurate matrix products from FP16 tensor cores ("FP16x3"), for the FP32 shadow on GPUs.

A float32 operand is split into two FP16 numbers, x ≈ x_hi + x_lo (11 + 11 significant bits), and
    x·w ≈ x_hi·w_hi + x_hi·w_lo + x_lo·w_hi
is one FP16 GEMM over the three pairs concatenated along K, accumulated and returned in float32
(`torch.mm(..., out_dtype=torch.float32)`). Products of FP16 numbers are exact in the FP32 accumulator,
so what is lost is the rounding of x_lo and w_lo and the dropped x_lo·w_lo term: ~2^-22 relative, like
3xTF32 (runner.kernels.tf32x3) and near FP32's 2^-24, at the FP16 tensor-core rate, twice the TF32 rate.

FP16's range is the catch (max 65504, full precision only above 2^-14), so each row of each operand is
first multiplied by a power of two that puts its largest magnitude in [2^14, 2^15): the scaling is exact,
the products cannot overflow, x_lo stays a normal number for every element within 2^18 of its row's
largest, and the output is scaled back exactly. Smaller elements lose relative precision but add at
most 2^-40 of the row's largest magnitude to the sum.

`dtype=torch.bfloat16` gives BF16x3 instead: 8 + 8 bits (~2^-16 relative), but BF16 has FP32's range, so
no scaling and the split is one pointwise pass.

Plain tensor ops, no global switches: the layers that call it can be torch.compile'd.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from runner.kernels.emulated import EmulatedLinear

# Row maxima are scaled into [2^14, 2^15): products of two stay below 2^30, sums of 2^13 of them far
# below FP32's range, and the largest FP16 value (65504) is never reached.
_TOP_EXPONENT = 15


class SplitWeight(NamedTuple):
    """A float32 weight [out, in] prepared once for `split_linear`."""

    pairs: torch.Tensor  # fp16/bf16 [out, 3*in]: w_hi, w_lo, w_hi (scaled), matching x's hi, hi, lo
    inv_scale: torch.Tensor | None  # float32 [out]: 1 / the power of two each row was scaled by; None for bf16


def row_scale(x: torch.Tensor) -> torch.Tensor:
    """Power of two per row of x [..., K] that puts the row's largest |value| in [2^14, 2^15): float32 [..., 1]."""
    amax = x.abs().amax(dim=-1, keepdim=True)  # [..., 1]
    _, exponent = torch.frexp(amax)  # amax = m * 2^e with 0.5 <= m < 1 (0 -> e = 0)
    return torch.ldexp(torch.ones_like(amax), _TOP_EXPONENT - exponent)  # [..., 1]


# float32 bit masks keeping sign, exponent and the explicit mantissa bits of FP16 (10) or BF16 (7), as int32.
_KEEP_MANTISSA = {torch.float16: -8192, torch.bfloat16: -65536}  # 0xFFFFE000, 0xFFFF0000


def split_half(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """float32 x [..., K] as (hi, lo, scale): x * scale ≈ hi + lo, hi and lo in `dtype`, scale [..., 1]
    (None for bf16, which needs no scaling).

    hi is x * scale with its mantissa truncated to `dtype`'s width by a bit mask, so it is exact in `dtype`
    and lo = x * scale - hi is computed from it exactly. (Not `x.to(dtype).float()`: inside a compiled,
    fused kernel inductor keeps such a value in float32 without rounding it, and lo would come out 0.)
    """
    scale = row_scale(x) if dtype == torch.float16 else None  # [..., 1]
    scaled = x if scale is None else x * scale  # [..., K], exact: a power of two
    hi = (scaled.view(torch.int32) & _KEEP_MANTISSA[dtype]).view(torch.float32)  # [..., K], exact in dtype
    lo = scaled - hi  # [..., K], exact; |lo| < 2^-10 |scaled| for fp16
    return hi.to(dtype), lo.to(dtype), scale


def prepare_weight(weight: torch.Tensor, dtype: torch.dtype = torch.float16) -> SplitWeight:
    """Split a float32 weight [out, in] once: the pairs `split_linear` multiplies x's [hi, hi, lo] with."""
    hi, lo, scale = split_half(weight.float().contiguous(), dtype)  # [out, in] x2, [out, 1]
    return SplitWeight(torch.cat((hi, lo, hi), dim=1).contiguous(), None if scale is None else (1.0 / scale).squeeze(1))


def half_gemm_available() -> bool:
    """Whether this torch has the half GEMM with an FP32 output that FP16x3 needs (`torch.mm`'s out_dtype,
    added in torch 2.8). Asked with two 1x1 CPU tensors: a torch without the argument refuses it (TypeError); one
    with it has no CPU kernel for it (NotImplementedError) or runs it. (On the meta device the same question
    loaded torch's fake-tensor machinery: 1.1 s on the driver's critical path, before the stream starts.)"""
    probe = torch.ones(1, 1, dtype=torch.float16)
    try:
        torch.mm(probe, probe, out_dtype=torch.float32)
    except TypeError:
        return False
    except RuntimeError:  # NotImplementedError included: the overload exists, CPU has no kernel for it
        return True
    return True


def _half_gemm_fp32_out(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b_t.T, fp16/bf16 operands, FP32 accumulation and output (one cuBLAS call on CUDA)."""
    if a.is_cuda:
        return torch.mm(a, b_t.t(), out_dtype=torch.float32)  # [M, N]
    # CPU has no such kernel: the same arithmetic (exact products of half values, FP32 sums) in float32.
    return a.float() @ b_t.float().t()  # [M, N]


def split_linear(
    x: torch.Tensor,  # float32 [..., in]
    weight: SplitWeight,
    bias: torch.Tensor | None,  # float32 [out]
) -> torch.Tensor:
    """x @ weight.T + bias, FP32-accurate, from one half-precision GEMM over K = 3 * in: float32 [..., out]."""
    dtype = weight.pairs.dtype
    hi, lo, scale = split_half(x, dtype)  # [..., in] x2, [..., 1]
    pairs = torch.cat((hi, hi, lo), dim=-1).flatten(0, -2)  # [M, 3*in]: against w_hi, w_lo, w_hi
    out = _half_gemm_fp32_out(pairs, weight.pairs).unflatten(0, x.shape[:-1])  # [..., out], scaled by scale * w_scale
    if scale is not None:
        out = out * (1.0 / scale)  # exact: a power of two per row
    if weight.inv_scale is not None:
        out = out * weight.inv_scale
    return out if bias is None else out + bias


class SplitLinear(EmulatedLinear):
    """Drop-in for F.linear(x, weight, bias): FP16x3 (or BF16x3) for float32 CUDA tensors, F.linear otherwise.

    `weight` may be a `SplitWeight` made by `prepare_weight` (what compiled layers are given), or a float32
    tensor, split on first use and cached by identity (two half copies, 1.5x its float32 size).
    """

    def __init__(self, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.dtype = dtype

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor | SplitWeight, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if isinstance(weight, SplitWeight):
            return split_linear(x, weight, bias)
        return super().__call__(x, weight, bias)

    def split(self, weight: torch.Tensor) -> SplitWeight:
        return prepare_weight(weight, self.dtype)

    def product(self, x: torch.Tensor, split: SplitWeight, bias: torch.Tensor | None) -> torch.Tensor:
        return split_linear(x, split, bias)  # [..., out]
