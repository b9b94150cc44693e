"""Where a job's start-up went: the manifest's `startup` section and the one line printed after the first output.

Driver-side phases are timed where they run (`StartupClock.phase`); actor-side phases come from the first
output of each embedding actor (`EmbedStage.startup_report`, the `startup` column), on the actors' own
wall clocks. Phases that run side by side (BESIDE_RAY: Ray starts in a thread of its own while the driver imports
Ray Data, hashes the checkpoint and fingerprints the inputs) are recorded with their own durations; the line and
`to_first_output_seconds` follow the critical path. `stream_setup_detail` splits `stream_setup` by step.

The job's end is timed the same way (`StartupClock.ending`, the manifest's `ending` section): the last batch done
on an actor -> the stream ended on the driver -> the FP32 shadow drained -> the outputs closed and the manifest
final. After that the process only exits (runner.driver.ray_session.end_now).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


def process_started_at() -> float | None:
    """time.time() this process started (Linux: /proc), or None where that is not known."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of proc(5): starttime, clock ticks after boot
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


# Phases that run beside `ray_start` (runner.job): not on the critical path unless longer than Ray's start.
BESIDE_RAY = ("checkpoint_read_and_hash", "input_fingerprint", "driver_imports", "gpu_memory_read")
# The steps of `stream_setup` timed on their own (runner.job), each a clock phase of that name.
STREAM_SETUP_STEPS = ("node_checks", "token_budget", "resume_scan", "build_stream", "shadow_start")


