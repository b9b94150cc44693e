"""FP16x3 / BF16x3: the row scaling is exact and safe, and one GEMM over hi/lo pairs reaches FP32 accuracy.

CPU has no half GEMM with an FP32 output, so `split_linear` runs the same arithmetic there in float32
(products of half values are exact in float32, sums in float32), which is what the tensor cores do.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from runner.kernels.emulated import fp32_linear
from runner.kernels.fp16x3 import (
    SplitLinear,
    SplitWeight,
    half_gemm_available,
    prepare_weight,
    row_scale,
    split_half,
    split_linear,
)


def test_row_scale_is_a_power_of_two_putting_each_row_max_in_range() -> None:
    x = torch.randn(50, 64) * torch.logspace(-30, 30, 50)[:, None]
    x[7] = 0.0  # an all-zero row must not divide by zero
    scale = row_scale(x)  # [50, 1]
    mantissa, _ = torch.frexp(scale)
    assert (mantissa == 0.5).all()  # exact powers of two: scaling loses nothing
    top = (x * scale).abs().amax(dim=1)
    nonzero = torch.arange(50) != 7
    assert ((top[nonzero] >= 2**14) & (top[nonzero] < 2**15)).all()
    assert top[7] == 0


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float16, 2**-21), (torch.bfloat16, 2**-15)])
def test_split_keeps_about_twice_the_half_precision(dtype: torch.dtype, bound: float) -> None:
    x = torch.randn(200, 128, dtype=torch.float64).float() * 1e6  # fp16's range alone would overflow
    hi, lo, scale = split_half(x, dtype)
    assert hi.dtype == dtype and lo.dtype == dtype and torch.isfinite(hi).all()
    assert (scale is None) == (dtype == torch.bfloat16)  # BF16 has FP32's range: nothing to scale
    rebuilt = (hi.double() + lo.double()) / (1.0 if scale is None else scale.double())
    row_max = x.abs().amax(dim=1, keepdim=True).double()
    assert ((rebuilt - x.double()).abs() / row_max).max() <= bound


def _error_vs_float64(out: torch.Tensor, truth: torch.Tensor) -> float:
    return ((out.double() - truth).abs().max() / truth.abs().max()).item()


def test_one_gemm_over_pairs_reaches_fp32_accuracy_where_one_fp16_product_does_not() -> None:
    gen = torch.Generator().manual_seed(0)
    # Rows spanning ten orders of magnitude, as projections of LayerNorm/GELU outputs can.
    x = torch.randn(64, 512, generator=gen) * torch.logspace(-4, 6, 64)[:, None]
    w = torch.randn(256, 512, generator=gen) / 512**0.5 * 0.05
    bias = torch.randn(256, generator=gen)
    truth = x.double() @ w.double().T + bias.double()

    fp32 = _error_vs_float64(F.linear(x, w, bias), truth)
    # A single FP16 product (rows scaled so that fp16 does not overflow), FP32 accumulation.
    scale = row_scale(x)
    one_fp16 = _error_vs_float64(((x * scale).half().float() @ w.half().float().T) / scale + bias, truth)
    fp16x3 = _error_vs_float64(split_linear(x, prepare_weight(w, torch.float16), bias), truth)
    bf16x3 = _error_vs_float64(split_linear(x, prepare_weight(w, torch.bfloat16), bias), truth)
    assert one_fp16 > 1e-4  # one FP16 product: 2^-11-class
    assert fp16x3 < 8 * fp32 + 1e-7  # three FP16 pairs: FP32-class
    assert fp16x3 < one_fp16 / 300
    assert fp16x3 < bf16x3 < one_fp16 / 10  # BF16x3 sits in between


def test_relative_accuracy_holds_for_each_row_whatever_its_magnitude() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 256, generator=gen) * torch.logspace(-6, 6, 32)[:, None]
    w = torch.randn(64, 256, generator=gen) * torch.logspace(-3, 3, 64)[:, None]
    out = split_linear(x, prepare_weight(w), None).double()
    truth = x.double() @ w.double().T
    # Error of each output relative to the size of its own terms (sum |x||w|), not to the largest output.
    size = x.double().abs() @ w.double().abs().T
    assert ((out - truth).abs() / size).max() < 2**-20


def test_split_linear_keeps_batch_dims_and_falls_back_for_plain_tensors_off_cuda() -> None:
    x, w, b = torch.randn(2, 3, 8), torch.randn(4, 8), torch.randn(4)
    linear = SplitLinear()
    out = linear(x, linear.prepare(w), b)
    assert out.shape == (2, 3, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))  # CPU tensors: plain FP32
    assert linear.prepare(w) is linear.prepare(w)  # split once per weight
    assert isinstance(linear.prepare(w), SplitWeight)


def test_fp32_linear_names_each_math_and_rejects_others() -> None:
    assert fp32_linear("ieee") is F.linear
    assert fp32_linear("fp16x3").dtype == torch.float16
    assert fp32_linear("bf16x3").dtype == torch.bfloat16
    assert type(fp32_linear("tf32x3")).__name__ == "Tf32x3Linear"
    with pytest.raises(ValueError, match="fp16x3, bf16x3, tf32x3, ieee"):
        fp32_linear("fp8")


def test_half_gemm_probe_answers_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert half_gemm_available()  # the torch CI installs (2.13) has it

    def old_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # no out_dtype, as before torch 2.8
        return a @ b

    monkeypatch.setattr(torch, "mm", old_mm)
    assert not half_gemm_available()
