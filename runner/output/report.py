"""`JobReport`: what a job did, accumulated by the driver and written to manifest.json."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# The clock history keeps each actor's batches in bins of batch_done this wide (seconds) to begin with ...
CLOCK_BIN_SECONDS = 1.0
# ... and at most this many bins per actor: past it every bin doubles in width, so memory stays bounded
# however long the job runs (a 3-day job ends with 128-s bins), at the price of a coarser window start.
CLOCK_BINS_PER_ACTOR = 2048


@dataclass(slots=True)  # slots: the clock history holds thousands of these
class ActorClock:
    """One embedding actor's own clock: what it reported about its batches (`batch_seconds`, `batch_done`).

    Ray delivers outputs in bursts and in any order, so the driver's arrival times say little about how fast
    an actor works; the actor's own timestamps do. Everything here is order-free (sums, min, max).
    """

    batches: int = 0
    tokens: int = 0
    busy_seconds: float = 0.0  # sum of batch_seconds: time the actor spent in forwards
    first_start: float = math.inf  # time.time() the earliest batch began (its batch_done - batch_seconds)
    first_done: float = math.inf  # earliest batch_done
    first_tokens: int = 0  # tokens of the batch done first (excluded from the steady rate: it may hold warm-up)
    last_done: float = 0.0  # latest batch_done

    def add(self, tokens: int, seconds: float, done: float) -> None:
        """One batch of this actor, whatever its arrival order."""
        self.batches += 1
        self.tokens += tokens
        self.busy_seconds += seconds
        self.first_start = min(self.first_start, done - seconds)
        if done < self.first_done:
            self.first_done, self.first_tokens = done, tokens
        self.last_done = max(self.last_done, done)

    def merge(self, other: ActorClock) -> None:
        """Add another clock's batches (the same actor's, e.g. a neighbouring bin of its history)."""
        self.batches += other.batches
        self.tokens += other.tokens
        self.busy_seconds += other.busy_seconds
        self.first_start = min(self.first_start, other.first_start)
        if other.first_done < self.first_done:
            self.first_done, self.first_tokens = other.first_done, other.first_tokens
        self.last_done = max(self.last_done, other.last_done)

    @property
    def span_seconds(self) -> float:
        """From the start of the actor's first batch to the end of its last: its active span."""
        return self.last_done - self.first_start if self.batches else 0.0

    @property
    def steady_tokens_per_second(self) -> float:
        """Tokens after the first batch / time from the first batch done to the last: the actor's steady rate."""
        span = self.last_done - self.first_done
        if self.batches < 2 or span <= 0:
            return 0.0
        return (self.tokens - self.first_tokens) / span

    @property
    def forward_tokens_per_second(self) -> float:
        """Tokens / busy seconds: what the model does while it works, ignoring any wait for input."""
        return self.tokens / self.busy_seconds if self.busy_seconds > 0 else 0.0

    @property
    def busy_fraction(self) -> float:
        """Share of the active span spent in forwards; the rest waited for input, Ray hand-off or host work."""
        span = self.span_seconds
        return self.busy_seconds / span if span > 0 else 0.0


def job_steady_rate(clocks: Iterable[ActorClock]) -> float:
    """Tokens after each actor's first batch / the time from the earliest first batch done to the latest last
    batch done: the actors' work over one shared span (see `JobReport.actor_steady_tokens_per_second`)."""
    active = [clock for clock in clocks if clock.batches]
    if not active:
        return 0.0
    span = max(clock.last_done for clock in active) - min(clock.first_done for clock in active)
    tokens = sum(clock.tokens - clock.first_tokens for clock in active)
    return tokens / span if span > 0 else 0.0


