"""Pool per-token hidden states of a packed batch into one vector per window, on the device."""

from __future__ import annotations

import torch


def pool_packed(
    hidden: torch.Tensor,  # [T, D] hidden states of all windows, concatenated
    cu_seqlens: torch.Tensor,  # int32 [B+1] window offsets
    mode: str,  # "mean" (tokens between the specials), "mean_all" (every token) or "cls" (first token)
    special_start: int,  # special tokens at the start of each window
    special_end: int,  # special tokens at the end of each window
) -> torch.Tensor:
    """One float32 vector per window: [B, D]. Sums run in float32 whatever the compute dtype."""
    starts = cu_seqlens[:-1].long()  # [B]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B] tokens per window
    if mode == "cls":
        return hidden[starts].float()  # [B, D]
    if mode == "mean_all":
        skip_start, skip_end = 0, 0
    elif mode == "mean":
        skip_start, skip_end = special_start, special_end
    else:
        raise ValueError(f"unknown pooling {mode!r}")
    num_windows = lengths.numel()
    # No step waits for the GPU (a host sync would stall the actor's other batch in flight): repeat_interleave
    # is told its output size, and the specials are replaced by zeros rather than dropped by boolean indexing.
    window_of_token = torch.repeat_interleave(
        torch.arange(num_windows, device=hidden.device), lengths, output_size=hidden.shape[0]
    )  # [T]
    offset_in_window = torch.arange(hidden.shape[0], device=hidden.device) - starts[window_of_token]  # [T]
    keep = (offset_in_window >= skip_start) & (offset_in_window < lengths[window_of_token] - skip_end)  # [T]
    sums = torch.zeros(num_windows, hidden.shape[1], device=hidden.device, dtype=torch.float32)  # [B, D]
    sums.index_add_(0, window_of_token, torch.where(keep[:, None], hidden.float(), 0.0))  # a non-finite special stays out
    counts = (lengths - skip_start - skip_end).clamp(min=1).to(torch.float32)  # [B]
    return sums / counts[:, None]  # [B, D]
