"""What the per-token CRC-32 takes from the thread that launches GPU work: a CPU proxy for the H200 A/B.

On an H200 the per-token checksum cost ~3.5 % of a per-token job (docs/fault-tolerance.md): the actor's write
time did not change, but the forwards slowed, because the CRC threads took CPU and the GIL from the call thread
launching the next forward's kernels. This script reproduces that pairing on CPU: a *launcher* thread runs tiny
torch ops in a loop (each one Python, the dispatcher and a GIL release/reacquire, as a CUDA kernel launch is;
`--launcher python` makes it a pure-Python loop instead) while a *writer* thread writes per-token files like an
actor's (token_table, FP16, ~340-residue rows; hidden temp name, fsync, rename) at a fixed rate through a
checksummed sink. Variants, alternated in rounds so that the machine's other load hits them alike:

  alone      no writer: the launcher's rate with the machine to itself (context only)
  nocrc      the files written, nothing summed (RUNNER_BENCH_NO_TOKEN_CRC)
  zlib_pool  the actor before 445e544: zlib.crc32 summed in 4 pieces on a 4-thread pool beside the write, the pieces'
             CRCs joined by a pure-Python crc32_combine
  zlib       zlib.crc32 on the writing thread (the fallback where isal does not import)
  isal_pool  ISA-L's CRC on the same 4-thread pool (whether the pool still pays with the fast CRC)
  isal       ISA-L's CRC on the writing thread: runner.output.checksums.ChecksummedFile as the actor uses it now

Reported per variant (ranges over the rounds): the launcher's ops/s, its ratio to `nocrc` in the same round (the
drop the CRC causes), and the writer's CPU seconds per GB written (process CPU minus the launcher's own, so pool
threads count), with the rate the writer reached; the median time to write one file; and the milliseconds of one
write during which a busy pure-Python thread made no progress. On a machine whose few cores run other jobs,
--one-core pins the process to one core so that the writer's CPU comes out of the launcher's share.

    python scripts/bench_crc_contention.py --rounds 10 --seconds 2 --gb-per-s 0.3 --one-core \
        --out benchmarks/results/2026-11-30-crc-contention-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_token_write import gil_held  # noqa: E402

from runner.output.checksums import CRC32_IMPL, ChecksummedFile, crc32, file_crc, write_through  # noqa: E402
from runner.output.tokens import token_schema, token_table  # noqa: E402

OLD_PIECES = 4  # the removed pool's threads and pieces per large write
OLD_PARALLEL_BYTES = 16 << 20  # the removed pool summed writes at least this large


# -- the path this change removed, kept here to measure against (runner.output.checksums before it) --

def _mult_mod_p(a: int, b: int) -> int:
    """a * b modulo CRC-32's polynomial (bit-reflected, as zlib's multmodp)."""
    m, product = 1 << 31, 0
    while m:
        if a & m:
            product ^= b
            if not a & (m - 1):
                break
        m >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1
    return product


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial, k = 0..31 (zlib's x2n_table)
for _ in range(31):
    _X2N.append(_mult_mod_p(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32 of A + B from crc32(A), crc32(B) and len(B) (zlib's crc32_combine), in pure Python as it was."""
    shift, k, n = 1 << 31, 3, len2
    while n:
        if n & 1:
            shift = _mult_mod_p(_X2N[k & 31], shift)
        n >>= 1
        k += 1
    return _mult_mod_p(shift, crc1) ^ crc2


