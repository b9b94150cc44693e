"""What the terminal shows, and the job's log file `DIR/runner.log`.

A healthy `runner embed` prints runner's own lines only: what is being done, one live progress display
(`runner.driver.progress`) and one summary. Everything Ray and Ray Data say goes to `DIR/runner.log`, beside the
outputs: their Python loggers and, unless `-v`, whatever Ray's C++ core worker writes to
the driver's stderr. `-v` shows all of it on the terminal too (and Python's deprecation warnings); runner's
own warnings, other libraries' warnings, Python warnings that are not deprecations, and every error (Ray's
included) stay on the terminal either way, but Ray Data's: it logs a failed task with its whole traceback, which
runner then reports as one line (runner.driver.collect.stream_failure), so without -v Ray Data's records go to the
file only.

Why the native stderr is captured rather than fixed at its source: Ray Data creates its actor pool's workers
with its DataContext and the stage's MapTransformer passed through the object store, and pool actors
restart by default (`max_restarts=-1`, as ours must: fault tolerance relies on it). Ray's core worker then
logs an ERROR on every healthy run (ray-project/ray#53727, open; docs/running.md says why runner cannot avoid it). The arguments it warns about are owned by
the driver and referenced by Ray Data for the whole execution, so the restarts it worries about work (the
actor-crash tests restart actors); our own constructor argument (StageSettings) is a few hundred bytes.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

from runner import __version__

LOG_NAME = "runner.log"  # the job's log file, in --out

# Loggers whose records go to the job's log file; only runner's own reach the terminal without -v.
RAY_LOGGERS = ("ray", "ray.data")
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ConsoleFormatter(logging.Formatter):
    """runner's lines as a user reads them: INFO plain, warnings and errors prefixed with their level."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        if record.levelno < logging.INFO:
            return f"debug {record.name}: {message}"
        return message


class StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever `sys.stderr` is at the time (the progress display and the
    native-stderr capture below both swap it), not to the stream that was current when it was made."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


# Modules that run inside an embedding actor: what they say below WARNING (the model loaded, its kernels) is for
# the log file. On Ray it is said in the actor's own process; an in-process job (runner.driver.in_process) says it
# in this one, and the terminal keeps to the job's own lines.
ACTOR_SIDE_LOGGERS = ("runner.models", "runner.stages", "runner.kernels")


def not_actor_detail(record: logging.LogRecord) -> bool:
    """A console filter: False for an actor-side module's record below WARNING (shown with -v)."""
    return record.levelno >= logging.WARNING or not record.name.startswith(ACTOR_SIDE_LOGGERS)


def configure_console(verbose: int) -> None:
    """The CLI's terminal: runner's INFO lines and up (DEBUG with -vv), and Python's deprecation warnings
    only with -v (Ray's own code raises several on every run, none of which a user can act on)."""
    runner_log = logging.getLogger("runner")
    runner_log.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    for handler in [h for h in runner_log.handlers if isinstance(h, StderrHandler)]:
        runner_log.removeHandler(handler)
    handler = StderrHandler()
    handler.setFormatter(ConsoleFormatter())
    if not verbose:
        handler.addFilter(not_actor_detail)
    runner_log.addHandler(handler)
    if verbose:
        warnings.simplefilter("default")


