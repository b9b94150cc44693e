"""The driver's Ray: joined or started in a thread beside the rest of the start-up, and a local one ended at once.

Light on purpose (no torch, numpy or Ray at import): the CLI imports it at every exit, `runner --help` included.

Why a thread, and why it never ends: a local Ray takes seconds to start (its GCS, dashboard, raylet and agents are
processes of their own; 5-10 s, most of it waiting on them), which the driver spends importing Ray Data, hashing the
checkpoint and fingerprinting the inputs (runner.job). Ray starts its processes with PR_SET_PDEATHSIG (they get
SIGKILL when their parent dies), and Linux sends that signal when the *thread* that started them ends: a thread
that returned after ray.init took the GCS and the raylet with it (seen: "Failed to connect to GCS within 60
seconds"). So the thread that starts a local Ray stays, idle, until the process exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from runner.errors import RunnerError, first_line

RAY_START_THREAD = "runner-ray-start"  # the thread's name: the CLI's exit looks for it (ray_started_here)


def connect_ray(address: str | None, verbose: int = 0, dashboard: bool = True, preload: tuple[str, ...] = ()):
    """Join `address` / RAY_ADDRESS when given, else start a local Ray (or reuse this process's).

    The actors' own output reaches the driver only with `verbose` (it stays in Ray's session logs). `dashboard`
    False starts a local Ray without its dashboard's modules (2-3 s sooner; docs/running.md); a cluster keeps
    whatever dashboard it runs. `preload`: modules every worker of a local Ray imports when it starts, before it
    takes work (Ray's preload_python_modules; worker_preload says when).
    """
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context() and _existing_context()
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target is None:
        # "local" starts a new Ray: with no address Ray would join any cluster started on this machine
        # (`ray start`, another user's job) through /tmp/ray/ray_current_cluster.
        target = "local"
    options: dict[str, Any] = {}
    if target == "local" and not dashboard:
        options["include_dashboard"] = False
    if target == "local" and preload:
        options["_system_config"] = {"preload_python_modules": list(preload)}
    try:
        return ray.init(
            address=target, log_to_driver=bool(verbose), logging_level=logging.INFO, configure_logging=False,
            **options,
        )
    except ConnectionError as e:
        raise RunnerError(
            f"cannot reach the Ray cluster at {target} ({e}): check --address / RAY_ADDRESS"
        ) from None
    except Exception as e:  # Ray raises a bare Exception when its processes do not come up in time
        if target != "local":
            raise
        raise RunnerError(
            f"could not start a local Ray ({first_line(e)}): Ray gives its processes 30 s, so a machine short of "
            f"CPU or memory can miss it; retry when it is less busy, or start one with `ray start --head` and "
            f"pass --address"
        ) from None


def worker_preload(gpus: int | None, address: str | None, gpus_here: Callable[[], bool]) -> tuple[str, ...]:
    """Modules a local Ray's workers import as they start: ("torch",) for a job on this machine's GPUs, else none.

    Ray starts one worker per CPU as the driver connects, and the first embedding actor lands on one of them; its
    own start then imports torch (2.5-3 s) before its __init__ runs (`actor_start`). Preloaded, that import runs
    while the driver sets up the stream. Every worker pays it, the Ray Data helper actors' too: cheap beside the
    many cores of a GPU host, a loss on a small CPU machine (docs/running.md), so CPU jobs do not preload. Only
    torch itself: importing it does not initialise CUDA, so Ray's CUDA_VISIBLE_DEVICES, set when an actor is
    placed, still decides its GPU. RUNNER_WORKER_PRELOAD=0/1 forces it off/on (benchmarks).
    """
    forced = os.environ.get("RUNNER_WORKER_PRELOAD", "")
    if forced in ("0", "1"):
        return ("torch",) if forced == "1" else ()
    if address or os.environ.get("RAY_ADDRESS") or gpus == 0:
        return ()  # a cluster's workers are started by its nodes; a CPU job
    return ("torch",) if gpus or gpus_here() else ()


class RayStart:
    """`connect()` (connect_ray) run in a thread of its own from construction; `wait()` returns its result.

    The thread stays alive after a connect that started a local Ray (see the module's docstring); otherwise it ends.
    """

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(connect,), name=RAY_START_THREAD, daemon=True)
        self._thread.start()

    def _run(self, connect: Callable[[], Any]) -> None:
        had_local = local_ray_processes()
        try:
            self._result = connect()
        except BaseException as e:  # handed to the main thread by wait()
            self._error = e
        finally:
            self._done.set()
        if local_ray_processes() and not had_local:
            threading.Event().wait()  # the parent of Ray's processes: ending would SIGKILL them

    def wait(self) -> Any:
        """The connect's result (or its exception, raised here). A signal handler that raises in the main thread
        interrupts the wait (runner.driver.signals): the start-up stops while Ray is still starting."""
        while not self._done.wait(0.2):
            pass
        if self._error is not None:
            raise self._error
        return self._result


def ray_started_here() -> bool:
    """Whether a RayStart thread of this process started a local Ray or is still starting one (its processes,
    even half started, end with this process only if it exits at once: end_now)."""
    return any(t.name == RAY_START_THREAD and t.is_alive() for t in threading.enumerate())


def local_ray_processes() -> int:
    """How many Ray processes (GCS, raylet, dashboard, ...) this process started and still holds: 0 when Ray is
    not imported, not running, or joined as a client of a cluster (--address), whose processes are not ours."""
    worker = getattr(sys.modules.get("ray"), "_private", None)
    node = getattr(getattr(worker, "worker", None), "_global_node", None)
    return len(getattr(node, "all_processes", None) or {})


def end_now(code: int | str | None) -> NoReturn:
    """End the `runner` process at once with exit status `code` (as sys.exit takes it), SIGKILLing the local Ray
    this process started; for the very end of a command, once every output is closed and the manifest final.

    Ray's own end (ray.shutdown at exit) stops its processes one by one, giving each up to a second, and the
    interpreter then garbage-collects torch's, Ray's and Arrow's objects: 2 s and 11 s on a loaded 2-core
    machine, after the job's last line. The raylet takes its workers (the actors) with it; stdout and stderr
    are closed first, so that Ray's C++ code noticing its processes gone prints nothing on a finished job. Without a
    local Ray (--address) only the interpreter's teardown is skipped. A Ray still starting (a signal during the
    start-up) has no process list yet: its processes get SIGKILL from the kernel as this process ends
    (PR_SET_PDEATHSIG, see the module's docstring).
    """
    if isinstance(code, str):  # sys.exit("message"): the message, status 1
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()  # flushes every handler, runner.log included
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if local_ray_processes() or ray_started_here():
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)  # Ray's driver-side log monitor prints its "(raylet) Raylet is terminated ..." to stdout
            os.dup2(devnull, 2)
    if local_ray_processes():
        import ray

        with contextlib.suppress(Exception):  # private API: without it, Ray's processes die with us anyway
            ray._private.worker._global_node.kill_all_processes(check_alive=False, allow_graceful=False, wait=False)
    os._exit(code or 0)


def _existing_context():
    """Context-like object for a Ray that this process started earlier (tests, notebooks)."""
    import ray

    class _Ctx:
        dashboard_url = ray.worker.get_dashboard_url() if hasattr(ray, "worker") else None

    return _Ctx()
