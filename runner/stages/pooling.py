"""Pool per-token hidden states of a packed batch into vectors per window, on the device, without host syncs.

Poolings: `mean` (the residue tokens, between the specials), `mean_all` (every token), `cls` (the first token:
BOS / [CLS], fair-esm's `bos`) and `max` (per-channel max over the residue tokens). All results are float32,
whatever the compute dtype: sums are accumulated in float32, max and cls are exact copies of hidden values.

Every window is cut into three parts of the packed stream, its start specials, its residues and its end
specials, and each part into pieces of at most PIECE tokens (`window_segments`). A segmented reduction over the
pieces, then one over each part's pieces, gives the residue sums and the whole windows' sums together, and the
max over the residues needs no masked copy of the states: each layer's states are read once for the sums
(upcast to float32) and once, in their own dtype, for the max. Short pieces keep the GPU busy: torch's
segmented reduction runs one thread per segment and channel, looping over the segment's tokens, so a
1,000-token window would be 1,000 dependent steps of too few threads. No atomics (index_add_'s contend on each
window's row), no boolean indexing and no sizes read back (either would wait for the GPU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

POOLINGS: tuple[str, ...] = ("mean", "mean_all", "cls", "max")
PIECE = 64  # tokens per first-level segment at most


def window_segments(
    cu_seqlens: torch.Tensor,  # int32 [B+1] window offsets
    special_start: int,  # special tokens at the start of each window
    special_end: int,  # special tokens at the end of each window
    num_tokens: int,  # T, the packed stream's length (cu_seqlens[-1], known without reading the device)
    piece: int = PIECE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-level segmentation of a packed stream, built on the device (B >= 1):

    - pieces int64 [P], P = T // piece + 3B: consecutive runs of tokens, each inside one part of one window and at
      most `piece` long, in stream order; zero-length pieces pad the end (P is a bound known without a sync);
    - parts int64 [3B+1]: how many pieces make each window's start specials, residues and end specials, then the
      padding;
    - residues and tokens int64 [B] per window. A window shorter than its specials has no residues.
    """
    tokens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
    num_windows, device = tokens.numel(), tokens.device
    head = tokens.clamp(max=special_start)  # [B]
    tail = (tokens - head).clamp(max=special_end)  # [B]
    residues = tokens - head - tail  # [B]
    chunks = ((residues + piece - 1) // piece).clamp(min=1)  # [B] residue pieces (one, empty, for no residues)
    groups = chunks + 2  # [B] pieces per window: start specials, residue pieces, end specials
    size = num_tokens // piece + 3 * num_windows  # >= sum(groups), since chunks <= 1 + residues / piece
    padding = (size - groups.sum()).reshape(1)  # [1]
    counts = torch.cat([groups, padding])  # [B+1]: the padding as a last group
    owner = torch.repeat_interleave(torch.arange(num_windows + 1, device=device), counts, output_size=size)  # [P]
    index = torch.arange(size, device=device) - (counts.cumsum(0) - counts)[owner]  # [P] piece number in its group
    window = owner.clamp(max=num_windows - 1)  # [P]; the padding reads the last window's values, zeroed below
    body = (residues[window] - (index - 1) * piece).clamp(min=0, max=piece)  # [P] a residue piece's length
    pieces = torch.where(index == 0, head[window], torch.where(index == groups[window] - 1, tail[window], body))
    pieces = pieces.masked_fill(owner == num_windows, 0)  # [P]
    ones = torch.ones_like(chunks)  # [B]
    parts = torch.cat([torch.stack([ones, chunks, ones], dim=1).flatten(), padding])  # [3B+1]
    return pieces, parts, residues, tokens


def _segmented(values: torch.Tensor, reduce: str, pieces: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
    """`reduce` ("sum" or "max") of [T, D] `values` over each window part: [B, 3, D] in the values' dtype."""
    # unsafe: skips checking the lengths against T, which would wait for the GPU (they sum to T by construction).
    per_piece = torch.segment_reduce(values, reduce, lengths=pieces, unsafe=True)  # [P, D]
    per_part = torch.segment_reduce(per_piece, reduce, lengths=parts, unsafe=True)  # [3B+1, D]
    return per_part[:-1].unflatten(0, (-1, 3))  # [B, 3, D]: start specials, residues, end specials


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
    num_windows, (num_tokens, dim) = cu_seqlens.numel() - 1, first.shape
    shape = (num_windows, len(hiddens) * len(poolings), dim)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=first.device)  # [B, L*P, D]
    elif tuple(out.shape) != shape or out.dtype != torch.float32:
        raise ValueError(f"out is {out.dtype} {tuple(out.shape)}, expected float32 {shape}")
    if num_windows == 0:
        return out
    starts = cu_seqlens[:-1].long()  # [B]
    pieces, parts, residues, tokens = window_segments(cu_seqlens, special_start, special_end, num_tokens)
    sums_needed = any(p in ("mean", "mean_all") for p in poolings)
    for li, hidden in enumerate(hiddens):
        sums = _segmented(hidden.float(), "sum", pieces, parts) if sums_needed else None  # [B, 3, D]
        for pi, mode in enumerate(poolings):
            target = out[:, li * len(poolings) + pi]  # [B, D]
            if mode == "cls":
                target.copy_(hidden[starts])  # [B, D], cast to float32
            elif mode == "max":
                # In the states' own dtype (a max is exact); a window without residues gives -inf, a NaN residue
                # propagates (and is caught), a special never takes part.
                target.copy_(_segmented(hidden, "max", pieces, parts)[:, 1])  # [B, D]
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
