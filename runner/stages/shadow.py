"""The FP32 shadow: a sampled fraction of sequences embedded again in FP32 and compared with the output.

- Sampling is a hash of the id, so the same input gives the same sample on any number of GPUs.
- The driver hands sampled token ids to a pool of FP32 actors behind a bounded queue; when the queue is
  full the sample is shed (counted), so the shadow never stalls the main stream.
- Each comparison (cosine, max |diff|, norm ratio) of the *stored* main vector with the FP32 vector is
  written to `drift.arrow` and summarised in the manifest; `--on-drift abort` stops the job.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from runner.errors import RunnerError
from runner.input.batch import PackedBatch

log = logging.getLogger(__name__)  # a child of "runner": actor-side, see runner.driver.console

DRIFT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("length", pa.int32()),
        ("cosine", pa.float64()),
        ("max_abs_diff", pa.float64()),
        ("norm_ratio", pa.float64()),  # |main| / |fp32|
        ("precision", pa.string()),
        ("time", pa.timestamp("ms")),
        # The stored column compared (the job's lowest-cosine column for this sequence when it stores several).
        ("column", pa.string()),
    ]
)


class DriftViolation(RunnerError):
    """A sampled sequence drifted below --drift-min-cosine and --on-drift is abort."""

    exit_code = 4


def shadow_sample(ids: list[str], rate: float) -> np.ndarray:
    """Deterministic sample: id i is in when the first 8 bytes of blake2b(id) / 2**64 < rate."""
    if rate <= 0:
        return np.zeros(len(ids), dtype=bool)
    if rate >= 1:
        return np.ones(len(ids), dtype=bool)
    threshold = int(rate * 2**64)
    return np.array(
        [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") < threshold for i in ids],
        dtype=bool,
    )


def compare(main: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row cosine, max absolute difference and norm ratio of main [N, D] against reference [N, D]."""
    main64, ref64 = main.astype(np.float64), reference.astype(np.float64)
    main_norm = np.linalg.norm(main64, axis=1)  # [N]
    ref_norm = np.linalg.norm(ref64, axis=1)  # [N]
    cosine = (main64 * ref64).sum(axis=1) / np.maximum(main_norm * ref_norm, 1e-300)  # [N]
    # Rounding can put identical vectors a hair above 1; a cosine outside [-1, 1] would only confuse.
    cosine = np.clip(cosine, -1.0, 1.0)  # NaN stays NaN (and so counts as a violation)
    max_abs = np.abs(main64 - ref64).max(axis=1)  # [N]
    return cosine, max_abs, main_norm / np.maximum(ref_norm, 1e-300)


def compare_columns(main: np.ndarray, reference: np.ndarray, columns: int) -> tuple[np.ndarray, ...]:
    """`compare` for rows of `columns` vectors back to back ([N, C*D] each), column by column; per row the
    column with the lowest cosine (NaN counts as lowest) is reported: (cosine, max |diff|, norm ratio, column)."""
    n = main.shape[0]
    flat = compare(main.reshape(n * columns, -1), reference.reshape(n * columns, -1))  # [N*C] each
    cosine, max_abs, norm_ratio = (a.reshape(n, columns) for a in flat)  # [N, C] each
    worst = np.argmin(np.where(np.isnan(cosine), -np.inf, cosine), axis=1)  # [N]
    rows = np.arange(n)
    return cosine[rows, worst], max_abs[rows, worst], norm_ratio[rows, worst], worst


def pack_for_shadow(token_lists: list[np.ndarray]) -> PackedBatch:
    """Sampled windows (token ids) as one packed batch for the FP32 actor."""
    lengths = np.array([len(t) for t in token_lists], dtype=np.int32)
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    cu[1:] = np.cumsum(lengths)
    n = len(token_lists)
    zeros = np.zeros(n, dtype=np.int32)
    return PackedBatch(
        tokens=np.concatenate(token_lists).astype(np.int32),
        positions=np.concatenate([np.arange(length, dtype=np.int32) for length in lengths]),
        cu_seqlens=cu,
        ids=[""] * n,
        ordinals=np.zeros(n, dtype=np.int64),
        residues=zeros,
        truncated=np.zeros(n, dtype=bool),
        chunk_index=zeros,
        chunk_count=zeros + 1,
        total_residues=zeros,
        token_budget=int(cu[-1]),
    )


@dataclass
class ShadowSettings:
    """Shadow pool knobs (from EmbedConfig)."""

    rate: float  # fraction of sequences re-embedded in FP32
    min_cosine: float  # per-sequence threshold
    on_drift: str  # "warn" | "abort"
    max_in_flight: int  # shadow batches queued or running before new samples are shed
    precision: str  # the main path's precision, recorded with each comparison
    batch_tokens: int = 1  # gather sampled windows until this many tokens, then submit them as one batch
    fp32_math: str = "ieee"  # how the shadow's FP32 matmuls run on a GPU (runner.config.SHADOW_MATHS)
    # The job's stored pooled columns (runner.output.sink.vector_columns), each compared with its FP32 twin.
    columns: tuple[str, ...] = ("embedding",)


