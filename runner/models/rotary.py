"""Rotary position embedding over packed tokens, as ESM-2 (fair-esm) and ESM C compute it.

Both use the same rotary: frequencies 1 / base^(2i / hd) in float32, each token rotated by its own position inside
its sequence, the two halves of a head rotated together (rotate-half: the angles duplicated, not interleaved), the
rotation computed in float32 and returned in the input's dtype. ESM-2 uses the frequencies its checkpoint stores
(runner.models.esm2.ESM2Embedder.rotary_inv_freq), ESM C computes them from its base.
"""

from __future__ import annotations

import torch


def default_inv_freq(head_dim: int, base: float = 10000.0, device: torch.device | None = None) -> torch.Tensor:
    """The rotary frequencies 1 / base^(2i / hd), computed in float32 on `device`: [hd/2]."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim  # [hd/2]
    return 1.0 / (base**exponents)  # [hd/2]


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary embedding at each token's own position: float32 [T, 1, hd] each.

    `inv_freq` [hd/2]: the frequencies (`default_inv_freq`, or a checkpoint's own), used in float32.
    """
    inv_freq = inv_freq.to(device=positions.device, dtype=torch.float32)  # [hd/2]
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [T, hd]: halves duplicated (rotate-half), not interleaved
    return angles.cos()[:, None, :], angles.sin()[:, None, :]  # [T, 1, hd] each


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) computed in float32, returned in x's dtype.

    Eager this is several passes over [T, H, hd] in float32; compiled it is one fused kernel.
    """
    xf = x.float()  # [T, H, hd]
    x1, x2 = xf.chunk(2, dim=-1)  # [T, H, hd/2] each
    rotated = torch.cat((-x2, x1), dim=-1)  # [T, H, hd]
    return (xf * cos + rotated * sin).to(x.dtype)  # [T, H, hd]