@dataclass
class StartupClock:
    """Marks (time.time()) and durations of a job's start-up, driver and actors."""

    command_at: float | None = field(default_factory=process_started_at)  # the command started (process start)
    job_at: float = field(default_factory=time.time)  # run_embed was called
    seconds: dict[str, float] = field(default_factory=dict)  # driver phases: name -> seconds
    marks: dict[str, float] = field(default_factory=dict)  # driver events: name -> time.time()
    actors: dict[str, dict[str, Any]] = field(default_factory=dict)  # worker -> its startup_report
    worker_preload: list[str] = field(default_factory=list)  # modules a local Ray's workers imported as they started

    @contextmanager
    def phase(self, name: str):
        """Time a block as phase `name` (seconds; a phase run twice adds up)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def mark(self, name: str, at: float | None = None) -> None:
        """Record an event once (the first time it happens)."""
        self.marks.setdefault(name, time.time() if at is None else at)

    def first_actor(self) -> dict[str, Any] | None:
        """The report of the actor that became ready first (it embedded the first batch)."""
        ready = [report for report in self.actors.values() if report.get("ready_at")]
        return min(ready, key=lambda report: report["ready_at"]) if ready else None

    def section(self) -> dict[str, Any]:
        """The manifest's `startup` section: seconds per phase, on one timeline from the command's start."""
        origin = self.command_at or self.job_at
        actor = self.first_actor()
        stream_at = self.marks.get("stream_started")
        first_output = self.marks.get("first_output")
        ray_begin, ray_ready = self.marks.get("ray_start_begin"), self.marks.get("ray_ready")
        # An in-process job (runner.driver.in_process) has no Ray: its set-up begins where Ray's start would.
        setup_begin = self.marks.get("in_process_begin")
        # Consecutive phases (they add up to to_first_output_seconds on one host), and those BESIDE_RAY.
        phases: dict[str, float | None] = {
            "python_and_imports": self.job_at - origin if self.command_at else None,
            # checks, the model's config and codec, the output dir and its lock, the log and Ray's import (and
            # --strict's full read)
            "inputs_and_checks": (ray_begin or setup_begin) - self.job_at if ray_begin or setup_begin else None,
            # Ray's start begun (a thread of its own) -> connected; beside it, in the driver's other threads:
            "ray_start": ray_ready - ray_begin if ray_begin and ray_ready else None,
            "checkpoint_read_and_hash": self.seconds.get("checkpoint_read_and_hash"),  # beside ray_start
            "input_fingerprint": self.seconds.get("input_fingerprint"),  # beside ray_start
            "driver_imports": self.seconds.get("driver_imports"),  # beside ray_start: Ray Data's import
            # Ray up -> the stream starts: the rest of the hash and the input scan if longer than Ray's start,
            # then STREAM_SETUP_STEPS (stream_setup_detail): nodes checked, the token budget (a GPU memory
            # probe), resume checks, building the stream, starting the shadow.
            # (in-process: from the end of the checks, the hash and the input scan included)
            "stream_setup": stream_at - (ray_ready or setup_begin) if stream_at and (ray_ready or setup_begin) else None,
            "actor_start": None,  # scheduling the actor, its worker process, imports (torch: not if worker_preload)
            "weights_to_device": None,  # the actor's __init__ but compiling: checkpoint read, weights to device
            "compile": None,
            "first_batch": None,  # the actor ready -> its first batch done (reading, packing, the forward)
            "delivery": None,  # that batch -> the driver has its rows
        }
        if "gpu_memory_read" in self.seconds:  # beside ray_start, GPU jobs with the automatic token budget only:
            phases["gpu_memory_read"] = self.seconds["gpu_memory_read"]  # nvidia-smi's reading of the free memory
        if actor is not None and stream_at is not None:
            # in-process the stage is built in the runner's own process: there is no actor to start
            phases["actor_start"] = actor["init_at"] - stream_at if setup_begin is None else None
            phases["weights_to_device"] = actor["ready_at"] - actor["init_at"] - actor["compile_seconds"]
            phases["compile"] = actor["compile_seconds"]
            if actor.get("first_batch_done_at"):
                phases["first_batch"] = actor["first_batch_done_at"] - actor["ready_at"]
                if first_output is not None:
                    phases["delivery"] = first_output - actor["first_batch_done_at"]
        return {
            "engine": "in-process" if setup_begin is not None else "ray",
            "command_started": origin,
            "to_first_output_seconds": round(first_output - origin, 3) if first_output else None,
            "phases": {k: None if v is None else round(max(v, 0.0), 3) for k, v in phases.items()},
            "stream_setup_detail": {k: round(self.seconds[k], 3) for k in STREAM_SETUP_STEPS if k in self.seconds},
            "worker_preload": self.worker_preload,  # runner.driver.ray_session.worker_preload
            "compile_cache": (actor or {}).get("compile_cache"),  # the first actor's TorchInductor cache dir
            "actors": self.actors,
        }

    def line(self) -> str:
        """One line for the terminal: `start-up 7.9 s to the first embedding: python 1.2 s, Ray 2.3 s, ...`."""
        section = self.section()
        total = section["to_first_output_seconds"]
        p = section["phases"]
        names = [
            ("python_and_imports", "python"), ("inputs_and_checks", "inputs"), ("ray_start", "Ray"),
            ("stream_setup", "setup"), ("actor_start", "actor start"), ("weights_to_device", "weights"),
            ("compile", "compile"), ("first_batch", "first batch"), ("delivery", "delivery"),
        ]
        parts = [f"{label} {p[key]:.1f} s" for key, label in names if p.get(key) is not None]
        beside = [f"{label} {p[key]:.1f} s" for key, label in (("checkpoint_read_and_hash", "checkpoint"),
                                                                ("input_fingerprint", "input scan"),
                                                                ("driver_imports", "imports"),
                                                                ("gpu_memory_read", "GPU memory"))
                  if p.get(key) is not None]
        head = f"start-up {total:.1f} s to the first embedding" if total is not None else "start-up"
        listed = ", ".join(beside[:-1]) + " and " + beside[-1] if len(beside) > 1 else "".join(beside)
        where = "within setup" if section["engine"] == "in-process" else "beside Ray's start"
        tail = f" ({listed} {where})" if beside else ""
        return f"{head}: {', '.join(parts)}{tail}"

    def ending(self, last_batch_done: float | None) -> dict[str, Any]:
        """The manifest's `ending` section: seconds from the last batch done on an actor (its own clock) to the
        manifest's final write, by phase. Written last thing before the process exits, so `manifest_final_at`
        (time.time()) lets a benchmark time the exit itself."""
        stream_end, shadow, closed = (self.marks.get(k) for k in ("stream_ended", "shadow_drained", "outputs_closed"))
        before_close = shadow or stream_end
        phases = {
            # the rows of the last batch reach the driver, Ray Data's executor shuts down
            "stream_end": stream_end - last_batch_done if stream_end and last_batch_done else None,
            "shadow_drain": shadow - stream_end if shadow and stream_end else None,  # comparisons still running
            "close_outputs": closed - before_close if closed and before_close else None,  # parts, rejects, tokens
        }
        return {
            "last_batch_done": last_batch_done,
            "phases": {k: None if v is None else round(max(v, 0.0), 3) for k, v in phases.items()},
            "manifest_final_at": time.time(),
        }
