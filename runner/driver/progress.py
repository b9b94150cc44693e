"""The live progress display on stderr, drawn by rich: sequences and tokens done/total, tok/s, ETA, busy
actors (from their own clocks) and the shadow's comparisons. When stderr is not a terminal (a log, a batch
job), a plain line every `interval` seconds instead.

Rates and busy actors are read over the last RATE_WINDOW seconds: Ray delivers outputs in bursts, and the
start-up before the first batch is not the rate a user waits on.
"""

from __future__ import annotations

import gzip
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, TaskID, TextColumn
from rich.progress import Progress as RichProgress

RATE_WINDOW = 20.0  # seconds of history behind the rates, ETA and busy figures
PLAIN_INTERVAL = 5.0  # seconds between plain lines when stderr is not a terminal
_HEADER = re.compile(rb"^>[^\n]*", re.MULTILINE)


@dataclass
class InputCount:
    """What the inputs hold, counted cheaply before or while the job runs."""

    records: int = 0
    residues: int | None = None  # sequence characters, FASTA only (None when any input is a table)

    def tokens(self, tokens_per_residue: float = 1.0) -> int | None:
        """Tokens the inputs will take: residues (times `tokens_per_residue`) plus two specials a record; None when
        the residues were not counted."""
        if self.residues is None:
            return None
        return round(self.residues * tokens_per_residue) + 2 * self.records


def count_records(paths: list[Path]) -> int:
    """Records in the inputs (FASTA headers, Parquet metadata, CSV lines)."""
    return count_inputs(paths).records


def count_inputs(paths: list[Path]) -> InputCount:
    """Records in the inputs, and the residues of FASTA inputs (line bytes that are not headers)."""
    total = InputCount(residues=0)
    for path in paths:
        name = path.name.lower()
        if name.endswith(".parquet"):
            total.records += pq.ParquetFile(path).metadata.num_rows
            total.residues = None
            continue
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        if any(name.removesuffix(".gz").endswith(ext) for ext in (".csv", ".tsv")):
            total.records += _count_table_rows(opener, path)
            total.residues = None
            continue
        records, residues = _count_fasta(opener, path)
        total.records += records
        if total.residues is not None:
            total.residues += residues
    return total


