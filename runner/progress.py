"""A live progress line on stderr: sequences done, tokens/s, ETA against a background record count."""

from __future__ import annotations

import gzip
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

import pyarrow.parquet as pq


def count_records(paths: list[Path]) -> int:
    """Records in the inputs, counted cheaply (FASTA headers, Parquet metadata, CSV lines)."""
    total = 0
    for path in paths:
        name = path.name.lower()
        if name.endswith(".parquet"):
            total += pq.ParquetFile(path).metadata.num_rows
            continue
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        is_table = any(name.removesuffix(".gz").endswith(ext) for ext in (".csv", ".tsv"))
        marker = b"\n" if is_table else b">"
        count, last = 0, b"\n"
        with opener(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                count += chunk.count(marker)
                last = chunk[-1:]
        if is_table:
            count += 0 if last == b"\n" else 1  # last line without newline
            count -= 1  # header line
        total += max(count, 0)
    return total


class Progress:
    """Prints `N/M seqs  X tok/s  ETA` at most every `interval` seconds; counts total in a thread."""

    def __init__(self, paths: list[Path], enabled: bool, stream: TextIO = sys.stderr, interval: float = 2.0):
        self.enabled = enabled
        self.stream = stream
        self.interval = interval
        self.total: int | None = None
        self.start = time.monotonic()
        self._last_print = 0.0
        self._tty = hasattr(stream, "isatty") and stream.isatty()
        if enabled:
            threading.Thread(target=self._count, args=(paths,), daemon=True).start()

    def _count(self, paths: list[Path]) -> None:
        try:
            self.total = count_records(paths)
        except OSError:
            self.total = None  # the reader will report the real problem

    def update(self, records_done: int, tokens: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_print < self.interval:
            return
        self._last_print = now
        elapsed = max(now - self.start, 1e-9)
        rate = tokens / elapsed
        line = f"{records_done:,} seqs  {rate:,.0f} tok/s  {elapsed:,.0f}s"
        if self.total:
            frac = min(records_done / self.total, 1.0)
            eta = (elapsed / frac - elapsed) if frac > 0 else float("nan")
            line = f"{records_done:,}/{self.total:,} seqs ({frac:.0%})  {rate:,.0f} tok/s  ETA {_fmt(eta)}"
        if self._tty:
            self.stream.write("\r" + line.ljust(79))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