@dataclass
class _Pending:
    ids: list[str]
    lengths: np.ndarray
    main: np.ndarray  # [N, D] the stored main vectors
    future: Any


@dataclass
class ShadowMonitor:
    """Driver side of the shadow: submit samples, collect comparisons, enforce the threshold."""

    settings: ShadowSettings
    out_dir: Path
    submit_fn: Any  # callable(PackedBatch) -> future (a Ray ObjectRef, or anything `wait_fn` understands)
    wait_fn: Any  # callable(list[future], block: bool) -> (done, not_done)
    get_fn: Any  # callable(future) -> np.ndarray [N, D]
    metrics: Any = None  # runner.driver.metrics.DriverMetrics or None
    # callable() that starts the FP32 actors, called at the first offer (once the main stream runs), so that
    # they load and compile while the first shadow batch gathers; None when submit_fn starts them itself.
    start_fn: Any = None
    # callable() -> [{"load_seconds": s, "compile_seconds": s, "kernels": k}, ...] of the FP32 actors, for the
    # summary; or None
    startup_fn: Any = None
    finish_fn: Any = None  # callable() run once closed or abandoned (stops an early start still waiting), or None
    sampled: int = 0
    shed: int = 0
    compared: int = 0
    violations: int = 0
    cosines: list[np.ndarray] = field(default_factory=list)
    worst: list[tuple[float, str]] = field(default_factory=list)  # lowest cosines seen, with ids
    # How far the shadow lagged the main stream. A shadow whose comparisons mostly come after the stream
    # ended (its FP32 actors were still loading, or it is slower than its share) costs wall time at the
    # end of the job rather than throughput during it.
    compared_after_stream: int = 0  # comparisons recorded after the main stream ended (in close())
    tail_seconds: float = 0.0  # time close() waited for the shadow after the main stream ended
    first_result_seconds: float | None = None  # first offer (actors started) -> first comparison recorded
    # time.time() of the first comparison recorded: from then on the shadow competes with the main path, so the
    # job's actor clock from this moment (JobReport.shadow_window, on the actors' time.time() stamps) is the
    # throughput with the shadow running.
    first_result_at: float | None = None

    def __post_init__(self) -> None:
        self._pending: list[_Pending] = []
        # Sampled windows gathered for the next shadow batch: a 1% sample of one main batch is a few
        # sequences, and FP32 matmuls over a few hundred tokens leave the GPU mostly idle.
        self._gathered: list[tuple[list[str], np.ndarray, np.ndarray, list[np.ndarray]]] = []
        self._gathered_tokens = 0
        self._tmp = self.out_dir / ".drift.arrow.tmp"
        self._writer = pa.ipc.new_file(str(self._tmp), DRIFT_SCHEMA)
        self._closed = False
        self._stream_ended = False
        self._first_offer: float | None = None  # time.monotonic() of the first offer

    @property
    def queue_depth(self) -> int:
        """Shadow batches queued or running."""
        return len(self._pending)

    def offer(self, ids: list[str], lengths: np.ndarray, main: np.ndarray, tokens: list[np.ndarray]) -> bool:
        """Gather sampled windows for FP32; once `batch_tokens` are gathered submit them as one batch, or
        shed them (return False) when the queue is full."""
        if not ids:
            return True
        if self._first_offer is None:
            self._first_offer = time.monotonic()
        if self.start_fn is not None:
            self.start_fn()
            self.start_fn = None
        self.sampled += len(ids)
        self._gathered.append((list(ids), np.asarray(lengths), np.asarray(main, np.float32), list(tokens)))
        self._gathered_tokens += sum(len(t) for t in tokens)
        self.poll()
        if self._gathered_tokens < self.settings.batch_tokens:
            return True
        if len(self._pending) >= self.settings.max_in_flight:
            shed = sum(len(g[0]) for g in self._gathered)
            self._gathered, self._gathered_tokens = [], 0
            self.shed += shed
            if self.metrics:
                self.metrics.shadow_shed(shed)
            return False
        self._submit_gathered()
        return True

    def _submit_gathered(self) -> None:
        if not self._gathered:
            return
        ids = [i for g in self._gathered for i in g[0]]
        lengths = np.concatenate([g[1] for g in self._gathered])
        main = np.concatenate([g[2] for g in self._gathered])
        tokens = [t for g in self._gathered for t in g[3]]
        self._gathered, self._gathered_tokens = [], 0
        future = self.submit_fn(pack_for_shadow(tokens))
        self._pending.append(_Pending(ids, lengths, main, future))

    def poll(self, block: bool = False) -> None:
        """Collect finished shadow batches; with block, wait for all of them."""
        while self._pending:
            futures = [p.future for p in self._pending]
            done, _ = self.wait_fn(futures, block)
            if not done:
                return
            done_set = {id(f) for f in done}
            finished = [p for p in self._pending if id(p.future) in done_set]
            self._pending = [p for p in self._pending if id(p.future) not in done_set]
            # Record every finished batch before enforcing the threshold, so that an abort still leaves
            # all comparisons that were made in drift.arrow and the summary.
            messages = [self._record(p, np.asarray(self.get_fn(p.future), dtype=np.float32)) for p in finished]
            messages = [m for m in messages if m]
            if messages and self.settings.on_drift == "abort":
                raise DriftViolation(
                    "; ".join(messages[:3]) + f" (precision {self.settings.precision}); rerun with --precision fp32 "
                    "or --fp32-layernorm, or use --on-drift warn"
                )
            for message in messages:
                log.warning(message)
            if not block:
                return

    def close(self) -> None:
        """The main stream has ended: submit what is gathered, wait for the shadow batches still running,
        then put drift.arrow in place."""
        self._stream_ended = True
        started = time.monotonic()
        try:
            self._submit_gathered()
            self.poll(block=True)
        finally:
            self.tail_seconds = time.monotonic() - started
            self._finish()

    def abandon(self) -> None:
        """Stop without waiting (the job is aborting); comparisons so far stay in drift.arrow.

        Safe to call after `close` (even one that raised DriftViolation): it then does nothing.
        """
        self._pending = []
        self._gathered, self._gathered_tokens = [], 0
        self._finish()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.finish_fn is not None:
            self.finish_fn()
        self._writer.close()
        self._tmp.replace(self.out_dir / "drift.arrow")
        if self.metrics:
            self.metrics.shadow_queue(len(self._pending))  # else the gauge keeps its last busy value

    def _record(self, p: _Pending, reference: np.ndarray) -> str | None:
        """Write one finished batch's comparisons; return a violation message (None when all pass)."""
        names = self.settings.columns
        cosine, max_abs, norm_ratio, worst = compare_columns(p.main, reference, len(names))
        now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms"))
        n = len(p.ids)
        self._writer.write_batch(
            pa.record_batch(
                [
                    pa.array(p.ids, pa.string()),
                    pa.array(p.lengths, pa.int32()),
                    pa.array(cosine),
                    pa.array(max_abs),
                    pa.array(norm_ratio),
                    pa.array([self.settings.precision] * n, pa.string()),
                    pa.array([now.value] * n, pa.timestamp("ms")),
                    pa.array([names[c] for c in worst], pa.string()),
                ],
                schema=DRIFT_SCHEMA,
            )
        )
        self.compared += n
        if self._stream_ended:
            self.compared_after_stream += n
        if self.first_result_seconds is None and self._first_offer is not None:
            self.first_result_seconds = time.monotonic() - self._first_offer
        if self.first_result_at is None:
            self.first_result_at = time.time()
        self.cosines.append(cosine)
        bad = np.flatnonzero(~(cosine >= self.settings.min_cosine))  # NaN cosine counts as a violation
        self.violations += len(bad)
        self.worst = sorted(self.worst + [(float(cosine[i]), p.ids[i]) for i in np.argsort(cosine)[:5]])[:5]
        if self.metrics:
            self.metrics.shadow_compared(cosine, len(bad))
        if not len(bad):
            return None
        where = (lambda i: f", {names[worst[i]]}") if len(names) > 1 else (lambda i: "")
        detail = ", ".join(f"{p.ids[i]} (cosine {cosine[i]:.7f}{where(i)})" for i in bad[:10])
        more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
        return (
            f"FP32 shadow: {len(bad)} sequence(s) drifted below --drift-min-cosine {self.settings.min_cosine}: "
            f"{detail}{more}"
        )

    def summary(self) -> dict[str, Any]:
        """The manifest's `shadow` section."""
        all_cos = np.concatenate(self.cosines) if self.cosines else np.zeros(0)
        stats: dict[str, Any] = {
            "rate": self.settings.rate,
            "min_cosine_threshold": self.settings.min_cosine,
            "on_drift": self.settings.on_drift,
            "fp32_math": self.settings.fp32_math,
            "batch_tokens": self.settings.batch_tokens,
            "sampled": self.sampled,
            "shed": self.shed,
            "compared": self.compared,
            "violations": self.violations,
            "compared_after_stream": self.compared_after_stream,
            "tail_seconds": round(self.tail_seconds, 3),
            "first_result_seconds": None if self.first_result_seconds is None else round(self.first_result_seconds, 3),
        }
        if self.startup_fn is not None and self.compared:
            stats["actor_startup"] = self.startup_fn()
        if len(all_cos):
            stats.update(
                cosine_min=float(np.nanmin(all_cos)),
                cosine_mean=float(np.nanmean(all_cos)),
                cosine_p0_1=float(np.nanpercentile(all_cos, 0.1)),
                worst=[{"id": i, "cosine": c} for c, i in self.worst],
            )
        return stats
