"""Per-actor clocks: the stage times its own batches (`batch_seconds`, `batch_done`), the driver adds them up per
actor (`ActorClock`) and the manifest reports them. CPU only, no Ray (the end-to-end check is in test_cli)."""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pytest

from runner.driver.collect import clock_batches
from runner.input.stream import PackSettings, ReadSettings, pack_records, read_blocks
from runner.models.registry import load_codec
from runner.output.manifest import actor_section, with_shadow_section
from runner.output.report import CLOCK_BINS_PER_ACTOR, ActorClock, JobReport
from runner.stages.embed_stage import BusyClock, EmbedStage, StageSettings

DATA = Path(__file__).parent / "data"


# --- the stage ------------------------------------------------------------------------------------------


def test_stage_times_each_batch_on_its_first_window(tiny_esm2_path: Path) -> None:
    records = next(read_blocks(ReadSettings((str(DATA / "some_proteins.fasta"),), "id", "sequence", 50)))
    # A small budget: several packed batches, most of them with more than one window.
    packed = pack_records(records, PackSettings(load_codec(str(tiny_esm2_path)), None, "truncate", 128, 2048))
    batch_ids = [ids for ids in packed.column("ids").to_pylist() if ids]
    assert len(batch_ids) >= 3 and any(len(ids) > 1 for ids in batch_ids)
    stage = EmbedStage(StageSettings(str(tiny_esm2_path), "fp32", -1, "mean", "cpu"))
    wall_before, perf_before = time.time(), time.perf_counter()
    out = stage(packed)
    wall_after, perf_after = time.time(), time.perf_counter()

    seconds = out.column("batch_seconds").to_numpy()
    done = out.column("batch_done").to_numpy()
    first_window = out.column("batch_budget").to_numpy() > 0  # batch_tokens/batch_budget mark a batch's first row
    assert first_window.sum() == len(batch_ids)
    assert ((seconds > 0) == first_window).all() and ((done > 0) == first_window).all()
    assert out.column("id").filter(pa.array(first_window)).to_pylist() == [ids[0] for ids in batch_ids]
    assert (done[first_window] >= wall_before).all() and (done[first_window] <= wall_after).all()
    assert (np.diff(done[first_window]) > 0).all()  # one call at a time here: batches finish in order
    assert seconds.sum() <= perf_after - perf_before  # busy time within the call, never counted twice


def test_busy_clock_counts_overlapping_batches_once() -> None:
    """Two calls in flight (a GPU actor): the credits sum to the time at least one batch was running."""
    now = [0.0]
    clock = BusyClock(now=lambda: now[0])

    def at(t: float) -> float:
        now[0] = t
        return t

    at(0.0)
    clock.start()  # batch A starts, the actor was idle
    at(2.0)
    clock.start()  # batch B starts while A runs
    at(10.0)
    credit_a = clock.finish()
    at(15.0)
    credit_b = clock.finish()
    at(20.0)
    clock.start()  # batch C after an idle gap
    at(23.0)
    credit_c = clock.finish()
    assert (credit_a, credit_b, credit_c) == (10.0 - 0.0, 15.0 - 10.0, 23.0 - 20.0)
    assert credit_a + credit_b + credit_c == (15.0 - 0.0) + (23.0 - 20.0)  # union, not 10 + 13 + 3


# --- the driver's ActorClock ------------------------------------------------------------------------------


class Batch(NamedTuple):
    worker: str
    tokens: int
    seconds: float
    done: float


A1, A2, A3 = Batch("h:cpu:1", 100, 2.0, 1000.0), Batch("h:cpu:1", 300, 1.0, 1003.0), Batch("h:cpu:1", 200, 1.5, 1005.0)
B1, B2 = Batch("h:cpu:2", 50, 4.0, 1001.0), Batch("h:cpu:2", 400, 2.0, 1004.0)


