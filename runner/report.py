"""`JobReport`: what a job did, accumulated by the driver and written to manifest.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class JobReport:
    """What a finished (or aborted) job did; also written to manifest.json."""

    out_dir: Path
    status: str = "running"  # running | complete | aborted | interrupted | failed (unexpected error)
    records_read: int = 0
    rows_written: int = 0
    rejects: int = 0
    truncated: int = 0
    chunked: int = 0
    tokens: int = 0
    batches: int = 0
    budget_tokens: int = 0  # sum of the token budgets of all batches (for packing efficiency)
    wall_seconds: float = 0.0
    records_done: int = 0  # records finished (written or rejected) so far, for progress
    workers: dict[str, int] = field(default_factory=dict)  # windows embedded per actor
    attention: set[str] = field(default_factory=set)  # attention kernels the actors used
    shadow: dict | None = None  # the shadow's summary (manifest "shadow" section)
    first_output_seconds: float | None = None  # job start -> first embeddings back (Ray start, model load)
    tokens_at_first_output: int = 0  # tokens of that first output (excluded from the steady rate)

    parts: list[str] = field(default_factory=list)
    resumed_rows: int = 0  # rows found in complete parts of earlier runs (included in rows_written)
    failed_records: int = 0  # sequences rejected because their window raised inside the model
    oom_splits: int = 0  # batches split after CUDA out-of-memory
    actor_restarts: int = 0  # embedding actors Ray restarted after their process died
    duplicates_dropped: int = 0  # rows delivered twice by a retried batch and not written again

    @property
    def steady_tokens_per_second(self) -> float:
        """Tokens/s from the first embeddings back to the end: the rate once actors are loaded."""
        if self.first_output_seconds is None or self.wall_seconds <= self.first_output_seconds:
            return 0.0
        return (self.tokens - self.tokens_at_first_output) / (self.wall_seconds - self.first_output_seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / self.budget_tokens if self.budget_tokens else 0.0
