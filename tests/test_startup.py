"""Start-up: the compile cache an actor really uses, Ray's start beside the driver's, and the fast end of a local Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, pythonpath_with

# Run in a fresh process, as an embedding actor's worker is: torch._inductor is imported first (importing it sets
# TORCHINDUCTOR_CACHE_DIR to torch's /tmp default in that process, as happened in the H200's embedding actors),
# then the stage is built with compiling on. Compiling itself is skipped (eager; a CPU compile takes minutes
# here): what is checked is where TorchInductor would write, as the stage reports it and as torch resolves it.
ACTOR = """
import json, os, sys
import torch._inductor.config  # noqa: F401  (what something in the worker did before the actor's __init__)
imported_default = os.environ["TORCHINDUCTOR_CACHE_DIR"]
from runner.models.esm2 import ESM2Embedder
ESM2Embedder.use_compile = lambda self, on, backend="inductor": False
from runner.stages.embed_stage import EmbedStage, StageSettings
stage = EmbedStage(StageSettings(sys.argv[1], "fp32", -1, "mean", "cpu", compile_layers=True,
                                 compile_cache_dir=sys.argv[2]))
from torch._inductor.runtime.cache_dir_utils import cache_dir
print(json.dumps({"imported_default": imported_default, "reported": stage.startup_report()["compile_cache"],
                  "torch_uses": cache_dir()}))
