"""FP32-accurate matrix products on TF32 tensor cores ("3xTF32"), for the FP32 shadow on GPUs.

On an H200, IEEE FP32 matmuls run on CUDA cores at about 1/15 of the FP16 tensor-core rate, so an FP32
shadow at a 1% sample would cost ~10% of the GPU. TF32 tensor cores run 7x faster than that but keep
only 10 mantissa bits. Splitting each operand into a TF32-exact high part and a remainder,
    x = x_hi + x_lo,  w = w_hi + w_lo,  x·w ≈ x_hi·w_hi + x_hi·w_lo + x_lo·w_hi,
recovers FP32 accuracy (the dropped x_lo·w_lo term and the TF32 rounding of the remainders are ~2^-22
relative, against FP32's 2^-24) from three TF32 products accumulated in FP32. The products alone could
run ~2.5x faster than IEEE FP32 (7.4x the peak rate, three times the work); measured on an H200, the
whole FP32 forward of a 650M-shaped ESM-2 ran 1.3x faster (scripts/bench_shadow_math.py). CUTLASS ships this as its "fast FP32" (OpMultiplyAddFastF32) GEMM; PyTorch's memory-efficient
attention uses it for float32 inputs on sm80+.

TF32 is switched on only around these three products, so no other float32 matmul of the process
(attention included) changes precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from runner.kernels.emulated import EmulatedLinear

# 0xFFFFE000 as an int32: sign, exponent and the top 10 mantissa bits, which is all TF32 keeps.
_TF32_MASK = -8192


def split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 x as hi + lo, exactly: hi has a TF32-exact mantissa (truncated), lo = x - hi (|lo| < 2^-10 |x|)."""
    hi = (x.view(torch.int32) & _TF32_MASK).view(torch.float32)  # same shape as x
    return hi, x - hi


@contextmanager
def tf32_matmuls() -> Iterator[None]:
    """float32 CUDA matmuls on TF32 tensor cores inside the block; the previous setting restored after."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9; mixing it with allow_tf32 is an error there
        before = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision = before
    else:
        before_flag = matmul.allow_tf32
        matmul.allow_tf32 = True
        try:
            yield
        finally:
            matmul.allow_tf32 = before_flag


def tf32x3_linear(
    x: torch.Tensor,  # float32 [..., in]
    w_hi: torch.Tensor,  # float32 [out, in], TF32-exact
    w_lo: torch.Tensor,  # float32 [out, in], weight - w_hi
    bias: torch.Tensor | None,  # float32 [out]
    product: Callable[..., torch.Tensor] = F.linear,  # a TF32 product (tests pass a simulated one)
) -> torch.Tensor:
    """x @ (w_hi + w_lo).T + bias from three products of TF32-exact high parts and their remainders."""
    x_hi, x_lo = split_tf32(x)  # [..., in] each
    small = product(x_lo, w_hi) + product(x_hi, w_lo)  # [..., out]: the correction terms first
    return small + product(x_hi, w_hi, bias)  # [..., out]


class Tf32x3Linear(EmulatedLinear):
    """Drop-in for F.linear(x, weight, bias): 3xTF32 for float32 CUDA tensors, F.linear otherwise (two extra
    float32 copies of each projection weight, the hi and lo parts)."""

    def split(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_tf32(weight.contiguous())  # [out, in] each

    def product(
        self, x: torch.Tensor, split: tuple[torch.Tensor, torch.Tensor], bias: torch.Tensor | None
    ) -> torch.Tensor:
        with tf32_matmuls():
            return tf32x3_linear(x, *split, bias)  # [..., out]
