"""Ray metrics (`ray.util.metrics`) for the dashboard / Prometheus / Grafana.

Every metric is prefixed `runner_`; Ray's Prometheus endpoint (each node's metrics export port) serves
them as `ray_runner_*`, counters with a `_total` suffix and histograms as `_bucket`/`_count`/`_sum`
(e.g. `ray_runner_tokens_total`, `ray_runner_batch_latency_seconds_bucket`). configs/grafana-runner.json
charts them. Actors report what they embed; the driver reports rejects, rows written, the shadow queue
and drift. Outside Ray (unit tests) the recorders are inert, so stages stay testable without a cluster.

How values reach Prometheus (checked on Ray 2.60): each process exports every `metrics_report_interval_ms`
(default 10 s) and once more when it exits cleanly, so an actor's last batches and a driver's last
comparisons are not lost when the job ends. A counter appears only after its first increment (Ray rejects
inc(0)), so use `or vector(0)` in queries. Ray keeps a gauge for two export intervals after its process
stops reporting. A histogram's `_sum` is rebuilt by Ray from bucket midpoints, so it is approximate: use
the buckets (quantiles) and the rolling-min gauge for cosines, not `_sum / _count`.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any

import numpy as np

LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
COSINE_BOUNDARIES = [0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 0.99999, 1.0]


def _ray_ready() -> bool:
    """Whether this process is connected to Ray (never imports it: an in-process job runs without Ray)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


class _Recorder:
    """Ray metrics that all carry one set of tags; inert (`enabled` False) outside Ray."""

    def __init__(self, tags: dict[str, str]) -> None:
        self.enabled = _ray_ready()
        self.tags = tags

    def _counter(self, name: str, description: str) -> Any:
        from ray.util.metrics import Counter

        return Counter(name, description, tag_keys=tuple(self.tags))

    def _gauge(self, name: str, description: str) -> Any:
        from ray.util.metrics import Gauge

        return Gauge(name, description, tag_keys=tuple(self.tags))

    def _histogram(self, name: str, description: str, boundaries: list[float]) -> Any:
        from ray.util.metrics import Histogram

        return Histogram(name, description, boundaries=boundaries, tag_keys=tuple(self.tags))


class ActorMetrics(_Recorder):
    """What one embedding actor reports per batch."""

    def __init__(self, model: str, precision: str, worker: str) -> None:
        super().__init__({"model": model, "precision": precision, "worker": worker})
        self._window: deque[tuple[float, int]] = deque(maxlen=64)  # (time, tokens) of recent batches
        if not self.enabled:
            return
        self.sequences = self._counter("runner_sequences", "Windows embedded")
        self.tokens = self._counter("runner_tokens", "Tokens embedded")
        self.batches = self._counter("runner_batches", "Packed batches embedded")
        self.nonfinite = self._counter("runner_nonfinite", "Windows with a NaN/Inf embedding")
        self.latency = self._histogram("runner_batch_latency_seconds", "Time to embed one packed batch",
                                       LATENCY_BOUNDARIES)
        self.tokens_per_second = self._gauge("runner_tokens_per_second", "Recent tokens/s of this actor (GPU)")
        self.packing = self._gauge("runner_packing_efficiency", "Real tokens / token budget of recent batches")
        # Its rate is the actor's busy fraction: well below 1, the actor waits for input (not the GPU's limit).
        self.busy = self._counter("runner_busy_seconds", "Seconds in forwards (calls in flight together counted once)")

    def batch(self, windows: int, tokens: int, budget: int, seconds: float, nonfinite: int,
              busy_seconds: float = 0.0) -> None:
        """One packed batch: `seconds` its latency, `busy_seconds` its credit on the actor's BusyClock."""
        if not self.enabled:
            return
        if busy_seconds > 0:  # Ray rejects inc(0)
            self.busy.inc(busy_seconds, tags=self.tags)
        now = time.monotonic()
        self._window.append((now, tokens))
        self.sequences.inc(windows, tags=self.tags)
        self.tokens.inc(tokens, tags=self.tags)
        self.batches.inc(1, tags=self.tags)
        if nonfinite:
            self.nonfinite.inc(nonfinite, tags=self.tags)
        self.latency.observe(seconds, tags=self.tags)
        if budget:
            self.packing.set(tokens / budget, tags=self.tags)
        span = now - self._window[0][0]
        if span > 0:
            self.tokens_per_second.set(sum(t for _, t in list(self._window)[1:]) / span, tags=self.tags)


class DriverMetrics(_Recorder):
    """What the driver reports: rejects, shadow queue, drift."""

    def __init__(self, model: str, precision: str) -> None:
        super().__init__({"model": model, "precision": precision})
        self._recent_cosines: deque[float] = deque(maxlen=1000)
        if not self.enabled:
            return
        self.rejects = self._counter("runner_rejects", "Records rejected")
        self.queue_depth = self._gauge("runner_shadow_queue_depth", "Shadow batches queued or running")
        self.cosine = self._histogram("runner_shadow_cosine", "Cosine of main vs FP32 shadow embedding",
                                      COSINE_BOUNDARIES)
        self.cosine_min = self._gauge("runner_shadow_cosine_rolling_min", "Lowest cosine of the last 1000 samples")
        self.violations = self._counter("runner_drift_violations", "Samples below --drift-min-cosine")
        self.shed = self._counter("runner_shadow_shed", "Samples shed because the shadow fell behind")
        self.rows = self._counter("runner_rows_written", "Embeddings written")

    def rejected(self, count: int) -> None:
        if self.enabled and count:
            self.rejects.inc(count, tags=self.tags)

    def written(self, count: int) -> None:
        if self.enabled and count:
            self.rows.inc(count, tags=self.tags)

    def shadow_queue(self, depth: int) -> None:
        if self.enabled:
            self.queue_depth.set(depth, tags=self.tags)

    def shadow_shed(self, count: int) -> None:
        if self.enabled:
            self.shed.inc(count, tags=self.tags)

    def shadow_compared(self, cosines: np.ndarray, violations: int) -> None:
        self._recent_cosines.extend(float(c) for c in cosines)
        if not self.enabled:
            return
        for c in cosines:
            self.cosine.observe(float(c), tags=self.tags)
        self.cosine_min.set(min(self._recent_cosines), tags=self.tags)
        if violations:
            self.violations.inc(violations, tags=self.tags)