def stage_table(batches: list[Batch]) -> pa.Table:
    """Stage output as the driver sees it: each batch's figures on its first window, a second window with zeros,
    and a block's record-count row (no id) at the end."""
    rows = []
    for b in batches:
        rows.append({"worker": b.worker, "batch_tokens": b.tokens, "batch_seconds": b.seconds, "batch_done": b.done})
        rows.append({"worker": b.worker, "batch_tokens": 0, "batch_seconds": 0.0, "batch_done": 0.0})
    rows.append({"worker": A1.worker, "batch_tokens": 0, "batch_seconds": 0.0, "batch_done": 0.0})
    schema = pa.schema([("worker", pa.string()), ("batch_tokens", pa.int64()), ("batch_seconds", pa.float64()),
                        ("batch_done", pa.float64())])
    return pa.Table.from_pylist(rows, schema=schema)


def test_actor_clocks_of_two_workers_in_any_arrival_order(tmp_path: Path) -> None:
    tables = [stage_table([A3, B2]), stage_table([A2, B1]), stage_table([A1])]  # the latest batches arrive first
    reports = []
    for order in itertools.permutations(tables):
        report = JobReport(tmp_path)
        for table in order:
            clock_batches(table, report)
        reports.append(report)
    assert all(r.actors == reports[0].actors for r in reports)  # arrival order changes nothing

    report = reports[0]
    a, b = report.actors[A1.worker], report.actors[B1.worker]
    assert (a.batches, a.tokens, b.batches, b.tokens) == (3, A1.tokens + A2.tokens + A3.tokens, 2, B1.tokens + B2.tokens)
    a_busy, b_busy = A1.seconds + A2.seconds + A3.seconds, B1.seconds + B2.seconds
    assert a.busy_seconds == pytest.approx(a_busy) and b.busy_seconds == pytest.approx(b_busy)
    a_span, b_span = A3.done - (A1.done - A1.seconds), B2.done - (B1.done - B1.seconds)
    assert a.span_seconds == pytest.approx(a_span) and b.span_seconds == pytest.approx(b_span)
    # Steady: the first batch (possibly warm-up) excluded, from its end to the last batch's end.
    a_steady = (A2.tokens + A3.tokens) / (A3.done - A1.done)
    b_steady = B2.tokens / (B2.done - B1.done)
    assert a.steady_tokens_per_second == pytest.approx(a_steady)
    assert b.steady_tokens_per_second == pytest.approx(b_steady)
    a_forward, b_forward = a.tokens / a_busy, b.tokens / b_busy
    assert a.forward_tokens_per_second == pytest.approx(a_forward)
    assert b.forward_tokens_per_second == pytest.approx(b_forward)
    assert a.busy_fraction == pytest.approx(a_busy / a_span) and b.busy_fraction == pytest.approx(b_busy / b_span)
    # The job: every actor's tokens after its first batch over one shared span (not the sum of the actors'
    # rates, which would ignore an actor idling at the end); the busy fraction is the least busy actor's.
    job_steady = (A2.tokens + A3.tokens + B2.tokens) / (max(A3.done, B2.done) - min(A1.done, B1.done))
    assert report.actor_steady_tokens_per_second == pytest.approx(job_steady)
    assert job_steady < a_steady + b_steady
    assert report.forward_tokens_per_second == pytest.approx(a_forward + b_forward)
    assert report.actor_busy_fraction == pytest.approx(min(a_busy / a_span, b_busy / b_span))
    assert actor_section(a) == {
        "batches": 3, "tokens": a.tokens, "busy_seconds": round(a_busy, 3), "span_seconds": round(a_span, 3),
        "steady_tokens_per_second": round(a_steady, 1), "forward_tokens_per_second": round(a_forward, 1),
        "busy_fraction": round(a_busy / a_span, 4),
    }


