"""Start-up benchmark of `runner embed`: command to first embedding and wall time, cold and warm caches.

    # one H200, 650M (random weights, fp32 file like the released one), 1,515 synthetic proteins:
    python scripts/bench_startup.py --arch 650M --seqs 1515 --gpus 1 --warm-runs 2
    # the README's CPU quickstart (models/esm2_tiny.pt, built if missing; tests/data/some_proteins.fasta):
    python scripts/bench_startup.py --cpu --warm-runs 2 --out benchmarks/results/2026-11-30-cpu-startup.json

Each run is `python -m runner embed INPUT --model CKPT --out DIR --gpus G --no-progress` in a subprocess, with
RUNNER_CACHE_DIR (checkpoint hashes, TorchInductor's caches) and TRITON_CACHE_DIR pointing at one fresh
directory per benchmark: the first run is cold (empty caches: the checkpoint is hashed, the layers compile
from scratch), the next ones warm (the hash remembered, compiled layers loaded from the cache). A run's
figures come from its manifest's `startup` section (command start -> first embeddings on the driver, and
each phase), its `ending` section (last batch -> stream end -> shadow drained -> outputs closed and the
manifest final), the wall time seen from here and `exit_after_manifest_seconds` (the manifest's final write ->
the process gone: Ray's teardown and the interpreter's). Writes a JSON file (the commands included) and prints
a line per run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import write_random_esm2, write_synth_fasta  # noqa: E402
from bench_monitor import child_env, gpu_name  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ARCH = {"tiny": (2, 64, 4), "8M": (6, 320, 20), "35M": (12, 480, 20), "150M": (30, 640, 20),
        "650M": (33, 1280, 20), "3B": (36, 2560, 40)}
# Issue 17's targets on one H200, 650M: command -> first embedding warm/cold; the 1,515-protein job's wall;
# the CPU quickstart's wall.
TARGETS = {"gpu_first_output_warm_s": 20, "gpu_first_output_cold_s": 35, "gpu_1515_wall_s": 25, "cpu_quickstart_wall_s": 8}


def first_actor_load(startup: dict) -> dict | None:
    ready = [a for a in (startup.get("actors") or {}).values() if a.get("ready_at")]
    if not ready:
        return None
    actor = min(ready, key=lambda a: a["ready_at"])
    keys = ("cache_setup_seconds", "load_seconds", "checkpoint_seconds", "cuda_seconds", "to_device_seconds",
            "setup_seconds", "compile_setup_seconds", "compile_seconds")
    return {k: actor.get(k) for k in keys}


def run_once(cmd: list[str], env: dict, out_dir: Path, timeout: float) -> dict:
    """One `runner embed` run: wall seconds from here, its manifest's startup section, its exit code."""
    load = os.getloadavg()[0]
    started = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    ended = time.time()
    wall = ended - started
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    startup = manifest.get("startup") or {}
    ending = manifest.get("ending") or {}
    final_at = ending.get("manifest_final_at")
    return {
        "loadavg_1m_before": round(load, 2),  # other work on the machine (a shared box distorts every figure)
        "returncode": done.returncode,
        "wall_seconds": round(wall, 3),
        "to_first_output_seconds": startup.get("to_first_output_seconds"),
        "phases": startup.get("phases"),
        "stream_setup_detail": startup.get("stream_setup_detail"),
        "worker_preload": startup.get("worker_preload"),
        # the first embedding actor's own split of its load (checkpoint read, CUDA context beside it, weights moved)
        "actor_load": first_actor_load(startup),
        "compile_cache": startup.get("compile_cache"),
        "job_wall_seconds": (manifest.get("throughput") or {}).get("wall_seconds"),
        "ending": ending.get("phases"),
        "exit_after_manifest_seconds": round(ended - final_at, 3) if final_at else None,
        "rows": (manifest.get("counts") or {}).get("rows"),
        "stderr_tail": done.stderr[-1500:] if done.returncode else None,
        "stderr_lines": len(done.stderr.splitlines()),
    }


