"""Pool per-token hidden states of a packed batch into vectors per window, on the device, without host syncs.

Poolings: `mean` (the residue tokens, between the specials), `mean_all` (every token), `cls` (the first token:
BOS / [CLS], fair-esm's `bos`) and `max` (per-channel max over the residue tokens). All results are float32,
whatever the compute dtype: sums are accumulated in float32, max and cls are exact copies of hidden values.

Every window is cut into three contiguous segments of the packed stream, its start specials, its residues and
its end specials (`window_segments`), so one segmented reduction per layer gives the residue sums and the whole
windows' sums together, and the max over the residues needs no masked copy of the states: each layer's states
are read once for the sums (upcast to float32) and once, in their own dtype, for the max. There are no atomics
(index_add_'s contend on every window's row) and no boolean indexing (which would wait for the GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

POOLINGS: tuple[str, ...] = ("mean", "mean_all", "cls", "max")


def window_segments(
    cu_seqlens: torch.Tensor,  # int32 [B+1] window offsets
    special_start: int,  # special tokens at the start of each window
    special_end: int,  # special tokens at the end of each window
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(segments int64 [3B]: start specials, residues, end specials of each window, in stream order, summing to
    T; residues int64 [B]; tokens int64 [B] per window). A window shorter than its specials has no residues."""
    tokens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
    head = tokens.clamp(max=special_start)  # [B]
    tail = (tokens - head).clamp(max=special_end)  # [B]
    residues = tokens - head - tail  # [B]
    return torch.stack([head, residues, tail], dim=1).flatten(), residues, tokens  # [3B], [B], [B]


def pool_layers(
    hiddens: Sequence[torch.Tensor],  # per layer [T, D]: hidden states of all windows, concatenated
    cu_seqlens: torch.Tensor,  # int32 [B+1] window offsets
    poolings: Sequence[str],  # each one of POOLINGS
    special_start: int,  # special tokens at the start of each window
    special_end: int,  # special tokens at the end of each window
    out: torch.Tensor | None = None,  # float32 [B, L*P, D] to write into (e.g. a view of a transfer buffer)
) -> torch.Tensor:
    """float32 [B, len(hiddens) * len(poolings), D]: layer-major (every pooling of the first layer, then the
    next layer's), written into `out` when given. Each (layer, pooling) vector is computed the same way whatever
    else is asked for, so several layers x poolings give exactly the vectors of one-layer one-pooling calls."""
    unknown = [p for p in poolings if p not in POOLINGS]
    if unknown:
        raise ValueError(f"unknown pooling {unknown[0]!r}")
    first = hiddens[0]
    num_windows, dim = cu_seqlens.numel() - 1, first.shape[1]
    shape = (num_windows, len(hiddens) * len(poolings), dim)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=first.device)  # [B, L*P, D]
    elif tuple(out.shape) != shape or out.dtype != torch.float32:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, expected float32 {shape}")
    starts = cu_seqlens[:-1].long()  # [B]
    segments, residues, tokens = window_segments(cu_seqlens, special_start, special_end)  # [3B], [B], [B]
    sums_needed = any(p in ("mean", "mean_all") for p in poolings)
    for li, hidden in enumerate(hiddens):
        sums = None
        if sums_needed:
            # unsafe: skips the checks of `segments` against T, which would wait for the GPU.
            sums = torch.segment_reduce(hidden.float(), "sum", lengths=segments, unsafe=True).view(
                num_windows, 3, dim
            )  # [B, 3, D]: start specials, residues, end specials
        for pi, mode in enumerate(poolings):
            target = out[:, li * len(poolings) + pi]  # [B, D]
            if mode == "cls":
                target.copy_(hidden[starts])  # [B, D], cast to float32
            elif mode == "max":
                # In the states' own dtype (a max is exact); a window without residues gives -inf, a NaN residue
                # propagates (and is caught), a special never takes part.
                maxima = torch.segment_reduce(hidden, "max", lengths=segments, unsafe=True)  # [3B, D]
                target.copy_(maxima.view(num_windows, 3, dim)[:, 1])  # [B, D]
            elif mode == "mean":
                assert sums is not None
                torch.div(sums[:, 1], residues.clamp(min=1)[:, None], out=target)  # [B, D]
            else:  # mean_all
                assert sums is not None
                torch.div(sums.sum(dim=1), tokens.clamp(min=1)[:, None], out=target)  # [B, D]
    return out


def pool_packed(
    hidden: torch.Tensor,  # [T, D] hidden states of all windows, concatenated
    cu_seqlens: torch.Tensor,  # int32 [B+1] window offsets
    mode: str,  # one of POOLINGS
    special_start: int,  # special tokens at the start of each window
    special_end: int,  # special tokens at the end of each window
) -> torch.Tensor:
    """One float32 vector per window for one layer and one pooling: [B, D]."""
    return pool_layers([hidden], cu_seqlens, [mode], special_start, special_end)[:, 0]  # [B, D]
