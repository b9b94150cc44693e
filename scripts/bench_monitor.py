"""Running the benchmark's subprocesses and watching them: log lines, the child environment, a sampler of
the child's RSS (/proc, its whole process tree) and of GPU memory and utilization (nvidia-smi), and the name
of the GPU ("cpu" without nvidia-smi)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _proc_status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat fields 14 and 15), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _nvidia_smi(query: str, what: str = "--query-gpu") -> list[list[str]]:
    try:
        text = subprocess.run(["nvidia-smi", f"{what}={query}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[c.strip() for c in line.split(",")] for line in text.strip().splitlines() if line.strip()]


class Monitor:
    """Samples, while a child runs: its RSS and peak RSS (/proc), the RSS sum of its process tree (Ray
    services and workers; counts shared memory once per process, so an upper bound), and GPU memory used
    per GPU and per process (nvidia-smi, MiB; what the CUDA caching allocator holds, not just live tensors)."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.driver_rss_kb = 0
        self.driver_hwm_kb = 0
        self.driver_cpu_seconds = 0.0  # user + system CPU of the driver process, last sample (/proc/<pid>/stat)
        self._started = time.monotonic()
        self._last_sample = self._started
        self.tree_rss_kb = 0
        self.gpu_used_mib: dict[str, int] = {}
        self.util_samples: list[tuple[float, int]] = []  # (time, highest utilization.gpu % of any GPU)
        self.proc_gpu_mib: dict[str, int] = {}
        self.has_smi = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        page_kb = os.sysconf("SC_PAGE_SIZE") // 1024
        tick = 0
        while not self._stop.is_set():
            rss = _proc_status_kb(self.pid, "VmRSS")
            hwm = _proc_status_kb(self.pid, "VmHWM")
            if rss:
                self.driver_rss_kb = max(self.driver_rss_kb, rss)
            if hwm:
                self.driver_hwm_kb = max(self.driver_hwm_kb, hwm)
            cpu = _proc_cpu_seconds(self.pid)
            if cpu is not None:
                self.driver_cpu_seconds, self._last_sample = cpu, time.monotonic()
            if tick % 2 == 0:
                total = 0
                for pid in _descendants(self.pid):
                    try:
                        with open(f"/proc/{pid}/statm") as f:
                            total += int(f.read().split()[1]) * page_kb
                    except OSError:
                        pass
                self.tree_rss_kb = max(self.tree_rss_kb, total)
            if self.has_smi:
                now, util = time.monotonic(), 0
                for idx, used, busy in _nvidia_smi("index,memory.used,utilization.gpu"):
                    with contextlib.suppress(ValueError):
                        self.gpu_used_mib[idx] = max(self.gpu_used_mib.get(idx, 0), int(used))
                        util = max(util, int(busy))
                self.util_samples.append((now, util))
                if tick % 2 == 0:
                    for pid, uuid, used in _nvidia_smi("pid,gpu_uuid,used_memory", "--query-compute-apps"):
                        key = f"{uuid[-8:]}:{pid}"
                        with contextlib.suppress(ValueError):
                            self.proc_gpu_mib[key] = max(self.proc_gpu_mib.get(key, 0), int(used))
            tick += 1
            self._stop.wait(self.interval)

    def busy_window(self, threshold: int = 20, run: int = 3) -> float | None:
        """Seconds from the start of the first sustained busy stretch (`run` samples in a row at or above
        `threshold` % utilization on some GPU) to the last busy sample: the GPU-side clock of a job."""
        s = self.util_samples
        start = next((i for i in range(len(s) - run + 1) if all(u >= threshold for _, u in s[i : i + run])), None)
        if start is None:
            return None
        last = max(i for i, (_, u) in enumerate(s) if u >= threshold)
        # each sample averages the preceding interval: count one interval before the first busy sample
        return s[last][0] - s[start][0] + self.interval

    def summary(self) -> dict:
        procs = sorted(self.proc_gpu_mib.values(), reverse=True)
        return {
            "driver_rss_peak_mib": round(max(self.driver_rss_kb, self.driver_hwm_kb) / 1024, 1),
            "process_tree_rss_peak_mib": round(self.tree_rss_kb / 1024, 1),
            # The driver's CPU over its life (seconds, and cores on average): it must not bound the job.
            "driver_cpu_seconds": round(self.driver_cpu_seconds, 1),
            "driver_cpu_fraction": round(self.driver_cpu_seconds / max(self._last_sample - self._started, 1e-9), 3),
            "gpu_used_peak_mib": self.gpu_used_mib,
            "gpu_process_peak_mib": procs,  # one entry per GPU process (embedding and shadow actors)
            "gpu_actor_peak_mib_max": procs[0] if procs else None,
            "gpu_busy_seconds": round(b, 2) if (b := self.busy_window()) else None,
        }


def run_logged(cmd: list[str], log_path: Path, timeout: float, env: dict | None = None,
               monitor: bool = False) -> tuple[int, float, dict]:
    """Run `cmd` with stdout+stderr to `log_path`; (exit code, seconds, monitor summary)."""
    started = time.perf_counter()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        mon = Monitor(proc.pid) if monitor else None
        with mon if mon is not None else contextlib.nullcontext():
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                rc = 124
    return rc, time.perf_counter() - started, (mon.summary() if mon is not None else {})


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("RAY_DEDUP_LOGS", "0")
    return env


def gpu_name() -> str:
    rows = _nvidia_smi("name") if shutil.which("nvidia-smi") else []
    return rows[0][0] if rows else "cpu"
