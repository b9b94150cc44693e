"""What the parts' CRC-32 costs the driver: the real PartWriter writing 650M-width rows (1280 float32) with
its checksummed sink against the same writer on a plain file sink, interleaved, best of N; and zlib.crc32 alone.

    python scripts/bench_checksum.py --rows 65536 --dim 1280 --repeats 5 \
        --out benchmarks/results/2026-11-30-checksum-cost.json

The figure that matters is the driver's write rate with checksums against what a job feeds it: an 8-GPU 650M
job at ~300k tok/s per GPU and ~300 residues per sequence sends the driver ~8,000 rows/s (~41 MB/s of vectors).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runner.output import sink  # noqa: E402
from runner.output.sink import EmbeddedRows, PartWriter  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--rows-per-part", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
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
    crc_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        zlib.crc32(data)
        crc_times.append(time.perf_counter() - start)
    best_plain, best_summed = min(plain), min(summed)
    result = {
        "command": "python scripts/bench_checksum.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU only",
        # other jobs on the machine slow both writers alike (interleaved), but the absolute rates with them
        "load_average_1min_before_after": [load_before, round(os.getloadavg()[0], 1)],
        "rows": n, "dim": args.dim, "rows_per_part": args.rows_per_part, "bytes_written": size,
        "crc32_gb_per_s": round(len(data) / min(crc_times) / 1e9, 2),
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
