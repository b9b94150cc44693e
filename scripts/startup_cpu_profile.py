"""CPU seconds of every process a `runner embed` command starts (the driver, Ray's processes, the workers).

    python scripts/startup_cpu_profile.py --out benchmarks/results/2026-11-30-cpu-startup-processes.json -- \
        python -m runner embed tests/data/some_proteins.fasta --model models/esm2_tiny.pt --out /tmp/emb --gpus 0 --no-progress

The command runs in a session of its own; every 0.1 s the CPU time (user + system) of each process of that session
is read from /proc. On a machine with few cores the start-up is bound by the sum of these (two cores can run two
CPU-seconds a second), which is what this shows: where a small job's CPU goes before its first embedding, and so
the floor of its wall time. CPU seconds depend much less on other work on the machine than wall seconds (cache
and SMT effects only), but a process that lives less than 0.1 s may be missed. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def role(cmdline: str) -> str:
    """A short name for a process: Ray's process title (ray::...), the script it runs, or its program."""
    if cmdline.startswith(("ray::", "ray-dashboard-")):
        return cmdline.split(" ")[0]
    for pattern, name in (("-m runner", "runner (driver)"), ("gcs_server", "gcs_server"), ("raylet/raylet", "raylet"),
                          ("dashboard/dashboard.py", "dashboard head"), ("autoscaler", "autoscaler monitor"),
                          ("log_monitor", "log monitor"), ("forkserver", "dashboard forkserver"),
                          ("resource_tracker", "multiprocessing resource tracker")):
        if pattern in cmdline:
            return name
    return re.sub(r"\s.*", "", cmdline) or "?"


def sample(session: int, started: float, seen: dict[int, dict]) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) != session:  # field 6 of proc(5): the session id
                continue
            cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue
        now = time.time() - started
        record = seen.setdefault(int(entry), {"first_seen_s": round(now, 1), "cpu_s": 0.0, "cmd": cmdline})
        record["cpu_s"] = max(record["cpu_s"], cpu)
        record["last_seen_s"] = round(now, 1)
        if cmdline:  # a process renames itself (setproctitle) once it knows its role
            record["cmd"] = cmdline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the figures here (JSON)")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the command after --")
    load = os.getloadavg()[0]
    started = time.time()
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    seen: dict[int, dict] = {}
    while proc.poll() is None:
        sample(proc.pid, started, seen)
        time.sleep(0.1)
    stderr = proc.stderr.read() if proc.stderr else ""
    wall = time.time() - started
    by_role: dict[str, float] = {}
    for record in seen.values():
        record["cpu_s"] = round(record["cpu_s"], 2)
        record["role"] = role(record["cmd"])
        by_role[record["role"]] = round(by_role.get(record["role"], 0.0) + record["cpu_s"], 2)
    result = {
        "command": " ".join(command),
        "loadavg_1m_before": round(load, 2),
        "cpus": os.cpu_count(),
        "returncode": proc.returncode,
        "wall_s": round(wall, 2),
        "cpu_s_total": round(sum(r["cpu_s"] for r in seen.values()), 2),
        "cpu_s_by_role": dict(sorted(by_role.items(), key=lambda kv: -kv[1])),
        "startup_line": next((line for line in stderr.splitlines() if line.startswith("start-up ")), None),
        "processes": sorted(seen.values(), key=lambda r: r["first_seen_s"]),
    }
    for name, cpu in result["cpu_s_by_role"].items():
        print(f"{cpu:6.2f} s  {name}")
    print(f"total {result['cpu_s_total']} CPU-s in {result['wall_s']} s wall on {result['cpus']} CPUs "
          f"(load {result['loadavg_1m_before']} before), rc {proc.returncode}")
    if result["startup_line"]:
        print(result["startup_line"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