@dataclass
class ClockHistory:
    """Each actor's batches binned by `batch_done`, so that the actor clock can be read over a window whose start
    is only known later (the shadow's first comparison), whatever order the batches arrived in.

    A bin is an `ActorClock` of the batches done in [index * width, (index + 1) * width): order-free, so a late
    batch simply joins its bin. The window [start, end] is read exactly from the bins at or after `start`
    rounded up to a bin edge. Widths are powers of two times CLOCK_BIN_SECONDS, so halving the bin count merges
    bins 2k and 2k+1 into k without moving any batch across an edge.
    """

    width: float = CLOCK_BIN_SECONDS
    max_bins: int = CLOCK_BINS_PER_ACTOR
    bins: dict[str, dict[int, ActorClock]] = field(default_factory=dict)  # worker -> bin index -> clock

    def add(self, worker: str, tokens: int, seconds: float, done: float) -> None:
        actor_bins = self.bins.setdefault(worker, {})
        actor_bins.setdefault(math.floor(done / self.width), ActorClock()).add(tokens, seconds, done)
        if len(actor_bins) > self.max_bins:
            self._coarsen()

    def _coarsen(self) -> None:
        """Double the width of every actor's bins (one width for all, so all share the window's start edge)."""
        self.width *= 2
        for worker, actor_bins in self.bins.items():
            merged: dict[int, ActorClock] = {}
            for index, clock in actor_bins.items():
                merged.setdefault(index // 2, ActorClock()).merge(clock)
            self.bins[worker] = merged

    def window_start(self, mark: float) -> float:
        """The first bin edge at or after `mark`: where a window from `mark` can be read exactly."""
        return math.ceil(mark / self.width) * self.width

    def since(self, mark: float) -> list[ActorClock]:
        """Each actor's clock over the batches done at or after `window_start(mark)` (actors with none left out)."""
        first = math.ceil(mark / self.width)
        clocks = []
        for actor_bins in self.bins.values():
            clock = ActorClock()
            for index, part in actor_bins.items():
                if index >= first:
                    clock.merge(part)
            if clock.batches:
                clocks.append(clock)
        return clocks


@dataclass(frozen=True)
class ClockWindow:
    """The job's actor clock over the batches done from `start` on (`throughput.with_shadow` in the manifest)."""

    start: float  # time.time() the window begins: the shadow's first comparison, rounded up to a bin edge
    batches: int
    tokens: int  # every token of the window's batches
    span_seconds: float  # earliest to latest batch done in the window
    tokens_per_second: float  # as the steady actor clock: each actor's first batch in the window excluded


@dataclass
class JobReport:
    """What a finished (or aborted) job did; also written to manifest.json."""

    out_dir: Path
    status: str = "running"  # running | complete | aborted | interrupted | failed (unexpected error)
    already_complete: bool = False  # a rerun of a complete job: nothing ran (runner.output.rerun)
    error: str | None = None  # why the job stopped (aborted / failed / interrupted): the one line the user saw
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
    actors: dict[str, ActorClock] = field(default_factory=dict)  # each actor's own clock, by worker
    attention: set[str] = field(default_factory=set)  # attention kernels the actors used
    shadow: dict | None = None  # the shadow's summary (manifest "shadow" section)
    first_output_seconds: float | None = None  # job start -> first embeddings back (Ray start, model load)
    tokens_at_first_output: int = 0  # tokens of that first output (excluded from the steady rate)
    first_output_at: float | None = None  # time.time() of the first embeddings back (runner.driver.startup)
    actor_startup: dict[str, dict] = field(default_factory=dict)  # worker -> its startup report (first output)
    # The actors' batches binned by batch_done, for the clock over the part of the job the shadow ran in.
    clock_history: ClockHistory = field(default_factory=ClockHistory)
    shadow_started_at: float | None = None  # time.time() of the shadow's first comparison (None: it made none)

    parts: list[str] = field(default_factory=list)
    resumed_rows: int = 0  # rows found in complete parts of earlier runs (included in rows_written)
    failed_records: int = 0  # sequences rejected because their window raised inside the model
    oom_splits: int = 0  # batches split after CUDA out-of-memory
    actor_restarts: int = 0  # embedding actors Ray restarted after their process died
    duplicates_dropped: int = 0  # rows delivered twice by a retried batch and not written again
    # --per-token: what the actors wrote this run (every file, kept or later deleted as a duplicate), and the
    # seconds they spent building and writing those files (after the forward, before returning the batch).
    token_files_written: int = 0
    token_bytes_written: int = 0
    token_write_seconds: float = 0.0

    @property
    def steady_tokens_per_second(self) -> float:
        """Tokens/s from the first embeddings back to the end: the rate once actors are loaded."""
        if self.first_output_seconds is None or self.wall_seconds <= self.first_output_seconds:
            return 0.0
        return (self.tokens - self.tokens_at_first_output) / (self.wall_seconds - self.first_output_seconds)

    def clock_batch(self, worker: str, tokens: int, seconds: float, done: float) -> None:
        """Add one batch to its actor's clock."""
        self.actors.setdefault(worker, ActorClock()).add(tokens, seconds, done)
        self.clock_history.add(worker, tokens, seconds, done)

    @property
    def actor_steady_tokens_per_second(self) -> float:
        """The job's steady rate on the actors' own clocks: tokens after each actor's first batch / the time from
        the earliest first batch done to the latest last batch done. With one actor that is its own steady rate;
        with several, their work over one shared span, so an actor that ran out of work early (an uneven end
        across GPUs) or a restarted actor (a new pid after the old one died) counts as time, not as an extra
        rate. Hosts' wall clocks are taken to be in sync (NTP). Unlike `steady_tokens_per_second`, this does not
        depend on when the driver receives the outputs."""
        return job_steady_rate(self.actors.values())

    @property
    def first_batch_start(self) -> float | None:
        """time.time() the job's earliest batch began (the actor clock's origin); None before any batch."""
        return min((clock.first_start for clock in self.actors.values() if clock.batches), default=None)

    @property
    def shadow_window(self) -> ClockWindow | None:
        """The actor clock over the batches done while the shadow ran (from its first comparison to the end), so
        that a shadow which started late is measured where it ran; None when the shadow compared nothing.

        Read at the end from the clock history, so it is the same whichever batches arrived before the mark
        was known. Batches done in the bin the mark falls in are left out (the window starts at the next edge)."""
        if self.shadow_started_at is None:
            return None
        start = self.clock_history.window_start(self.shadow_started_at)
        clocks = self.clock_history.since(self.shadow_started_at)
        span = max((c.last_done for c in clocks), default=0.0) - min((c.first_done for c in clocks), default=0.0)
        return ClockWindow(
            start=start,
            batches=sum(c.batches for c in clocks),
            tokens=sum(c.tokens for c in clocks),
            span_seconds=span,
            tokens_per_second=job_steady_rate(clocks),
        )

    @property
    def forward_tokens_per_second(self) -> float:
        """The actors' forward rates summed: the job's rate if no actor ever waited for input (actors that ran one
        after the other, as a restarted one and its predecessor, are summed as if they had run together)."""
        return sum(clock.forward_tokens_per_second for clock in self.actors.values())

    @property
    def actor_busy_fraction(self) -> float:
        """The lowest actor's busy fraction (0 before any batch)."""
        return min((clock.busy_fraction for clock in self.actors.values()), default=0.0)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def packing_efficiency(self) -> float:
        return self.tokens / self.budget_tokens if self.budget_tokens else 0.0