def _count_table_rows(opener, path: Path) -> int:
    count, last = 0, b"\n"
    with opener(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    count += 0 if last == b"\n" else 1  # last line without newline
    return max(count - 1, 0)  # header line


def _count_fasta(opener, path: Path) -> tuple[int, int]:
    """(records, residues): whole lines are counted per 16-MiB chunk, a partial last line waits for the next."""
    records = residues = 0
    carry = b""
    with opener(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 24)
            data = carry + chunk
            if chunk:
                cut = data.rfind(b"\n") + 1
                data, carry = data[:cut], data[cut:]
            headers = _HEADER.findall(data)
            records += len(headers)
            residues += len(data) - data.count(b"\n") - data.count(b"\r") - sum(map(len, headers))
            if not chunk:
                return records, residues


@dataclass(frozen=True)
class Snapshot:
    """The job's counters at one moment (time.monotonic())."""

    at: float
    records: int
    tokens: int
    busy_seconds: float  # the actors' busy clocks summed


class Progress:
    """`update()` as outputs arrive, `finish()` at the end; nothing at all when not `enabled`."""

    def __init__(
        self,
        paths: list[Path],
        enabled: bool,
        actors: int = 1,
        unit: str = "GPU",
        tokens_per_residue: float | None = None,
        stream: TextIO | None = None,
        interval: float = PLAIN_INTERVAL,
        count: InputCount | None = None,
    ) -> None:
        self.enabled = enabled
        self.start = time.monotonic()
        self.actors = actors
        self.unit = unit  # "GPU" or "CPU": what the busy figure counts
        self.tokens_per_residue = tokens_per_residue  # ESM-2: 1 token per residue (+2 per sequence); None: unknown
        self.interval = interval
        # the inputs' size: given when the job counted them already (a small input), else counted on a thread
        self.count: InputCount | None = count
        self._history: deque[Snapshot] = deque()
        self._last_plain = float("-inf")  # the first update writes a line
        self._line = ""
        self._written_records = -1  # records done in the last plain line written
        self._rich: RichProgress | None = None
        self._task: TaskID | None = None
        self._stream = stream
        if not enabled:
            return
        if count is None:
            threading.Thread(target=self._count, args=(paths,), daemon=True).start()
        console = Console(file=stream, stderr=stream is None, highlight=False)
        if console.is_terminal:
            self._rich = RichProgress(
                BarColumn(bar_width=20),
                TextColumn("{task.fields[line]}"),
                console=console,
                refresh_per_second=2,
                redirect_stderr=True,  # runner's log lines print above the display
            )
            self._task = self._rich.add_task("", total=None, line="starting")
            self._rich.start()

    def _count(self, paths: list[Path]) -> None:
        try:
            self.count = count_inputs(paths)
        except (OSError, EOFError, ValueError):
            self.count = None  # the reader will report the real problem

    @property
    def total_records(self) -> int | None:
        return self.count.records if self.count is not None else None

    @property
    def total_tokens(self) -> int | None:
        """Tokens the inputs will take, estimated from their residues (None when unknown)."""
        if self.count is None or self.tokens_per_residue is None:
            return None
        return self.count.tokens(self.tokens_per_residue)

    def update(self, records: int, tokens: int, busy_seconds: float = 0.0, shadow: tuple[int, int] | None = None,
               force: bool = False, first_batch_start: float | None = None) -> None:
        """The job's counters now: records done, tokens embedded, the actors' busy seconds, (compared,
        violations) of the shadow, and when (time.time()) the first batch began: the rates' origin, until the
        window has moved past it (a short job's outputs may all arrive at once)."""
        if not self.enabled:
            return
        now = time.monotonic()
        if first_batch_start is not None and not self._history:
            origin = now - max(time.time() - first_batch_start, 0.0)
            self._history.append(Snapshot(origin, 0, 0, 0.0))
        self._history.append(Snapshot(now, records, tokens, busy_seconds))
        while len(self._history) > 2 and now - self._history[1].at >= RATE_WINDOW:
            self._history.popleft()
        self._line = self.describe(records, tokens, shadow)
        if self._rich is not None and self._task is not None:
            total = self.total_records
            self._rich.update(self._task, total=total, completed=records, line=self._line)
        elif (force and records != self._written_records) or now - self._last_plain >= self.interval:
            self._write_plain(self._line, records)

    def describe(self, records: int, tokens: int, shadow: tuple[int, int] | None) -> str:
        """One line: `1,234/5,000 seqs · 0.4M/1.6M tokens · 310,552 tok/s · ETA 1m05s · 7.9/8 GPUs busy · shadow ...`."""
        total, total_tokens = self.total_records, self.total_tokens
        parts = [f"{records:,}/{total:,} seqs" if total is not None else f"{records:,} seqs"]
        parts.append(f"{_short(tokens)}/~{_short(total_tokens)} tokens" if total_tokens else f"{_short(tokens)} tokens")
        rate, record_rate, busy = self.rates()
        parts.append(f"{rate:,.0f} tok/s")
        eta = None
        if total is not None and records >= total:
            eta = 0.0
        elif total_tokens and rate > 0:
            eta = max(total_tokens - tokens, 0) / rate
        elif total is not None and record_rate > 0:
            eta = max(total - records, 0) / record_rate
        parts.append(f"ETA {_duration(eta)}")
        parts.append(f"{busy:.1f}/{self.actors} {self.unit}s busy")
        if shadow is not None:
            parts.append(f"shadow {shadow[0]:,} compared, {shadow[1]:,} violations")
        return " · ".join(parts)

    def rates(self) -> tuple[float, float, float]:
        """(tokens/s, records/s, busy actors) over the last RATE_WINDOW seconds of updates."""
        if len(self._history) < 2:
            return 0.0, 0.0, 0.0
        first, last = self._history[0], self._history[-1]
        span = last.at - first.at
        if span <= 0:
            return 0.0, 0.0, 0.0
        busy = min((last.busy_seconds - first.busy_seconds) / span, float(self.actors))
        return (last.tokens - first.tokens) / span, (last.records - first.records) / span, max(busy, 0.0)

    def _write_plain(self, line: str, records: int) -> None:
        self._last_plain = time.monotonic()
        self._written_records = records
        stream = self._stream or sys.stderr
        elapsed = time.monotonic() - self.start
        stream.write(f"[{_duration(elapsed)}] {line}\n")
        stream.flush()

    def finish(self) -> None:
        """Stop the live display (its last state stays on screen); a last plain line otherwise."""
        if not self.enabled:
            return
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
        elif self._line and self._history and self._history[-1].records != self._written_records:
            self._write_plain(self._line, self._history[-1].records)
        self.enabled = False


def _short(n: int | None) -> str:
    if n is None:
        return "?"
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)


def _duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:  # unknown or NaN
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