"""


def run_actor(checkpoint: Path, cache: Path, chosen: str = "", inductor_env: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": pythonpath_with(REPO), "RUNNER_CACHE_DIR": str(cache)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    if inductor_env is not None:
        env["TORCHINDUCTOR_CACHE_DIR"] = inductor_env
    done = subprocess.run([sys.executable, "-c", ACTOR, str(checkpoint), chosen], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_actor_uses_runner_compile_cache_even_after_torch_set_its_default(tmp_path: Path, tiny_esm2_path: Path) -> None:
    from runner.driver.cache import torch_default_compile_dir

    seen = run_actor(tiny_esm2_path, tmp_path / "cache")
    assert seen["imported_default"] == torch_default_compile_dir()  # the trap is really there
    ours = str(tmp_path / "cache" / "torch-compile")
    assert seen["reported"] == seen["torch_uses"] == ours
    assert (tmp_path / "cache" / "torch-compile").is_dir()


def test_actor_uses_the_directory_the_user_chose(tmp_path: Path, tiny_esm2_path: Path) -> None:
    """TORCHINDUCTOR_CACHE_DIR set by the user on the driver travels in the settings; one set in the worker's own
    environment (a cluster's) is kept when no choice came from the driver."""
    chosen = str(tmp_path / "mine")
    seen = run_actor(tiny_esm2_path, tmp_path / "cache", chosen=chosen)
    assert seen["reported"] == seen["torch_uses"] == chosen
    node = str(tmp_path / "node")
    seen = run_actor(tiny_esm2_path, tmp_path / "cache", inductor_env=node)
    assert seen["reported"] == seen["torch_uses"] == node


def test_chosen_compile_cache_dir_ignores_torch_default(monkeypatch) -> None:
    from runner.driver.cache import chosen_compile_cache_dir, torch_default_compile_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert chosen_compile_cache_dir() is None
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", torch_default_compile_dir())
    assert chosen_compile_cache_dir() is None
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/data/inductor")
    assert chosen_compile_cache_dir() == "/data/inductor"


def ray_processes_under(directory: str) -> list[str]:
    """Command lines of the live processes that name `directory` (a Ray session's GCS, raylet, workers...)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and directory in cmdline:
            found.append(cmdline)
    return found


def test_embed_ends_its_local_ray_at_once(tmp_path: Path, tiny_esm2_path: Path) -> None:
    """The command ends right after its summary: the manifest is final before, and no process of the local Ray it
    started (GCS, raylet, actors) outlives it; nothing from Ray's end reaches the terminal."""
    import tempfile
    import time

    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "PYTHONPATH": pythonpath_with(REPO), "RAY_TMPDIR": ray_tmp, "RUNNER_CACHE_DIR": str(tmp_path / "c")}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "emb"
    done = subprocess.run([sys.executable, "-m", "runner", "embed", "tests/data/some_proteins.fasta", "--model",
                           str(tiny_esm2_path), "--out", str(out), "--gpus", "0", "--no-progress"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1].startswith("15 embeddings, 0 rejects"), done.stderr
    assert not [line for line in done.stderr.splitlines() if "ERROR" in line or "Warning" in line], done.stderr
    # runner's own lines are all on stderr; Ray's log monitor printed "(raylet) Raylet is terminated ..." and 20
    # lines of the raylet's log to stdout when the local Ray was killed, until stdout was closed first too
    assert done.stdout == "", done.stdout
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"
    deadline = time.monotonic() + 15  # the raylet's workers notice it is gone within moments
    while ray_processes_under(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes_under(ray_tmp) == []
    shutil.rmtree(ray_tmp, ignore_errors=True)


class ScriptedGpus:
    """ray.available_resources() reading from a script of free-GPU figures (the last one repeats)."""

    def __init__(self, free: list[float]) -> None:
        self.free = list(free)

    def available_resources(self) -> dict:
        return {"GPU": self.free.pop(0) if len(self.free) > 1 else self.free[0]}


def test_gpu_shadow_starts_once_the_embedders_hold_their_shares() -> None:
    """Two embedders of 0.75 GPU each: the shadow starts when 1.5 GPUs are taken, not before (Ray packs
    fractional GPUs: shadows placed first would leave no GPU with room for the second embedder)."""
    import threading

    from runner.driver.cluster import start_when_placed

    started = []
    ray = ScriptedGpus([2.0, 2.0, 1.25, 1.25, 0.5])
    assert start_when_placed(ray, lambda: started.append(len(ray.free)), 1.5, threading.Event(), poll=0.0)
    assert started == [1]  # at the fifth reading, 0.5 free: both embedders placed
    never = ScriptedGpus([2.0, 1.25])
    assert not start_when_placed(never, lambda: started.append("early"), 1.5, threading.Event(), timeout=0.3,
                                 poll=0.01)
    done = threading.Event()
    done.set()  # the job ended first: a later job's actors taking GPUs must not start this one's shadow
    assert not start_when_placed(ScriptedGpus([2.0, 0.0]), lambda: started.append("late"), 1.5, done, poll=0.0)
    assert started == [1]


@pytest.mark.gpu
def test_gpu_shadow_loads_beside_the_embedder(tmp_path: Path, tiny_esm2_path: Path) -> None:
    """On one GPU the FP32 shadow actor's __init__ begins before the first embeddings reach the driver (it used
    to start at the first sample, which comes with them), and the job's end does not wait on its start-up."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    env = {**os.environ, "PYTHONPATH": pythonpath_with(REPO), "RUNNER_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "emb"
    done = subprocess.run([sys.executable, "-m", "runner", "embed", "tests/data/some_proteins.fasta", "--model",
                           str(tiny_esm2_path), "--out", str(out), "--gpus", "1", "--shadow-rate", "1.0",
                           "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    startup, shadow = manifest["startup"], manifest["shadow"]
    assert shadow["compared"] == 15
    first_output = startup["command_started"] + startup["to_first_output_seconds"]
    (shadow_actor,) = shadow["actor_startup"]
    assert shadow_actor["init_at"] < first_output, (shadow_actor, startup)
    assert manifest["ending"]["phases"]["shadow_drain"] is not None


def test_move_weights_on_cpu_is_module_to(tiny_esm2_path: Path) -> None:
    import torch

    from runner.models.registry import load_model
    from runner.stages.embed_stage import move_weights

    expected = load_model(str(tiny_esm2_path)).to("cpu", torch.bfloat16).state_dict()
    moved = move_weights(load_model(str(tiny_esm2_path)), torch.device("cpu"), torch.bfloat16).state_dict()
    assert moved.keys() == expected.keys()
    assert all(torch.equal(moved[k], expected[k]) and moved[k].dtype == expected[k].dtype for k in expected)


@pytest.mark.gpu
def test_gpu_weights_cross_in_their_stored_dtype_and_are_cast_there(tiny_esm2_path: Path) -> None:
    """move_weights (copy, then cast on the GPU) stores exactly what Module.to(cuda, half) stores, keeps the LM head
    tied to the embedding and integer buffers integer; the actor reports the CUDA start it overlapped with the read."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from runner.models.registry import load_model
    from runner.stages.embed_stage import EmbedStage, StageSettings, move_weights

    cuda = torch.device("cuda", 0)
    expected = load_model(str(tiny_esm2_path)).to(cuda, torch.float16)
    moved = move_weights(load_model(str(tiny_esm2_path)), cuda, torch.float16)
    want, got = expected.state_dict(), moved.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].device.type == "cuda" and got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name
    assert moved.esm.lm_head.weight is moved.esm.embed_tokens.weight
    stage = EmbedStage(StageSettings(str(tiny_esm2_path), "fp16", -1, "mean", "cuda"))
    report = stage.startup_report()
    assert report["cuda_seconds"] >= 0 and report["to_device_seconds"] > 0  # CUDA is up already in this process
    # the load is the read then the move, each rounded to the ms on its own
    assert abs(report["checkpoint_seconds"] + report["to_device_seconds"] - report["load_seconds"]) <= 2e-3


# --- Ray's start in a thread of its own, beside the driver's other start-up work ----------------------------


def test_help_imports_neither_torch_nor_ray(tmp_path: Path) -> None:
    """`runner --help` answers without importing torch, Ray or numpy (the CLI's exit used to import torch: 6 s)."""
    probe = ("import sys\nfrom runner.cli import main\nsys.argv = ['runner', '--help']\ntry:\n    main()\n"
             "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'ray', 'numpy', 'pyarrow') if m in sys.modules),"
             " file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": pythonpath_with(REPO)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "runner embed" in done.stdout  # the help itself
    assert done.stderr.strip().splitlines()[-1] == "[]", done.stderr


def test_ray_start_hands_back_result_or_error_and_keeps_a_local_rays_thread(monkeypatch) -> None:
    """RayStart runs the connect in its own thread; its result or exception comes back from wait(). The thread
    outlives a connect that started a local Ray (Ray's processes get SIGKILL when the thread that started them
    ends), and ends after one that did not (a cluster joined, or a Ray this process already had)."""
    import threading

    from runner.driver import ray_session
    from runner.driver.ray_session import RAY_START_THREAD, RayStart, ray_started_here
    from runner.errors import RunnerError

    def threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == RAY_START_THREAD]

    assert not threads()
    joined = RayStart(lambda: threading.current_thread().name)
    assert joined.wait() == RAY_START_THREAD  # the connect ran in the start thread, not here
    joined._thread.join(5)
    assert not threads() and not ray_started_here()

    def failing() -> None:
        raise RunnerError("could not start a local Ray (...)")

    with pytest.raises(RunnerError, match="could not start a local Ray"):
        RayStart(failing).wait()

    processes = iter([0, 5])  # none before the connect, Ray's five after it
    monkeypatch.setattr(ray_session, "local_ray_processes", lambda: next(processes))
    started = RayStart(lambda: "context")
    assert started.wait() == "context"
    started._thread.join(0.5)
    assert started._thread.is_alive() and ray_started_here()


def test_a_signal_interrupts_the_wait_for_ray(monkeypatch) -> None:
    """While Ray starts in its thread, a signal's handler (runner.driver.signals raises in the main thread) stops the
    wait at once: the start-up ends without waiting for Ray to come up."""
    import signal
    import threading
    import time

    from runner.driver.ray_session import RayStart
    from runner.driver.signals import StopSignals, _StopNow

    release = threading.Event()
    starting = RayStart(lambda: release.wait(30))  # a Ray that takes 30 s to start
    signals = StopSignals(waiting=True)
    signals.install()
    try:
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        began = time.monotonic()
        with pytest.raises(_StopNow) as stop:
            starting.wait()
        assert time.monotonic() - began < 5
        assert stop.value.signum == signal.SIGTERM
    finally:
        signals.restore()
        release.set()


def test_no_dashboard_starts_a_local_ray_without_it(monkeypatch) -> None:
    """--no-dashboard: a local Ray starts with include_dashboard=False; by default Ray's own choice (it runs when its
    packages are installed); a cluster joined by address gets no such option."""
    import ray

    from runner.cli import build_config
    from runner.driver.ray_session import connect_ray

    calls: list[dict] = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    connect_ray(None)
    connect_ray(None, dashboard=False)
    connect_ray("ray://head:10001", dashboard=False)
    assert "include_dashboard" not in calls[0]
    assert calls[1]["include_dashboard"] is False and calls[1]["address"] == "local"
    assert "include_dashboard" not in calls[2]
    assert build_config(None, dashboard=False).dashboard is False and build_config(None).dashboard is True


@pytest.mark.slow
def test_embed_with_no_dashboard(tmp_path: Path, tiny_esm2_path: Path) -> None:
    """`runner embed --no-dashboard` runs the job on a local Ray without a dashboard, and says so."""
    env = {**os.environ, "PYTHONPATH": pythonpath_with(REPO), "RUNNER_CACHE_DIR": str(tmp_path / "c")}
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "emb"
    done = subprocess.run([sys.executable, "-m", "runner", "embed", "tests/data/some_proteins.fasta", "--model",
                           str(tiny_esm2_path), "--out", str(out), "--gpus", "0", "--no-progress", "--no-dashboard"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Ray dashboard: off (--no-dashboard)" in done.stderr.splitlines(), done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["rows"] == 15
    assert manifest["dashboard_url"] is None and manifest["settings"]["dashboard"] is False


def test_worker_preload_only_for_a_local_ray_on_this_machines_gpus(monkeypatch) -> None:
    """torch is preloaded into a local Ray's workers for a GPU job (many cores); not for CPU jobs, where the Ray Data
    helper actors' useless imports cost more than the embedding actor gains, nor for a cluster's workers."""
    from runner.driver.ray_session import worker_preload

    monkeypatch.delenv("RUNNER_WORKER_PRELOAD", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    no_gpus, gpus = (lambda: False), (lambda: True)
    assert worker_preload(None, None, gpus) == ("torch",) and worker_preload(2, None, no_gpus) == ("torch",)
    assert worker_preload(None, None, no_gpus) == () and worker_preload(0, None, gpus) == ()
    assert worker_preload(2, "ray://head:10001", gpus) == ()
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert worker_preload(2, None, gpus) == ()
    monkeypatch.setenv("RUNNER_WORKER_PRELOAD", "1")
    assert worker_preload(0, None, no_gpus) == ("torch",)
    monkeypatch.setenv("RUNNER_WORKER_PRELOAD", "0")
    monkeypatch.delenv("RAY_ADDRESS")
    assert worker_preload(2, None, gpus) == ()


PRELOAD_PROBE = """
import os, sys
from runner.driver.ray_session import RayStart, connect_ray
import ray
RayStart(lambda: connect_ray(None, dashboard=False, preload=("colorsys",))).wait()
@ray.remote(num_cpus=0)
def seen():
    return "colorsys" in sys.modules  # a module nothing in Ray or runner imports
print("preloaded" if ray.get(seen.remote()) else "not preloaded", flush=True)
os._exit(0)
"""


@pytest.mark.slow
def test_a_local_rays_workers_import_the_preloaded_modules(tmp_path: Path) -> None:
    """connect_ray's `preload` reaches a local Ray's workers: a module is imported before any task runs there."""
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": pythonpath_with(REPO), "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, "-c", PRELOAD_PROBE], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == "preloaded", done.stdout + done.stderr
        without = subprocess.run([sys.executable, "-c", PRELOAD_PROBE.replace('preload=("colorsys",)', "")],
                                 cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert without.stdout.strip().splitlines()[-1] == "not preloaded", without.stdout + without.stderr
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_the_actor_reports_where_its_init_went(tiny_esm2_path: Path) -> None:
    """The actor's start-up report splits __init__: cache setup, load (read + move), setup, compile setup, compile;
    together they cover ready_at - init_at (the manifest's weights_to_device + compile)."""
    from runner.stages.embed_stage import EmbedStage, StageSettings

    stage = EmbedStage(StageSettings(str(tiny_esm2_path), "fp32", -1, "mean", "cpu"))
    r = stage.startup_report()
    parts = ("cache_setup_seconds", "load_seconds", "setup_seconds", "compile_setup_seconds", "compile_seconds")
    assert all(r[k] >= 0 for k in parts)
    assert abs(r["checkpoint_seconds"] + r["to_device_seconds"] - r["load_seconds"]) <= 2e-3
    covered = sum(r[k] for k in parts)
    assert covered <= r["ready_at"] - r["init_at"] + 5e-3
    assert covered >= 0.9 * (r["ready_at"] - r["init_at"]) - 0.05  # nothing big left out of the split
