"""CPU micro-benchmark of the --per-token write path (runner.output.tokens.token_table + write_token_file) and of how
much of it holds the GIL, i.e. how much it can overlap another thread's forward (kernel launches need the GIL).

    python scripts/bench_token_write.py --tokens 32768 --dim 1280 --dtype float16 --repeats 5 --dir /tmp/tokbench

Prints, per step, the median seconds: table build, IPC write + fsync + rename, and the GIL share (the progress a
pure-Python counter thread makes during the write, relative to its progress alone). Then a simulated actor:
batches of a `--forward` seconds "forward" (a GIL-free wait, as a GPU sync is, plus GIL-bound launch work)
followed by the write, run one call at a time (Ray Data's default for a class UDF) and two calls with one forward
at a time (runner.stages.embed_stage's _device_lock): batches per second each way.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from runner.output.tokens import token_schema, token_table, write_token_file

T = TypeVar("T")


def make_batch(tokens: int, dim: int, dtype: str, per_seq: int = 340):
    lengths = np.full(tokens // per_seq, per_seq, dtype=np.int32)
    lengths[-1] += tokens - int(lengths.sum())
    ids = [f"seq{i}" for i in range(len(lengths))]
    array = np.random.default_rng(0).standard_normal((tokens, dim), dtype=np.float32).astype(dtype)  # [R, D]
    return ids, np.arange(len(ids), dtype=np.int64), [array], lengths


def write_once(directory: Path, batch, schema) -> tuple[float, float]:
    ids, ordinals, arrays, lengths = batch
    t0 = time.perf_counter()
    table = token_table(ids, ordinals, arrays, lengths, schema)
    t1 = time.perf_counter()
    write_token_file(directory, table)
    return t1 - t0, time.perf_counter() - t1


def counter_rate(seconds: float, stop: threading.Event | None = None) -> float:
    """Increments per second of a pure-Python loop (it needs the GIL to make progress)."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end and not (stop and stop.is_set()):
        n += 1
    return n / seconds


def gil_held(write: Callable[[], T], baseline: float = 0.5) -> tuple[float, T]:
    """(fraction of `write()`'s duration during which another Python thread could not run, what it returned).
    `baseline`: seconds the counter first runs alone, for its rate with the GIL to itself."""
    alone = counter_rate(baseline)
    count = [0]
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1
        count[0] = n

    thread = threading.Thread(target=spin)
    thread.start()
    started = time.perf_counter()
    result = write()
    elapsed = time.perf_counter() - started
    stop.set()
    thread.join()
    # With the GIL free the spinner gets it most of the time; held, it gets none. (Switch interval noise aside.)
    return max(0.0, 1.0 - count[0] / (alone * elapsed)), result


def gil_share(directory: Path, batch, schema) -> float:
    """Fraction of the write's duration during which another Python thread could not run."""
    return gil_held(lambda: write_once(directory, batch, schema))[0]


def simulated_actor(directory: Path, batch, schema, forward: float, batches: int, concurrent: bool) -> float:
    lock = threading.Lock()

    def call() -> None:
        with lock:  # one forward at a time on the "device"
            launch_end = time.perf_counter() + forward * 0.1
            while time.perf_counter() < launch_end:  # kernel launches: Python under the GIL
                pass
            time.sleep(forward * 0.9)  # waiting on the device: GIL free
        write_once(directory, batch, schema)

    started = time.perf_counter()
    if concurrent:
        remaining = list(range(batches))
        pick = threading.Lock()

        def worker() -> None:
            while True:
                with pick:
                    if not remaining:
                        return
                    remaining.pop()
                call()

        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for _ in range(batches):
            call()
    return batches / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--forward", type=float, default=0.0, help="simulated forward seconds (0: the write's median)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="tokbench-"))
    directory.mkdir(parents=True, exist_ok=True)
    schema = token_schema([33], args.dim, args.dtype)
    batch = make_batch(args.tokens, args.dim, args.dtype)
    size = batch[2][0].nbytes
    builds, writes = [], []
    for _ in range(args.repeats):
        b, w = write_once(directory, batch, schema)
        builds.append(b)
        writes.append(w)
    build, write = statistics.median(builds), statistics.median(writes)
    print(f"batch: {args.tokens} tokens x {args.dim} {args.dtype} = {size / 1e6:.1f} MB, dir {directory}")
    print(f"table build {build * 1e3:.2f} ms, write+fsync+rename {write * 1e3:.1f} ms "
          f"({size / write / 1e9:.2f} GB/s), total {(build + write) * 1e3:.1f} ms")
    shares = [gil_share(directory, batch, schema) for _ in range(3)]
    print(f"GIL held during the write path: {statistics.median(shares):.0%} of its duration")
    forward = args.forward or (build + write)
    batches = max(4, args.repeats)
    serial = simulated_actor(directory, batch, schema, forward, batches, concurrent=False)
    overlapped = simulated_actor(directory, batch, schema, forward, batches, concurrent=True)
    print(f"simulated actor, forward {forward * 1e3:.0f} ms: one call at a time {serial:.2f} batches/s, "
          f"two calls with one forward at a time {overlapped:.2f} batches/s ({overlapped / serial:.2f}x; "
          f"forward-bound limit {1 / forward:.2f})")
    for path in directory.glob("tok-*.arrow"):
        path.unlink()


if __name__ == "__main__":
    main()