def test_a_restarted_actor_adds_time_not_a_second_rate(tmp_path: Path) -> None:
    """Ray restarts a dead actor as a new process (a new worker name) on the same GPU: the job's steady rate
    spans both, one after the other, instead of adding their rates as if they had run together."""
    report = JobReport(tmp_path)
    dead, replacement = "h:cuda0:11", "h:cuda0:12"
    for worker, tokens, seconds, done in [(dead, 100, 1.0, 1000.0), (dead, 100, 1.0, 1001.0),
                                          (replacement, 100, 1.0, 1010.0), (replacement, 100, 1.0, 1011.0)]:
        report.clock_batch(worker, tokens, seconds, done)
    assert report.actors[dead].steady_tokens_per_second == report.actors[replacement].steady_tokens_per_second == 100
    assert report.actor_steady_tokens_per_second == pytest.approx((100 + 100) / (1011.0 - 1000.0))


def test_actor_clock_with_one_batch_has_no_steady_rate(tmp_path: Path) -> None:
    clock = ActorClock()
    clock.add(A1.tokens, A1.seconds, A1.done)
    assert clock.steady_tokens_per_second == 0.0  # only the (excluded) first batch
    assert clock.forward_tokens_per_second == pytest.approx(A1.tokens / A1.seconds)
    assert clock.busy_fraction == pytest.approx(1.0)
    empty = JobReport(tmp_path)
    assert (empty.actor_steady_tokens_per_second, empty.forward_tokens_per_second, empty.actor_busy_fraction) == (0, 0, 0)


# --- the clock while the shadow ran (throughput.with_shadow) ----------------------------------------------


BATCHES = [A1, A2, A3, B1, B2]


def brute_window(batches: list[Batch], start: float) -> tuple[int, int, float]:
    """(batches, tokens, tok/s) of the batches done at or after `start`, straight from the definition: each actor's
    first batch in the window excluded from the tokens, the span from the earliest to the latest batch done."""
    inside = [b for b in batches if b.done >= start]
    if not inside:
        return 0, 0, 0.0
    firsts = {}
    for b in sorted(inside, key=lambda b: b.done, reverse=True):
        firsts[b.worker] = b  # the earliest batch of each actor wins
    steady_tokens = sum(b.tokens for b in inside) - sum(b.tokens for b in firsts.values())
    span = max(b.done for b in inside) - min(b.done for b in inside)
    return len(inside), sum(b.tokens for b in inside), steady_tokens / span if span > 0 else 0.0


def clocked(tmp_path: Path, mark: float | None = None) -> JobReport:
    """A report that clocked every batch of BATCHES, then learned the shadow's first comparison at `mark`."""
    report = JobReport(tmp_path)
    for b in BATCHES:
        report.clock_batch(*b)
    report.shadow_started_at = mark
    return report


def test_without_a_shadow_result_there_is_no_window(tmp_path: Path) -> None:
    report = clocked(tmp_path)
    assert report.shadow_window is None and with_shadow_section(report) is None


def test_a_mark_before_every_batch_gives_the_whole_job_clock(tmp_path: Path) -> None:
    report = clocked(tmp_path, 990.5)
    window = report.shadow_window
    assert window.tokens_per_second == pytest.approx(report.actor_steady_tokens_per_second)
    assert (window.batches, window.tokens) == (5, sum(b.tokens for b in BATCHES))
    assert window.start == 991.0  # the next bin edge
    assert window.span_seconds == pytest.approx(max(b.done for b in BATCHES) - min(b.done for b in BATCHES))


