"""Pool per-token hidden states of a packed batch into vectors per window, on the device, without host syncs.

Poolings: `mean` (the residue tokens, between the specials), `mean_all` (every token), `cls` (the first token:
BOS / [CLS], fair-esm's `bos`) and `max` (per-channel max over the residue tokens). All results are float32,
whatever the compute dtype: sums are accumulated in float32, max and cls are exact copies of hidden values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

POOLINGS: tuple[str, ...] = ("mean", "mean_all", "cls", "max")


def pool_layers(
    hiddens: Sequence[torch.Tensor],  # per layer [T, D]: hidden states of all windows, concatenated
    cu_seqlens: torch.Tensor,  # int32 [B+1] window offsets
    poolings: Sequence[str],  # each one of POOLINGS
    special_start: int,  # special tokens at the start of each window
    special_end: int,  # special tokens at the end of each window
) -> torch.Tensor:
    """float32 [B, len(hiddens) * len(poolings), D]: layer-major (every pooling of the first layer, then the
    next layer's). The per-token indexing is computed once for all layers and poolings."""
    unknown = [p for p in poolings if p not in POOLINGS]
    if unknown:
        raise ValueError(f"unknown pooling {unknown[0]!r}")
    first = hiddens[0]
    starts = cu_seqlens[:-1].long()  # [B]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B] tokens per window
    num_windows, num_tokens = lengths.numel(), first.shape[0]
    window_of_token = residue = None
    if any(p != "cls" for p in poolings):
        # No step waits for the GPU (a host sync would stall the actor's other batch in flight): repeat_interleave
        # is told its output size, and the specials are masked rather than dropped by boolean indexing.
        window_of_token = torch.repeat_interleave(
            torch.arange(num_windows, device=first.device), lengths, output_size=num_tokens
        )  # [T]
        offset_in_window = torch.arange(num_tokens, device=first.device) - starts[window_of_token]  # [T]
        residue = (offset_in_window >= special_start) & (
            offset_in_window < lengths[window_of_token] - special_end
        )  # [T]
    out: list[torch.Tensor] = []
    for hidden in hiddens:
        hidden32 = hidden.float() if window_of_token is not None else hidden  # [T, D]
        for mode in poolings:
            if mode == "cls":
                out.append(hidden[starts].float())  # [B, D]
                continue
            assert window_of_token is not None and residue is not None  # set above for every non-cls pooling
            if mode == "max":
                # -inf outside the residues: a special never wins; a NaN residue propagates (and is caught).
                values = torch.where(residue[:, None], hidden32, float("-inf"))  # [T, D]
                # A segmented reduction over the windows' contiguous token ranges: no atomics (scatter_reduce's
                # amax contends on every window's row), and `unsafe` skips the length checks that sync the host.
                out.append(torch.segment_reduce(values, "max", lengths=lengths, unsafe=True))  # [B, D]
                continue
            mean_all = mode == "mean_all"
            sums = torch.zeros(num_windows, hidden.shape[1], device=hidden.device, dtype=torch.float32)  # [B, D]
            if mean_all:
                sums.index_add_(0, window_of_token, hidden32)
                counts = lengths.clamp(min=1).to(torch.float32)  # [B]
            else:
                sums.index_add_(0, window_of_token, torch.where(residue[:, None], hidden32, 0.0))  # a non-finite special stays out
                counts = (lengths - special_start - special_end).clamp(min=1).to(torch.float32)  # [B]
            out.append(sums / counts[:, None])  # [B, D]
    return torch.stack(out, dim=1)  # [B, L*P, D]


def pool_packed(
    hidden: torch.Tensor,  # [T, D] hidden states of all windows, concatenated
    cu_seqlens: torch.Tensor,  # int32 [B+1] window offsets
    mode: str,  # one of POOLINGS
    special_start: int,  # special tokens at the start of each window
    special_end: int,  # special tokens at the end of each window
) -> torch.Tensor:
    """One float32 vector per window for one layer and one pooling: [B, D]."""
    return pool_layers([hidden], cu_seqlens, [mode], special_start, special_end)[:, 0]  # [B, D]