class JobLog:
    """`with JobLog(out_dir, verbose):` sends Ray's and Ray Data's logs to DIR/runner.log for the job.

    Ray's and Ray Data's loggers lose their own console handlers and pass their records to the root logger,
    which writes them (and runner's own lines) to the file and shows errors (everything, with -v) on the
    terminal. Without `verbose`, file descriptor 2 (where native code writes) points at the
    file while `sys.stderr` keeps writing to the terminal. Everything is put back on exit.
    """

    def __init__(self, out_dir: Path, verbose: int = 0) -> None:
        self.path = out_dir / LOG_NAME
        self.verbose = verbose
        self._file: TextIO | None = None
        self._handlers: list[tuple[logging.Logger, logging.Handler]] = []  # added here, removed on exit
        self._removed: list[tuple[logging.Logger, logging.Handler]] = []  # Ray's console handlers, put back on exit
        self._saved: list[tuple[logging.Logger, int, bool]] = []  # (logger, level, propagate) before
        self._saved_fd: int | None = None
        self._saved_stderr: TextIO | None = None
        self._terminal: TextIO | None = None
        self._routed: set[str] = set()  # RAY_LOGGERS already sent to the file

    def __enter__(self) -> JobLog:
        # Ray sets up its logger when imported: import_ray() routes it after that (an in-process job never imports
        # it). Ray Data (a second's import) does the same for "ray.data"; import_ray_data() imports and routes it.
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 (closed in __exit__)
        self._file.write(f"\n==== runner {__version__}, pid {os.getpid()}, {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: "
                         f"{' '.join(sys.argv)}\n")
        level = logging.DEBUG if self.verbose > 1 else logging.INFO
        to_file = logging.StreamHandler(self._file)
        to_file.setFormatter(logging.Formatter(FILE_FORMAT))
        to_file.setLevel(level)
        to_terminal = StderrHandler()
        to_terminal.setFormatter(logging.Formatter("(%(name)s) %(levelname)s: %(message)s"))
        to_terminal.setLevel(logging.INFO if self.verbose else logging.WARNING)
        own_console = any(isinstance(h, StderrHandler) for h in logging.getLogger("runner").handlers)
        to_terminal.addFilter(lambda record: self._for_terminal(record, own_console))
        root = logging.getLogger()
        self._set(root, min(root.level or logging.WARNING, level), root.propagate)
        self._add(root, to_file)
        self._add(root, to_terminal)
        self._route_ray_loggers()
        if not self.verbose:
            self._capture_native_stderr()
        return self

    def import_ray(self) -> Any:
        """Import Ray and send its logger to the file; returns the module."""
        import ray

        self._route_ray_loggers()
        return ray

    def import_ray_data(self) -> None:
        """Import Ray Data and send its logger to the file like Ray's (Ray Data configures it when imported)."""
        import ray.data  # noqa: F401

        self._route_ray_loggers()

    def _route_ray_loggers(self) -> None:
        """Ray's and Ray Data's loggers (those imported) lose their console handlers and pass their records on."""
        # Ray (at import) and Ray Data (likewise) give their loggers console handlers and propagate=False; and
        # ray.init(configure_logging=False) clears the "ray" logger's handlers, so nothing is attached there.
        for name in RAY_LOGGERS:
            if name in self._routed or name not in sys.modules:  # a module's logger is configured by its import
                continue
            self._routed.add(name)
            logger = logging.getLogger(name)
            self._set(logger, logger.level, True)
            for handler in list(logger.handlers):
                if _is_console(handler):
                    logger.removeHandler(handler)
                    self._removed.append((logger, handler))

    def _for_terminal(self, record: logging.LogRecord, runner_has_console: bool) -> bool:
        """Which records the root logger shows: Ray's from ERROR (all with -v; Ray Data's only with -v), other
        libraries' from WARNING, runner's only when its logger has no console of its own (the CLI's has: not
        twice)."""
        if record.name == "runner" or record.name.startswith("runner."):
            return not runner_has_console
        if record.name == "ray.data" or record.name.startswith("ray.data."):
            # Ray Data logs a failed task at ERROR with its whole traceback (~180 lines) before the exception
            # reaches the driver, which reports it as one line (runner.driver.collect.stream_failure): file only.
            return self.verbose > 0
        if record.name == "ray" or record.name.startswith("ray."):
            return self.verbose > 0 or record.levelno >= logging.ERROR
        return True

    def _set(self, logger: logging.Logger, level: int, propagate: bool) -> None:
        self._saved.append((logger, logger.level, logger.propagate))
        logger.setLevel(level)
        logger.propagate = propagate

    def _add(self, logger: logging.Logger, handler: logging.Handler) -> None:
        logger.addHandler(handler)
        self._handlers.append((logger, handler))

    def _capture_native_stderr(self) -> None:
        """Point fd 2 at the log file; keep `sys.stderr` on the terminal when it was writing to fd 2."""
        assert self._file is not None
        try:
            sys.stderr.flush()
            self._saved_fd = os.dup(2)
        except (OSError, ValueError):  # no fd 2 (some embedded interpreters): nothing native to capture
            return
        if _writes_to_fd2(sys.stderr):
            terminal = io.TextIOWrapper(
                io.FileIO(os.dup(self._saved_fd), "w"), encoding=getattr(sys.stderr, "encoding", None) or "utf-8",
                errors="backslashreplace", line_buffering=True,
            )
            self._saved_stderr, self._terminal, sys.stderr = sys.stderr, terminal, terminal
        os.dup2(self._file.fileno(), 2)

    def __exit__(self, *exc: object) -> None:
        if self._saved_fd is not None:
            try:
                sys.stderr.flush()
            finally:
                os.dup2(self._saved_fd, 2)
                os.close(self._saved_fd)
                if sys.stderr is self._terminal:
                    sys.stderr = self._saved_stderr
                if self._terminal is not None:
                    self._terminal.close()
        for logger, handler in self._handlers:
            logger.removeHandler(handler)
        for logger, handler in self._removed:
            logger.addHandler(handler)
        for logger, level, propagate in reversed(self._saved):
            logger.setLevel(level)
            logger.propagate = propagate
        if self._file is not None:
            self._file.close()


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to stdout/stderr (Ray's PlainRayHandler, a StreamHandler), not to a file."""
    if isinstance(handler, logging.FileHandler) or type(handler).__name__ == "SessionFileHandler":
        return False
    return isinstance(handler, logging.StreamHandler)


def _writes_to_fd2(stream: TextIO) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False  # click's CliRunner, pytest's capsys: Python-level streams, not fd 2