class PooledFile(ChecksummedFile):
    """ChecksummedFile as it was: with `pool`, a large write summed in OLD_PIECES pieces on the pool's threads
    while this thread writes, the pieces joined with crc32_combine; `crc` is the CRC-32 function to use."""

    def __init__(self, path: Path, pool: ThreadPoolExecutor | None, crc: Callable[..., int]) -> None:
        super().__init__(path)
        self._pool, self._crc = pool, crc

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._pool is None or view.nbytes < OLD_PARALLEL_BYTES:
            self.crc = self._crc(view, self.crc)
            written = self._file.write(view)
        else:
            step = -(-view.nbytes // OLD_PIECES)
            pieces = [view[i : i + step] for i in range(0, view.nbytes, step)]
            sums = [self._pool.submit(self._crc, piece) for piece in pieces]
            written = self._file.write(view)
            for piece, piece_crc in zip(pieces, sums, strict=True):
                self.crc = crc32_combine(self.crc, piece_crc.result(), piece.nbytes)
        self.size += view.nbytes
        return written


def publish(directory: Path, table: pa.Table, sink: Callable[[Path], ChecksummedFile]) -> tuple[Path, int, int]:
    """write_token_file's steps with a chosen sink: hidden temp name, Arrow IPC, fsync, close, rename.
    Returns (path, bytes, CRC-32 as the sink computed it)."""
    name = f"tok-{uuid.uuid4().hex}.arrow"
    tmp = directory / f".{name}.tmp"
    out = sink(tmp)
    write_through(out, table)
    os.replace(tmp, directory / name)
    return directory / name, out.size, out.crc


def sinks(pool: ThreadPoolExecutor) -> dict[str, Callable[[Path], ChecksummedFile] | None]:
    return {
        "alone": None,
        "nocrc": lambda p: ChecksummedFile(p, summed=False),
        "zlib_pool": lambda p: PooledFile(p, pool, zlib.crc32),
        "zlib": lambda p: PooledFile(p, None, zlib.crc32),
        "isal_pool": lambda p: PooledFile(p, pool, crc32),
        "isal": lambda p: ChecksummedFile(p),
    }


# -- the two threads --

def launcher_loop(kind: str, stop: threading.Event, result: dict[str, float]) -> None:
    """Tiny ops until `stop`; records ops done and this thread's CPU seconds."""
    cpu0, n = time.thread_time(), 0
    if kind == "torch":
        import torch

        x = torch.ones(16)
        while not stop.is_set():
            for _ in range(100):
                x = x.mul(1.0001).add(-0.0001)  # two ops: dispatch, GIL released and taken back, as a launch
            n += 200
    else:
        while not stop.is_set():
            for i in range(100):
                _ = (i * 3 + 1) % 7  # pure Python, under the GIL
            n += 100
    result["ops"], result["cpu"] = n, time.thread_time() - cpu0


def run_window(kind: str, seconds: float, sink: Callable[[Path], ChecksummedFile] | None, table: pa.Table,
               directory: Path, gb_per_s: float) -> dict[str, float]:
    """One variant for `seconds`: the launcher's ops/s and the writer's GB written and CPU seconds."""
    stop, launched = threading.Event(), {}
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    launcher = threading.Thread(target=launcher_loop, args=(kind, stop, launched))
    started = time.perf_counter()
    launcher.start()
    written, files, durations = 0, 0, []
    period = table.nbytes / (gb_per_s * 1e9)  # seconds between files at the target rate
    next_at = started
    while time.perf_counter() - started < seconds:
        if sink is None:
            time.sleep(0.05)
            continue
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        write_started = time.perf_counter()
        path, size, _ = publish(directory, table, sink)
        durations.append(time.perf_counter() - write_started)
        path.unlink()
        written += size
        files += 1
        next_at += period
    stop.set()
    launcher.join()
    elapsed = time.perf_counter() - started
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    process_cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    writer_cpu = max(0.0, process_cpu - launched["cpu"])
    return {"launcher_ops_per_s": launched["ops"] / elapsed, "gb": written / 1e9, "files": files,
            "writer_cpu_seconds": writer_cpu, "gb_per_s": written / 1e9 / elapsed, "seconds": elapsed,
            "write_ms": 1e3 * statistics.median(durations) if durations else 0.0}


def blocked_ms_per_file(directory: Path, table: pa.Table, sink: Callable[[Path], ChecksummedFile]) -> float:
    """Milliseconds of one file's write during which a busy pure-Python thread made no progress (bench_token_write.
    gil_held): the GIL held, or with --one-core the core taken; 0 when it ran as fast as alone."""
    def timed() -> tuple[Path, float]:
        started = time.perf_counter()
        path = publish(directory, table, sink)[0]
        return path, time.perf_counter() - started

    share, (path, elapsed) = gil_held(timed, baseline=0.3)
    path.unlink()
    return 1e3 * share * elapsed


def per_token_table(tokens: int, dim: int) -> pa.Table:
    lengths = np.full(max(1, tokens // 340), 340, dtype=np.int32)  # ~340 residues, as UniRef50's median
    lengths[-1] += tokens - int(lengths.sum())
    vectors = np.random.default_rng(0).standard_normal((tokens, dim), dtype=np.float32).astype(np.float16)  # [R, D]
    return token_table([f"UniRef50_{i:09d}" for i in range(len(lengths))], np.arange(len(lengths), dtype=np.int64),
                       [vectors], lengths, token_schema([33], dim, "float16"))


def spread(values: list[float], digits: int = 3) -> list[float]:
    """[min, median, max]"""
    return [round(min(values), digits), round(statistics.median(values), digits), round(max(values), digits)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each runs every variant once, alternating")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per variant per round")
    parser.add_argument("--gb-per-s", type=float, default=0.3,
                        help="the writer's target rate (one H200 writes ~0.85 GB/s of 650M FP16 per-token vectors)")
    parser.add_argument("--tokens", type=int, default=32768, help="residues per file (one packed batch)")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--blocked-repeats", type=int, default=5,
                        help="single writes timed for how long they stop a busy Python thread")
    parser.add_argument("--launcher", default="torch", choices=["torch", "python"])
    parser.add_argument("--one-core", action="store_true",
                        help="pin the process to one core: the writer's CPU then comes out of the launcher's share, "
                             "which the other jobs on a small shared machine otherwise blur")
    parser.add_argument("--variants", default="alone,nocrc,zlib_pool,zlib,isal_pool,isal")
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                        help="where the files go (default /dev/shm: the disk's noise is not what is measured)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.one_core:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    table = per_token_table(args.tokens, args.dim)
    names = args.variants.split(",")
    load_before = round(os.getloadavg()[0], 1)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, ThreadPoolExecutor(OLD_PIECES) as pool:
        directory = Path(tmp)
        chosen = sinks(pool)
        for name in names:  # every summing variant gives the file's real CRC-32
            if chosen[name] is not None and name != "nocrc":
                path, size, crc = publish(directory, table, chosen[name])
                assert file_crc(path) == (f"{crc:08x}", size), name
                path.unlink()
        blocked_ms = {name: spread([blocked_ms_per_file(directory, table, chosen[name]) for _ in range(args.blocked_repeats)], 1)
                      for name in names if chosen[name] is not None}
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]  # alternate the order too: no variant always first
            for name in order:
                runs[name].append(run_window(args.launcher, args.seconds, chosen[name], table, directory,
                                             args.gb_per_s))
            print(f"round {r + 1}: " + ", ".join(f"{n} {runs[n][-1]['launcher_ops_per_s']:.0f}" for n in names),
                  file=sys.stderr)
    result: dict[str, Any] = {
        "command": "python scripts/bench_crc_contention.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
        "load_average_1min_before_after": [load_before, round(os.getloadavg()[0], 1)],
        "crc32_in_use": CRC32_IMPL, "launcher": args.launcher, "one_core": args.one_core, "bytes_per_file": table.nbytes,
        "target_gb_per_s": args.gb_per_s, "seconds_per_window": args.seconds, "rounds": args.rounds,
        "ranges": "[min, median, max] over the rounds",
        "notes": {
            "launcher_vs_nocrc": "launcher ops/s over the same round's nocrc window's: the drop the CRC causes",
            "writer_cpu_seconds_per_gb": "process CPU (user + sys) minus the launcher thread's, per GB written: "
                                         "the writer's thread and any pool threads",
            "write_ms_per_file": "median wall time of one file's write in each window (temp name, fsync, rename)",
            "python_blocked_ms_per_file": "one file's write beside a busy pure-Python thread (no launcher): ms that "
                                          "thread made no progress (GIL held, or with --one-core the core taken)",
        },
        "variants": {},
    }
    for name in names:
        entry: dict[str, Any] = {"launcher_ops_per_s": spread([w["launcher_ops_per_s"] for w in runs[name]], 0)}
        if "nocrc" in runs and name != "nocrc":  # paired with the same round's no-CRC window
            entry["launcher_vs_nocrc"] = spread([w["launcher_ops_per_s"] / b["launcher_ops_per_s"]
                                                 for w, b in zip(runs[name], runs["nocrc"], strict=True)])
        if name != "alone":
            entry["writer_cpu_seconds_per_gb"] = spread([w["writer_cpu_seconds"] / w["gb"] for w in runs[name]])
            entry["gb_per_s_reached"] = spread([w["gb_per_s"] for w in runs[name]])
            entry["write_ms_per_file"] = spread([w["write_ms"] for w in runs[name]], 1)  # median in each window
            entry["python_blocked_ms_per_file"] = blocked_ms[name]
        result["variants"][name] = entry
    text = json.dumps(result, indent=2)
    text = re.sub(r"\[\s+([-\d.e,\s]+?)\s+\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]",
                  text)  # lists of numbers on one line
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
