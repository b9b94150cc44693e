"""FP32-accurate linear layers from tensor cores: the base class of the emulations and the choice of one.

Moved from runner/models/base.py so that the kernels import nothing from the models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch


class EmulatedLinear(ABC):
    """Drop-in for F.linear(x, weight, bias) that runs float32 CUDA products through an FP32 emulation on
    tensor cores (`product`) and anything else through F.linear. Each weight is split for the emulation
    once (`split`) and cached by identity: the splits are extra copies in the actor's GPU memory."""

    def __init__(self) -> None:
        self._splits: dict[tuple[int, int, int], Any] = {}

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != torch.float32 or weight.dtype != torch.float32 or not x.is_cuda:
            return torch.nn.functional.linear(x, weight, bias)
        return self.product(x, self.prepare(weight), bias)  # [..., out]

    def prepare(self, weight: torch.Tensor) -> Any:
        """The split of a float32 weight, computed once per weight tensor."""
        key = (weight.data_ptr(), weight._version, weight.numel())
        split = self._splits.get(key)
        if split is None:
            split = self.split(weight)
            self._splits[key] = split
        return split

    @abstractmethod
    def split(self, weight: torch.Tensor) -> Any:
        """A float32 weight [out, in] in the form `product` takes."""

    @abstractmethod
    def product(self, x: torch.Tensor, split: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] @ weight.T + bias from the weight's split: float32 [..., out]."""


def fp32_linear(math: str) -> Callable[..., torch.Tensor]:
    """The `linear` of an fp32 model: "fp16x3" (one FP16 tensor-core GEMM over hi/lo pairs, ~2^-22 relative,
    runner.kernels.fp16x3), "bf16x3" (the same from BF16, ~2^-16), "tf32x3" (three TF32 products, ~2^-22,
    runner.kernels.tf32x3) or "ieee" (F.linear: IEEE FP32 on CUDA cores). ValueError for anything else."""
    if math == "ieee":
        return torch.nn.functional.linear
    if math in ("fp16x3", "bf16x3"):
        from runner.kernels.fp16x3 import SplitLinear

        return SplitLinear(torch.float16 if math == "fp16x3" else torch.bfloat16)
    if math == "tf32x3":
        from runner.kernels.tf32x3 import Tf32x3Linear

        return Tf32x3Linear()
    raise ValueError(f"unknown FP32 math {math!r}; known: fp16x3, bf16x3, tf32x3, ieee")