@pytest.mark.parametrize("mark", [1003.0, 1002.3])  # on a bin edge, or inside the bin before one
def test_the_window_is_the_same_whatever_the_arrival_order_and_when_the_mark_is_known(
    tmp_path: Path, mark: float
) -> None:
    """Batches reach the driver in any order, and the shadow's mark may be learned before, among or after the
    batches done after it: the window holds the batches done from the mark (at the next bin edge) on."""
    # Window from 1003.0: A2, A3 (actor A: A2 is its first, excluded) and B2 (actor B's only one, excluded).
    expected = (3, A2.tokens + A3.tokens + B2.tokens, A3.tokens / (A3.done - A2.done))
    assert brute_window(BATCHES, 1003.0) == expected
    windows = set()
    for order in itertools.permutations(BATCHES):
        for known_after in range(len(order) + 1):  # the mark is set after this many batches were clocked
            report = JobReport(tmp_path)
            for k, b in enumerate(order):
                if k == known_after:
                    report.shadow_started_at = mark
                report.clock_batch(*b)
            if known_after == len(order):
                report.shadow_started_at = mark
            windows.add(report.shadow_window)
    assert len(windows) == 1
    window = windows.pop()
    assert (window.batches, window.tokens) == expected[:2]
    assert window.tokens_per_second == pytest.approx(expected[2])
    assert window.start == 1003.0 and window.span_seconds == pytest.approx(A3.done - A2.done)
    section = with_shadow_section(report)
    earliest_start = min(b.done - b.seconds for b in BATCHES)  # B1's: the actor clock's origin
    assert section == {"from_seconds": round(1003.0 - earliest_start, 3), "batches": 3,
                       "tokens": expected[1], "span_seconds": 2.0, "tokens_per_second": round(expected[2], 1)}


def test_a_shadow_that_compared_only_after_the_stream_has_an_empty_window(tmp_path: Path) -> None:
    report = clocked(tmp_path, 1010.0)
    window = report.shadow_window
    assert (window.batches, window.tokens, window.span_seconds, window.tokens_per_second) == (0, 0, 0.0, 0.0)
    assert with_shadow_section(report)["batches"] == 0


def test_a_long_job_keeps_a_bounded_history_and_an_exact_window(tmp_path: Path) -> None:
    """Three actors, three days of batches in random arrival order: the history never holds more than
    CLOCK_BINS_PER_ACTOR bins per actor, and the window read from it equals the definition over its start."""
    rng = np.random.default_rng(0)
    start, days = 1.7e9, 3
    batches = []
    for worker in ("h:cuda0:1", "h:cuda1:2", "h:cuda2:3"):
        done = start + np.cumsum(rng.uniform(1.0, 9.0, size=days * 86400 // 5))
        tokens = rng.integers(1000, 60000, size=len(done))
        batches += [Batch(worker, int(t), 0.5, float(d)) for t, d in zip(tokens, done, strict=True)]
    report = JobReport(tmp_path)
    for i in rng.permutation(len(batches)):
        report.clock_batch(*batches[i])
    history = report.clock_history
    assert all(len(bins) <= CLOCK_BINS_PER_ACTOR for bins in history.bins.values())
    assert history.width == 128.0  # 3 days / 2048 bins > 64 s
    assert sum(c.batches for bins in history.bins.values() for c in bins.values()) == len(batches)
    for mark in (start - 10.0, start + 40.7, start + 86400 * 1.5 + 0.25, start + 86400 * days + 1000.0):
        report.shadow_started_at = mark
        window = report.shadow_window
        assert mark <= window.start < mark + history.width
        batches_in, tokens_in, rate = brute_window(batches, window.start)
        assert (window.batches, window.tokens) == (batches_in, tokens_in)
        assert window.tokens_per_second == pytest.approx(rate, rel=1e-9)
    report.shadow_started_at = start - 10.0  # before every batch: the whole job
    assert report.shadow_window.tokens_per_second == pytest.approx(report.actor_steady_tokens_per_second, rel=1e-9)


def test_merged_clocks_equal_one_clock_of_all_batches() -> None:
    one, left, right = ActorClock(), ActorClock(), ActorClock()
    for b in (A1, A2, A3):
        one.add(b.tokens, b.seconds, b.done)
    left.add(A3.tokens, A3.seconds, A3.done)
    for b in (A2, A1):
        right.add(b.tokens, b.seconds, b.done)
    left.merge(right)
    assert left == one
