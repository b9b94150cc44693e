"""Ctrl-C / SIGTERM handling for a job: the first signal stops taking new work, a second stops at once."""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import RunnerError

log = logging.getLogger("runner")


class JobInterrupted(RunnerError):
    """SIGINT/SIGTERM stopped the job; complete parts are kept and a rerun resumes. Exit 128 + signal."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    @classmethod
    def during_startup(cls, signum: int) -> JobInterrupted:
        name = signal.Signals(signum).name
        return cls(
            f"interrupted by {name} during start-up, before any embedding was written: rerun the same command "
            "to start again",
            128 + signum,
        )

    @classmethod
    def after(cls, signum: int, out_dir: Path, parts: int, hard: bool) -> JobInterrupted:
        name = signal.Signals(signum).name
        how = "stopped at once" if hard else "stopped after the finished batches"
        return cls(
            f"interrupted by {name} ({how}): {parts} complete part(s) in {out_dir / 'embeddings'}; "
            "rerun the same command to resume",
            128 + signum,
        )


class _StopNow(BaseException):
    """Raised by the signal handler to leave a blocking wait on the stream (a BaseException, like
    KeyboardInterrupt, so that no `except Exception` inside Ray swallows it)."""

    def __init__(self, signum: int, hard: bool) -> None:
        super().__init__(signum, hard)
        self.signum = signum
        self.hard = hard


@dataclass
class StopSignals:
    """SIGINT/SIGTERM for one run: the first stops taking new work, the second stops at once.

    The first signal only sets `signum` while the driver is writing (so a table is never half-handled),
    and interrupts the driver when it is blocked waiting for the stream (nothing is half-done then).
    Handlers are installed only in the main thread and restored when the run ends.
    """

    signum: int | None = None
    waiting: bool = False  # the driver is blocked on the stream: safe to interrupt it
    _previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)  # installed again (after ray.init): restore the first one

    @contextmanager
    def deferred(self):
        """A block a first signal does not interrupt even while the driver waits on the stream (an in-process
        stream's forward: runner.driver.in_process); the signal is noted and the stream stops after the block."""
        waiting, self.waiting = self.waiting, False
        try:
            yield
        finally:
            self.waiting = waiting

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            raise _StopNow(signum, hard=True)
        self.signum = signum
        # No logging here: the handler may run while the main thread holds the logging lock.
        os.write(
            2,
            f"\n{signal.Signals(signum).name}: finishing the batches already received, then stopping "
            "(send it again to stop at once)\n".encode(),
        )
        if self.waiting:
            raise _StopNow(signum, hard=False)
