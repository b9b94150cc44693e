"""3xTF32: the split is exact, and three TF32 products recover FP32 accuracy where one TF32 product does not.

There are no tensor cores on CPU, so a TF32 product is simulated: both operands rounded to TF32 (10
mantissa bits, round to nearest even), multiplied and accumulated in float64, returned as float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runner.kernels.tf32x3 import Tf32x3Linear, split_tf32, tf32_matmuls, tf32x3_linear


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to the nearest TF32 value (ties to even), as tensor cores see their inputs."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    lsb = (bits >> 13) & 1
    rounded = ((bits + 0xFFF + lsb) & 0xFFFFE000) & 0xFFFFFFFF
    return torch.from_numpy(rounded.numpy().astype(np.uint32).view(np.int32)).view(torch.float32)


def simulated_tf32_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = round_to_tf32(x).double() @ round_to_tf32(w).double().T
    if bias is not None:
        out = out + bias.double()
    return out.float()


def test_split_is_exact_and_hi_is_tf32() -> None:
    x = torch.randn(1000) * torch.logspace(-20, 20, 1000)
    hi, lo = split_tf32(x)
    assert torch.equal(hi + lo, x)  # exact: no information lost
    assert ((hi.view(torch.int32) & 0x1FFF) == 0).all()  # only the 10 mantissa bits TF32 keeps
    assert torch.equal(round_to_tf32(hi), hi)
    assert (lo.abs() <= hi.abs() * 2**-10).all()


def test_three_tf32_products_reach_fp32_accuracy() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 512, generator=gen)
    w = torch.randn(256, 512, generator=gen) / 512**0.5
    bias = torch.randn(256, generator=gen)
    truth = x.double() @ w.double().T + bias.double()
    scale = truth.abs().max().item()

    def error(out: torch.Tensor) -> float:
        return (out.double() - truth).abs().max().item() / scale

    fp32 = error(F.linear(x, w, bias))
    one_tf32 = error(simulated_tf32_linear(x, w, bias))
    w_hi, w_lo = split_tf32(w)
    three = error(tf32x3_linear(x, w_hi, w_lo, bias, product=simulated_tf32_linear))
    assert one_tf32 > 1e-4  # one TF32 product is FP16-class (2^-11)
    assert three < 4 * fp32 + 1e-7  # three are FP32-class
    assert three < one_tf32 / 100


def test_linear_falls_back_off_cuda_and_restores_the_matmul_setting() -> None:
    x, w, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(4)
    assert torch.equal(Tf32x3Linear()(x, w, b), F.linear(x, w, b))  # CPU: plain FP32
    half = Tf32x3Linear()(x.half(), w.half(), b.half())
    assert half.dtype == torch.float16
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    with pytest.raises(RuntimeError), tf32_matmuls():
        raise RuntimeError("inside")
    after = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    assert after == before
