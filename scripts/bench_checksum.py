"""What the CRC-32 checksums cost. Two modes:

Parts (default): the real PartWriter writing 650M-width rows (1280 float32) with its checksummed sink against the
same writer on a plain file sink, interleaved, best of N; and the CRC-32 alone (runner.output.checksums.crc32,
ISA-L's where isal imports, and zlib.crc32 for comparison).

    python scripts/bench_checksum.py --rows 65536 --dim 1280 --repeats 5 \
        --out benchmarks/results/2026-11-30-checksum-cost.json

The figure that matters is the driver's write rate with checksums against what a job feeds it: an 8-GPU 650M
job at ~300k tok/s per GPU and ~300 residues per sequence sends the driver ~8,000 rows/s (~41 MB/s of vectors).

--per-token: one packed batch's per-token file as an embedding actor writes it (runner.output.tokens.
write_token_file: checksummed sink, fsync, rename; the CRC on the writing thread), against the same file written
by pyarrow itself with nothing summed (as before per-token checksums), interleaved, best of N; and how much of
each write holds the GIL (the actor's other call launches the next forward meanwhile, which needs the GIL), and
how much of one CRC of the file's bytes does (the CRC in use, zlib.crc32, and a plain copy that keeps it).
scripts/bench_crc_contention.py measures what the CRC takes from such a launching thread, and the pool the
actor used to sum in pieces.

    python scripts/bench_checksum.py --per-token --tokens 32768 --dim 1280 --dtype float16 --repeats 7 \
        --out benchmarks/results/2026-11-30-checksum-cost-per-token.json

There the figure that matters is the actor's extra CPU time per second at the rate one H200 writes: 650M at
~330k residues/s is ~0.85 GB/s of FP16 per-token vectors (1.7 GB/s FP32), on a write thread that overlaps the
next forward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_token_write import gil_held  # noqa: E402

from runner.output import sink  # noqa: E402
from runner.output.checksums import CRC32_IMPL, crc32  # noqa: E402
from runner.output.sink import EmbeddedRows, PartWriter  # noqa: E402
from runner.output.tokens import token_schema, token_table, write_token_file  # noqa: E402


class PlainPartWriter(PartWriter):
    """The PartWriter as it was before checksums: pyarrow writes the file directly, nothing is summed."""

    def _open(self) -> None:
        name = f"part-{self.next_part:05d}.arrow"
        self._tmp = self.dir / f".{name}.tmp"
        self._file = _NoSum(self._tmp)
        self._writer = pa.ipc.new_file(str(self._tmp), self.schema)
        self._rows_in_open_part = 0
        self._opened_at = time.monotonic()


class _NoSum:
    """Stands in for ChecksummedFile in PlainPartWriter (pyarrow owns the real file)."""

    def __init__(self, path: Path) -> None:
        self.path, self.crc, self.size = path, 0, 0

    def fsync(self) -> None:
        sink._fsync(self.path)
        self.size = self.path.stat().st_size

    def close(self) -> None:
        pass


def write_seconds(cls: type[PartWriter], rows: EmbeddedRows, dim: int, rows_per_part: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        writer = cls(Path(tmp), dim, rows_per_part)
        start = time.perf_counter()
        for i in range(0, len(rows), 1024):  # the driver writes one delivered table at a time
            end = min(i + 1024, len(rows))
            writer.write(EmbeddedRows(rows.ids[i:end], rows.lengths[i:end], rows.truncated[i:end],
                                      rows.vectors[i:end], rows.ordinals[i:end]))
        writer.close()
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (Path(tmp) / "embeddings").glob("part-*.arrow"))
    return seconds, size


def plain_token_file(directory: Path, table: pa.Table) -> Path:
    """write_token_file as it was before checksums: pyarrow writes the file itself, fsync, rename; nothing summed."""
    name = f"tok-{uuid.uuid4().hex}.arrow"
    tmp = directory / f".{name}.tmp"
    with pa.OSFile(str(tmp), "wb") as out, pa.ipc.new_file(out, table.schema) as writer:
        writer.write_table(table)
    sink._fsync(tmp)
    os.replace(tmp, directory / name)
    return directory / name


def summed_token_file(directory: Path, table: pa.Table) -> Path:
    """The actor's write (runner.output.tokens.write_token_file): CRC-32 as the bytes go out, fsync, rename."""
    return directory / write_token_file(directory, table).name