def quickstart_checkpoint() -> Path:
    """models/esm2_tiny.pt as the README's quickstart builds it (scripts/make_tiny_checkpoints.py), built if missing."""
    path = REPO / "models" / "esm2_tiny.pt"
    if not path.is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_checkpoints.py"), str(path.parent)],
                       check=True, capture_output=True)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--cpu", action="store_true",
                    help="the README's CPU quickstart: models/esm2_tiny.pt (built if missing), its 15 proteins, --gpus 0")
    ap.add_argument("--arch", choices=sorted(ARCH), help="random-weight fair-esm checkpoint of this architecture")
    ap.add_argument("--checkpoint", help="an existing .pt file or model name instead of --arch")
    ap.add_argument("--ckpt-dtype", default="fp32", choices=["fp16", "fp32"],
                    help="dtype stored in the --arch file (fp32: the released files' size, so the hash costs the same)")
    ap.add_argument("--input", help="FASTA input (default: --seqs synthetic proteins)")
    ap.add_argument("--seqs", type=int, default=1515, help="synthetic proteins when no --input")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--warm-runs", type=int, default=2, help="runs after the cold one, caches kept")
    ap.add_argument("--runner-arg", action="append", default=[], help="extra argument for runner embed")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                    help="environment variable for the runs (e.g. RUNNER_WORKER_PRELOAD=0 for an A/B)")
    ap.add_argument("--workdir", help="keep inputs, checkpoint, caches and outputs here")
    ap.add_argument("--out", help="result JSON (default benchmarks/results/<date>-startup-<gpu>.json)")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--note", help="a remark stored with the results (e.g. what else ran on the machine)")
    args = ap.parse_args(argv)
    if args.cpu:
        args.gpus = 0
        args.checkpoint = args.checkpoint or str(quickstart_checkpoint())
        args.input = args.input or str(REPO / "tests" / "data" / "some_proteins.fasta")
    if not args.arch and not args.checkpoint:
        ap.error("give --cpu, --arch or --checkpoint")

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-startup-"))
    work.mkdir(parents=True, exist_ok=True)
    data: dict = {}
    if args.input:
        fasta = Path(args.input).resolve()
    else:
        fasta = work / f"synth-{args.seqs}.fasta"
        data = write_synth_fasta(fasta, args.seqs)
    if args.checkpoint:
        checkpoint = args.checkpoint
    else:
        path = work / f"esm2_{args.arch}_random_{args.ckpt_dtype}.pt"
        if not path.is_file():
            write_random_esm2(path, *ARCH[args.arch], dtype=args.ckpt_dtype)
        checkpoint = str(path)

    cache = work / "cache"  # one fresh cache per benchmark: the first run is cold
    shutil.rmtree(cache, ignore_errors=True)
    env = child_env()
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    env.pop("RAY_ADDRESS", None)
    env.update(RUNNER_CACHE_DIR=str(cache), TRITON_CACHE_DIR=str(cache / "triton"))
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    runs = []
    for i in range(1 + args.warm_runs):
        out_dir = work / f"out-{i}"
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "runner", "embed", str(fasta), "--model", checkpoint, "--out", str(out_dir),
               "--gpus", str(args.gpus), "--no-progress", *args.runner_arg]
        result = {"mode": "cold" if i == 0 else "warm", "command": " ".join(cmd), **run_once(cmd, env, out_dir,
                                                                                              args.timeout)}
        runs.append(result)
        print(f"{result['mode']:5s} first output {result['to_first_output_seconds']} s, wall {result['wall_seconds']} s, "
              f"exit after the manifest {result['exit_after_manifest_seconds']} s, rc {result['returncode']}: "
              f"{json.dumps(result['phases'])}; ending {json.dumps(result['ending'])}", flush=True)
        if result["returncode"]:
            print(result["stderr_tail"], file=sys.stderr)

    device = gpu_name() if args.gpus else "cpu"
    doc = {
        "benchmark": "startup",
        "date": dt.date.today().isoformat(),
        "command": " ".join([sys.executable, *sys.argv]) if argv is None else " ".join(["bench_startup.py", *argv]),
        "device": device,
        "host": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_1m": os.getloadavg()[0]},
        "model": args.arch or args.checkpoint,
        "input": {"path": str(fasta), **data},
        "gpus": args.gpus,
        "env": args.env,
        "targets": TARGETS,
        "runs": runs,
    }
    if args.note:
        doc["note"] = args.note
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / (
        f"{doc['date']}-startup-{device.replace(' ', '-').lower()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