def crc_gb_per_s(crc: Callable[[bytes], int], data: bytes, repeats: int) -> float:
    """One thread's best rate over `repeats` sums of `data`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        crc(data)
        times.append(time.perf_counter() - start)
    return len(data) / min(times) / 1e9


def per_token_main(args: argparse.Namespace) -> dict:
    lengths = np.full(args.tokens // 340, 340, dtype=np.int32)  # ~340-residue sequences, as UniRef50's median
    lengths[-1] += args.tokens - int(lengths.sum())
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((args.tokens, args.dim), dtype=np.float32).astype(args.dtype)
              for _ in range(args.layers)]  # per layer [R, D]
    layers = list(range(33, 33 - args.layers, -1))
    table = token_table([f"UniRef50_{i:09d}" for i in range(len(lengths))], np.arange(len(lengths), dtype=np.int64),
                        arrays, lengths, token_schema(layers, args.dim, args.dtype))
    load_before = round(os.getloadavg()[0], 1)
    plain, summed, size = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        writes: list[tuple[Callable[[], Path], list[float]]] = [
            (lambda: plain_token_file(directory, table), plain),
            (lambda: summed_token_file(directory, table), summed),  # as the actor writes
        ]
        for _ in range(args.repeats):  # interleaved: a busy machine slows all alike
            for write, times in writes:
                started = time.perf_counter()
                path = write()
                times.append(time.perf_counter() - started)
                size = path.stat().st_size
                path.unlink()
        gil = [statistics.median(gil_held(write, baseline=0.3)[0] for _ in range(3)) for write, _ in writes]
        for path in directory.glob("tok-*.arrow"):
            path.unlink()
    data = b"".join(a.tobytes() for a in arrays)
    best_plain, best_summed = min(plain), min(summed)
    crc_rate = crc_gb_per_s(crc32, data, args.repeats)  # GB/s of one thread: the CPU work the CRC adds to the actor
    # share of one sum of the file's bytes during which a busy Python thread could not run: ~0 where the CRC
    # releases the GIL; a copy of the same bytes (bytearray(), which keeps the GIL) shows what holding it reads as
    gil_crc = [statistics.median(gil_held(lambda f=f: f(data), baseline=0.3)[0] for _ in range(5))
               for f in (crc32, zlib.crc32, bytearray)]
    return {
        "command": "python scripts/bench_checksum.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
        # other jobs on the machine slow both writes alike (interleaved), but the absolute rates with them
        "load_average_1min_before_after": [load_before, round(os.getloadavg()[0], 1)],
        "tokens": args.tokens, "dim": args.dim, "dtype": args.dtype, "layers": args.layers,
        "sequences": len(lengths), "bytes_per_file": size,
        "crc32_in_use": CRC32_IMPL,
        "crc32_gb_per_s": round(crc_rate, 2),
        "zlib_crc32_gb_per_s": round(crc_gb_per_s(zlib.crc32, data, args.repeats), 2),
        "write_seconds_plain_best": round(best_plain, 4),
        "write_seconds_checksummed_best": round(best_summed, 4),  # the actor's write
        "write_seconds_plain_all": [round(x, 4) for x in plain],
        "write_seconds_checksummed_all": [round(x, 4) for x in summed],
        "gb_per_s_plain": round(size / best_plain / 1e9, 3),
        "gb_per_s_checksummed": round(size / best_summed / 1e9, 3),
        "checksum_overhead": round(best_summed / best_plain - 1, 4),
        # share of the write during which the GIL was held (the actor's other call needs it to launch kernels)
        "gil_held_plain_checksummed": [round(g, 3) for g in gil],
        "gil_held_during_crc32_isal_zlib": [round(g, 3) for g in gil_crc[:2]],
        "gil_held_during_copy_of_the_bytes": round(gil_crc[2], 3),
        # CPU seconds per second the CRC adds to one actor at one H200's 650M per-token rate (see the docstring),
        # from the CRC's own rate (the wall-clock difference above is mostly fsync noise on a shared disk)
        "actor_core_fraction_at_0.85_gb_per_s_fp16": round(0.85 / crc_rate, 3),
        "actor_core_fraction_at_1.7_gb_per_s_fp32": round(1.7 / crc_rate, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--rows-per-part", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-token", action="store_true", help="time a per-token file's write instead of parts")
    parser.add_argument("--tokens", type=int, default=32768, help="--per-token: residues in the file (one batch)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="--per-token: vector dtype")
    parser.add_argument("--layers", type=int, default=1, help="--per-token: layers stored")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.per_token:
        result = per_token_main(args)
        print(json.dumps(result, indent=2))
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return
    rng = np.random.default_rng(0)
    n = args.rows
    rows = EmbeddedRows([f"UniRef50_{i:09d}" for i in range(n)], rng.integers(50, 1000, n).astype(np.int32),
                        np.zeros(n, bool), rng.standard_normal((n, args.dim)).astype(np.float32),
                        np.arange(n, dtype=np.int64))
    load_before = round(os.getloadavg()[0], 1)
    plain, summed = [], []
    for _ in range(args.repeats):  # interleaved: a busy machine slows both alike
        plain.append(write_seconds(PlainPartWriter, rows, args.dim, args.rows_per_part)[0])
        seconds, size = write_seconds(PartWriter, rows, args.dim, args.rows_per_part)
        summed.append(seconds)
    data = rows.vectors.tobytes()
    best_plain, best_summed = min(plain), min(summed)
    result = {
        "command": "python scripts/bench_checksum.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
        # other jobs on the machine slow both writers alike (interleaved), but the absolute rates with them
        "load_average_1min_before_after": [load_before, round(os.getloadavg()[0], 1)],
        "rows": n, "dim": args.dim, "rows_per_part": args.rows_per_part, "bytes_written": size,
        "crc32_in_use": CRC32_IMPL,
        "crc32_gb_per_s": round(crc_gb_per_s(crc32, data, args.repeats), 2),
        "zlib_crc32_gb_per_s": round(crc_gb_per_s(zlib.crc32, data, args.repeats), 2),
        "write_seconds_plain_best": round(best_plain, 3),
        "write_seconds_checksummed_best": round(best_summed, 3),
        "write_seconds_plain_all": [round(x, 3) for x in plain],
        "write_seconds_checksummed_all": [round(x, 3) for x in summed],
        "rows_per_s_plain": round(n / best_plain),
        "rows_per_s_checksummed": round(n / best_summed),
        "checksum_overhead": round(best_summed / best_plain - 1, 4),
        # the driver time the checksums take at an 8-GPU 650M job's ~8,000 rows/s (see the docstring)
        "driver_core_fraction_at_8000_rows_per_s": round(8000 * (best_summed - best_plain) / n, 4),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
