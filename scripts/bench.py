"""Throughput benchmark of `runner embed` against the reference ESM-2 anchors, and of its CPU stages.

    python scripts/bench.py gpu --models 650M,3B --gpus 1 --shadow-rates 0,0.01 \\
        --reference build/bench_ref/reference_bench.py --out benchmarks/results/
    python scripts/bench.py cpu-stages --records 1000000,10000000 --out benchmarks/results/

`gpu`: per architecture, writes a synthetic FASTA (the reference script's generator: lognormal lengths,
median 300, sigma 0.65, clipped to 30..1022, 20 amino acids, seed 0) and a random-weight fair-esm checkpoint
of the real architecture (fp16 weights), runs the reference script (fair-esm FP32/FP16 extract, minimal
packed varlen FP16) and `python -m runner embed` (a subprocess: this process never imports Ray) once per GPU
count and shadow rate, samples driver RSS (/proc) and GPU memory per process (nvidia-smi) meanwhile, and
writes `<out>/<YYYY-MM-DD>-<gpu>.json` (merged into an existing file of the same name) plus a markdown table.

`cpu-stages`: CPU only, no Ray, no weights: writes an N-record FASTA and runs the real read
(parse + duplicate filter), tokenize/pack (`runner.stream.pack_records`, ESM-2 codec) and write
(`PartWriter`, fake dim-32 embeddings) code in a fresh process per N; reports CPU seconds per million
tokens per stage and RSS sampled along the way (flat in N except for the duplicate filter, by design).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

# The reference script's architectures: name -> (layers, embed dim, heads).
ARCH = {
    "tiny": (2, 64, 4),  # for a CPU smoke test of this script only
    "8M": (6, 320, 20),
    "35M": (12, 480, 20),
    "150M": (30, 640, 20),
    "650M": (33, 1280, 20),
    "3B": (36, 2560, 40),
}
AA = "LAGVESIKRDTPNQFYMHCW"  # the reference script's 20 amino acids, in its order

# Defaults sized so that one H200 runs 650M + 3B, shadow 0 and 0.01, in about 8 minutes (see README).
# Multiples of runner's 2048 records per block: the driver receives one block's embeddings at a time, and
# the steady-state clock needs a few blocks after the first (650M: 10 blocks, 3B: 4 blocks).
DEFAULT_SEQS = {"tiny": 4096, "8M": 20480, "35M": 20480, "150M": 20480, "650M": 20480, "3B": 8192}
DEFAULT_REF_SEQS = {"tiny": 64, "8M": 4000, "35M": 4000, "150M": 3000, "650M": 2000, "3B": 600}
REF_MODES = "extract32,extract16,packed16"
TARGETS = {  # name -> (target, "min" = at least, "max" = at most)
    "vs_reference_packed_fp16": (1.0, "min"),
    "vs_fair_esm_fp32": (10.0, "min"),
    "scaling_efficiency_4gpu": (0.9, "min"),
    "shadow_cost_0.01": (0.03, "max"),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_per_model(spec: str | None, defaults: dict[str, int]) -> dict[str, int]:
    """'20480' (every model) or '650M=20480,3B=8192' (others keep their default)."""
    out = dict(defaults)
    if not spec:
        return out
    if "=" not in spec:
        return {k: int(spec) for k in out}
    for item in spec.split(","):
        name, _, value = item.partition("=")
        out[name.strip()] = int(value)
    return out


# ------------------------------------------------------------------------------------------ synthetic data


def synth_arrays(n: int, seed: int = 0, median: float = 300, sigma: float = 0.65, lo: int = 30, hi: int = 1022):
    """The reference script's `synth(n)` draws, as arrays: (lengths int64 [n], residue bytes uint8 [sum])."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(seed)
    lens = torch.exp(torch.randn(n, generator=g) * sigma + math.log(median)).clamp(lo, hi).long()
    idx = torch.randint(0, len(AA), (int(lens.sum()),), generator=g)
    lut = np.frombuffer(AA.encode(), dtype=np.uint8)
    return lens.numpy(), lut[idx.numpy()]


def synth(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Exactly the reference script's `synth` output: [("s0", "MKV..."), ...]."""
    lens, res = synth_arrays(n, seed)
    out, p = [], 0
    for i, length in enumerate(lens.tolist()):
        out.append((f"s{i}", res[p : p + length].tobytes().decode()))
        p += length
    return out


def write_synth_fasta(path: Path, n: int, seed: int = 0, width: int = 60) -> dict:
    """The reference's synthetic proteins as FASTA (lines of `width`); returns counts."""
    lens, res = synth_arrays(n, seed)
    p = 0
    with open(path, "wb") as f:
        for i, length in enumerate(lens.tolist()):
            seq = res[p : p + length].tobytes()
            p += length
            body = b"\n".join(seq[j : j + width] for j in range(0, length, width))
            f.write(b">s%d synthetic\n%s\n" % (i, body))
    residues = int(lens.sum())
    return {"records": n, "residues": residues, "tokens": residues + 2 * n, "bytes": path.stat().st_size}


def write_short_fasta(path: Path, n: int, seed: int = 0, median: float = 100, sigma: float = 0.65,
                      lo: int = 30, hi: int = 1022, width: int = 60, chunk: int = 100_000) -> dict:
    """N synthetic proteins (lognormal lengths) streamed to disk chunk by chunk (numpy; flat memory)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lut = np.frombuffer(AA.encode(), dtype=np.uint8)
    residues = 0
    with open(path, "wb", buffering=8 << 20) as f:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            lens = np.clip(np.exp(rng.standard_normal(m) * sigma + math.log(median)), lo, hi).astype(np.int64)
            res = lut[rng.integers(0, len(AA), int(lens.sum()), dtype=np.uint8)].tobytes()
            parts, p = [], 0
            for i, length in enumerate(lens.tolist()):
                seq = res[p : p + length]
                p += length
                body = b"\n".join(seq[j : j + width] for j in range(0, length, width))
                parts.append(b">p%d\n%s\n" % (start + i, body))
            f.write(b"".join(parts))
            residues += int(lens.sum())
    return {"records": n, "residues": residues, "tokens": residues + 2 * n, "bytes": path.stat().st_size}


# ------------------------------------------------------------------------------------------ checkpoints


def write_random_esm2(path: Path, layers: int, dim: int, heads: int, seed: int = 0, dtype: str = "fp16") -> Path:
    """A random-weight ESM-2 checkpoint in fair-esm's file format (as scripts/tiny_esm2.py writes, same
    weight scales), built for large models: shapes from a meta-device module, values drawn on the GPU when
    there is one, stored in `dtype` (fp16 halves the file; runner's loader upcasts on load). No
    contact-regression file (optional for embeddings)."""
    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    import esm
    from esm.model.esm2 import ESM2
    from tiny_esm2 import _CFG_DEFAULTS

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    with torch.device("meta"):
        model = ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet=alphabet, token_dropout=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    saved: dict[str, torch.Tensor] = {}
    embed = None
    for name, meta in model.state_dict().items():
        shape = tuple(meta.shape)
        if name.startswith("contact_head.") or name == "lm_head.weight":
            continue
        if name.endswith("rot_emb.inv_freq"):
            hd = shape[0] * 2
            value = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            saved[f"encoder.sentence_encoder.{name}"] = value
            continue
        if "layer_norm" in name and name.endswith(".weight"):
            value = 1.0 + 0.05 * randn(shape)
        elif name.endswith(".bias"):
            value = 0.02 * randn(shape)
        elif name == "embed_tokens.weight":
            value = randn(shape)
            value[model.padding_idx] = 0.0
        else:
            value = randn(shape) / math.sqrt(shape[-1])
        value = value.to(torch_dtype).cpu()
        if name == "embed_tokens.weight":
            embed = value
        prefix = "encoder." if name.startswith("lm_head.") else "encoder.sentence_encoder."
        saved[prefix + name] = value
    saved["encoder.lm_head.weight"] = embed  # tied to the embedding, one storage in the file
    cfg = argparse.Namespace(encoder_layers=layers, encoder_embed_dim=dim, encoder_ffn_embed_dim=4 * dim,
                             encoder_attention_heads=heads, token_dropout=True, **_CFG_DEFAULTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"cfg": {"model": cfg}, "model": saved}, tmp)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------ monitoring


def _proc_status_kb(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


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


# ------------------------------------------------------------------------------------------ gpu command


def gpu_name() -> str:
    rows = _nvidia_smi("name") if shutil.which("nvidia-smi") else []
    return rows[0][0] if rows else "cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def run_reference(ref: Path, arch: str, n: int, modes: str, work: Path, timeout: float) -> dict:
    """The reference script's JSON lines, by mode."""
    cmd = [sys.executable, str(ref), arch, str(n), modes]
    log(f"reference {arch}: {' '.join(cmd)}")
    log_path = work / f"reference-{arch}-{n}.log"
    rc, secs, _ = run_logged(cmd, log_path, timeout, env=child_env())
    out: dict = {}
    for line in log_path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                rec = json.loads(line)
                if "mode" in rec:
                    out[rec["mode"]] = rec
    if rc != 0:
        log(f"reference {arch} exited {rc} after {secs:.0f}s; log tail:\n{tail(log_path)}")
    for mode, rec in out.items():
        log(f"reference {arch} {mode}: {rec.get('tok_per_s', rec.get('error'))} tok/s")
    return {"modes": out, "exit_code": rc, "seconds": round(secs, 1), "seqs": n, "command": " ".join(cmd)}


def find_keys(obj, pattern: re.Pattern, prefix: str = "") -> dict:
    """Every manifest entry whose key path matches `pattern` (e.g. steady tok/s, peak memory), flattened."""
    found = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            if pattern.search(str(k)):
                found[path] = v
            else:
                found.update(find_keys(v, pattern, path))
    return found


def steady_from_parts(out_dir: Path) -> dict:
    """Tokens/s between the first and the last part file closed (mtimes): excludes Ray start-up and
    model loading, which all land before the first part. Tokens = residues + 2 per row (no row is
    chunked or truncated: the synthetic lengths stop at 1022)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = sorted((out_dir / "embeddings").glob("part-*.arrow"))
    if len(parts) < 3:
        return {"parts": len(parts)}
    stamps, tokens = [], []
    for p in parts:
        with pa.memory_map(str(p)) as src:
            lengths = pa.ipc.open_file(src).read_all().column("length")
            tokens.append(int(pc.sum(lengths).as_py() or 0) + 2 * len(lengths))
        stamps.append(p.stat().st_mtime_ns / 1e9)
    span = stamps[-1] - stamps[0]
    if span <= 0:
        return {"parts": len(parts)}
    return {"parts": len(parts), "steady_tokens": sum(tokens[1:]), "steady_seconds": round(span, 3),
            "steady_tokens_per_second": round(sum(tokens[1:]) / span, 1)}


def run_runner(fasta: Path, ckpt: Path, out_dir: Path, gpus: int, shadow: float, args, work: Path,
               extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, "-m", "runner", "embed", str(fasta), "--model", str(ckpt), "--out", str(out_dir),
           "--gpus", str(gpus), "--shadow-rate", str(shadow), "--no-progress",
           "--rows-per-part", str(args.rows_per_part)]
    if args.token_budget:
        cmd += ["--token-budget", str(args.token_budget)]
    cmd += args.runner_arg or []
    cmd += list(extra)
    log(f"runner: {' '.join(cmd)}")
    log_path = work / f"runner-{out_dir.name}.log"
    rc, secs, mem = run_logged(cmd, log_path, args.timeout, env=child_env(), monitor=True)
    result: dict = {"gpus": gpus, "shadow_rate": shadow, "exit_code": rc, "process_seconds": round(secs, 1),
                    "command": " ".join(cmd), **mem}
    manifest_path = out_dir / "manifest.json"
    if rc != 0 or not manifest_path.is_file():
        log(f"runner exited {rc} after {secs:.0f}s; log tail:\n{tail(log_path)}")
        result["log_tail"] = tail(log_path, 15)
        return result
    manifest = json.loads(manifest_path.read_text())
    thr = manifest.get("throughput", {})
    result.update({
        "status": manifest.get("status"),
        "rows": manifest.get("counts", {}).get("rows"),
        "tokens": thr.get("tokens"),
        "wall_seconds": thr.get("wall_seconds"),
        "tokens_per_second_wall": thr.get("tokens_per_second"),
        "packing_efficiency": thr.get("packing_efficiency"),
        "token_budget": manifest.get("token_budget"),
        "attention_backend": manifest.get("attention_backend"),
        "windows_per_worker": thr.get("windows_per_worker"),
        "shadow": manifest.get("shadow"),
    })
    # Whatever steady-state / memory figures the manifest offers (added by other work), verbatim.
    extra = find_keys(manifest, re.compile(r"steady|peak|memory|rss", re.I))
    extra.pop("settings.shadow_queue", None)
    if extra:
        result["manifest_extra"] = extra
    parts = steady_from_parts(out_dir)
    result["from_parts"] = parts
    wall = thr.get("wall_seconds") or 0
    tokens = thr.get("tokens") or 0
    first = thr.get("first_output_seconds")
    candidates = {  # every clock we have; the first sane one is used
        # The GPU's own busy window first: the driver can receive outputs in bursts (seen: a manifest
        # "steady" of 500k tok/s for a 223k tok/s GPU), which skews any clock started at the first output.
        "gpu busy window": round(tokens / mem["gpu_busy_seconds"], 1) if mem.get("gpu_busy_seconds") else None,
        "manifest": thr.get("steady_tokens_per_second")
        if first is not None and wall and first < 0.8 * wall else None,
        "part mtimes": parts.get("steady_tokens_per_second")
        if parts.get("steady_seconds", 0) >= 0.3 * wall else None,
        "wall": thr.get("tokens_per_second"),
    }
    result["steady_candidates"] = candidates
    source = next((k for k, v in candidates.items() if v), "wall")
    result["tokens_per_second_steady"], result["steady_source"] = candidates[source], source
    if manifest.get("shadow"):
        result["shadow"] = manifest["shadow"]
    log(f"runner done in {secs:.0f}s: {result['tokens']} tokens, wall {result['tokens_per_second_wall']} tok/s, "
        f"steady {result['tokens_per_second_steady']} tok/s ({result['steady_source']}), "
        f"driver RSS {mem.get('driver_rss_peak_mib')} MiB, GPU/process {mem.get('gpu_process_peak_mib')} MiB")
    return result


def _div(a, b):
    return round(a / b, 4) if a and b else None


def compute_ratios(model: dict) -> dict:
    """Ratios of one model from its runs and reference figures (steady tok/s; `_wall` variants too)."""
    runs = model.get("runs", {})
    ref = model.get("reference", {}).get("modes", {})
    ref_packed = ref.get("packed16", {}).get("tok_per_s")
    ref_fp32 = ref.get("extract32", {}).get("tok_per_s")
    ref_fp16 = ref.get("extract16", {}).get("tok_per_s")
    ok = {k: r for k, r in runs.items() if r.get("exit_code") == 0 and r.get("tokens")}
    out: dict = {"reference_tok_per_s": {"extract32": ref_fp32, "extract16": ref_fp16, "packed16": ref_packed}}
    if not ok:
        return out
    base_g = min(r["gpus"] for r in ok.values())

    def get(g, s, key="tokens_per_second_steady"):
        r = ok.get(f"g{g}_s{s:g}")
        return r.get(key) if r else None

    for suffix, key in (("", "tokens_per_second_steady"), ("_wall", "tokens_per_second_wall")):
        per_gpu = (get(base_g, 0, key) or 0) / max(base_g, 1) or None
        out[f"runner_tok_per_s_per_gpu{suffix}"] = round(per_gpu, 1) if per_gpu else None
        out[f"vs_reference_packed_fp16{suffix}"] = _div(per_gpu, ref_packed)
        out[f"vs_fair_esm_fp32{suffix}"] = _div(per_gpu, ref_fp32)
        out[f"vs_fair_esm_fp16{suffix}"] = _div(per_gpu, ref_fp16)
        with_shadow = get(base_g, 0.01, key)
        if with_shadow and get(base_g, 0, key):
            out[f"shadow_cost_0.01{suffix}"] = round(1 - with_shadow / get(base_g, 0, key), 4)
            out[f"vs_reference_packed_fp16_shadow_0.01{suffix}"] = _div(with_shadow / max(base_g, 1), ref_packed)
        for run in ok.values():  # every other shadow rate measured (0.1, 0.005, ...)
            rate = run.get("shadow_rate") or 0
            shadowed = get(base_g, rate, key)
            if rate not in (0, 0.01) and run["gpus"] == base_g and shadowed and get(base_g, 0, key):
                out[f"shadow_cost_{rate:g}{suffix}"] = round(1 - shadowed / get(base_g, 0, key), 4)
        eager = ok.get(f"g{base_g}_s0_eager", {}).get(key)
        if eager and get(base_g, 0, key):
            out[f"compile_speedup{suffix}"] = _div(get(base_g, 0, key), eager)
        one, four = get(1, 0, key), get(4, 0, key)
        if one and four:
            out[f"scaling_efficiency_4gpu{suffix}"] = round(four / (4 * one), 4)
    return out


def summarize(doc: dict) -> None:
    """Top-level ratios: the worst model for each target (min of at-least ratios, max of costs)."""
    for name, (target, kind) in TARGETS.items():
        values = {m: d.get(name) for m, d in doc["models"].items() if d.get(name) is not None}
        if not values:
            continue
        worst = min(values.values()) if kind == "min" else max(values.values())
        doc[name] = worst
        doc.setdefault("targets", {})[name] = {
            "target": f">= {target}" if kind == "min" else f"<= {target}",
            "worst": worst, "per_model": values,
            "pass": worst >= target if kind == "min" else worst <= target,
        }


def markdown_table(doc: dict) -> str:
    lines = ["| model | fair-esm FP32 | fair-esm FP16 | packed FP16 (ref) | runner / GPU steady (wall) | "
             "vs packed16 | vs FP32 | shadow 0.01 cost | 4-GPU scaling | actor GPU peak MiB | driver RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, spec=",.0f"):
        return "—" if v is None else format(v, spec)

    for m, d in doc["models"].items():
        ref = d.get("reference_tok_per_s", {})
        runs = [r for r in d.get("runs", {}).values() if r.get("exit_code") == 0]
        gpu_peak = max((r.get("gpu_actor_peak_mib_max") or 0 for r in runs), default=0) or None
        rss = max((r.get("driver_rss_peak_mib") or 0 for r in runs), default=0) or None
        lines.append(
            f"| {m} | {f(ref.get('extract32'))} | {f(ref.get('extract16'))} | {f(ref.get('packed16'))} | "
            f"{f(d.get('runner_tok_per_s_per_gpu'))} ({f(d.get('runner_tok_per_s_per_gpu_wall'))}) | "
            f"{f(d.get('vs_reference_packed_fp16'), '.2f')}x | {f(d.get('vs_fair_esm_fp32'), '.1f')}x | "
            f"{f(d.get('shadow_cost_0.01'), '.1%')} | {f(d.get('scaling_efficiency_4gpu'), '.2f')} | "
            f"{f(gpu_peak)} | {f(rss)} |"
        )
    return "\n".join(lines)


def cmd_gpu(args) -> int:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in ARCH]
    if unknown:
        sys.exit(f"unknown model(s) {unknown}: choose from {', '.join(ARCH)}")
    gpus = sorted({int(g) for g in str(args.gpus).split(",")})
    rates = [float(r) for r in args.shadow_rates.split(",")]
    seqs = parse_per_model(args.seqs, DEFAULT_SEQS)
    ref_seqs = parse_per_model(args.ref_seqs, DEFAULT_REF_SEQS)
    ref = Path(args.reference).resolve() if args.reference else None
    name = gpu_name()
    date = dt.date.today().isoformat()
    out_dir = Path(args.out)
    out_file = out_dir / f"{date}-{slug(name)}.json"
    # runs: every (gpus, shadow) pair at the smallest GPU count, shadow 0 only at the others
    plan = [(g, r) for g in gpus for r in rates if g == gpus[0] or r == 0]

    work_ctx = (contextlib.nullcontext(args.workdir) if args.workdir
                else tempfile.TemporaryDirectory(prefix="runner-bench-"))
    with work_ctx as work_s:
        work = Path(work_s)
        work.mkdir(parents=True, exist_ok=True)
        log(f"GPU: {name}; models {models}; GPU counts {gpus}; shadow rates {rates}; work dir {work}; "
            f"results -> {out_file}")
        for m in models:
            log(f"plan {m} {ARCH[m]}: FASTA of {seqs[m]} x GPUs synthetic proteins, fp16 random checkpoint, "
                f"reference {ref_seqs[m]} seqs ({args.ref_modes}), runs {plan}")
        if args.dry_run:
            for m in models:
                if ref:
                    print(f"  {sys.executable} {ref} {m} {ref_seqs[m]} {args.ref_modes}")
                for g, r in plan:
                    print(f"  {sys.executable} -m runner embed {work}/{m}-{seqs[m] * g}.fasta --model "
                          f"{work}/esm2-{m}.pt --out {work}/out-{m}-g{g}-s{r:g} --gpus {g} --shadow-rate {r:g} "
                          f"--no-progress --rows-per-part {args.rows_per_part}")
            if not ref:
                print("  (no --reference: reference figures skipped)")
            if name == "cpu":
                print("  no GPU visible here (nvidia-smi): the real run needs a CUDA machine")
            return 0

        if name == "cpu" and gpus[-1] > 0:
            log("no GPU visible (nvidia-smi found none): run this on a CUDA machine, or use --gpus 0 "
                "--models tiny for a CPU smoke test of the script, or --dry-run for the plan")
            return 2
        doc = {"models": {}}
        if out_file.is_file() and not args.no_merge:
            doc = json.loads(out_file.read_text())
            log(f"merging into existing {out_file}")
        import torch  # noqa: F401  (version only; no CUDA context is created in this process)

        doc.update({"date": date, "gpu": name, "torch": sys.modules["torch"].__version__,
                    "python": platform.python_version(), "cpu_count": os.cpu_count(), "host": platform.node()})
        doc.setdefault("notes", {}).update({
            "tokens": "residues + 2 (BOS/EOS) per sequence, as the reference script counts",
            "steady": "runner tok/s between the first and last Arrow part written (or the manifest's own "
                      "steady figure): excludes Ray start-up and model loading; *_wall ratios include them",
            "ratios": "per GPU at the smallest GPU count, shadow rate 0 unless named; top-level = worst model",
            "reference": "reference script run with its own (smaller) sequence count, same generator; "
                         "it reports tok/s after model load and a 64-sequence warm-up",
            "gpu_memory": "nvidia-smi used_memory per process (PyTorch caching allocator reservation)",
        })
        for m in models:
            layers, dim, heads = ARCH[m]
            entry = doc["models"].setdefault(m, {})
            entry["architecture"] = {"layers": layers, "embed_dim": dim, "heads": heads}
            t = time.perf_counter()
            ckpt = work / f"esm2-{m}.pt"
            if not ckpt.is_file():
                log(f"{m}: writing random fp16 checkpoint {ckpt}")
                rc, secs, _ = run_logged([sys.executable, str(Path(__file__).resolve()), "_make-ckpt", str(ckpt),
                                          str(layers), str(dim), str(heads)], work / f"ckpt-{m}.log", args.timeout,
                                         env=child_env())
                if rc != 0:
                    log(f"checkpoint failed:\n{tail(work / f'ckpt-{m}.log')}")
                    return 1
                log(f"{m}: checkpoint {ckpt.stat().st_size / 2**30:.2f} GiB in {secs:.0f}s")
            if ref:
                entry["reference"] = run_reference(ref, m, ref_seqs[m], args.ref_modes, work, args.timeout)
            runs = entry.setdefault("runs", {})
            for g, r in plan:
                n = seqs[m] * max(g, 1)
                fasta = work / f"{m}-{n}.fasta"
                if not fasta.is_file():
                    info = write_synth_fasta(fasta, n)
                    log(f"{m}: FASTA {fasta.name}: {info['records']} records, {info['tokens']:,} tokens")
                out = work / f"out-{m}-g{g}-s{r:g}"
                shutil.rmtree(out, ignore_errors=True)
                runs[f"g{g}_s{r:g}"] = run_runner(fasta, ckpt, out, g, r, args, work)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            if args.eager_baseline:  # what torch.compile buys: the same run with eager layers
                g = gpus[0]
                fasta = work / f"{m}-{seqs[m] * max(g, 1)}.fasta"
                out = work / f"out-{m}-g{g}-s0-eager"
                shutil.rmtree(out, ignore_errors=True)
                runs[f"g{g}_s0_eager"] = run_runner(fasta, ckpt, out, g, 0.0, args, work, ("--no-compile",))
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            if args.cpu_check:
                fasta = work / f"{m}-{seqs[m] * max(gpus[0], 1)}.fasta"
                entry["cpu_stages_on_bench_input"] = cpu_check(fasta, work, args, entry)
            entry.update(compute_ratios(entry))
            log(f"{m}: done in {time.perf_counter() - t:.0f}s: "
                + ", ".join(f"{k}={entry.get(k)}" for k in TARGETS if entry.get(k) is not None))
            if not args.keep_checkpoints:
                ckpt.unlink(missing_ok=True)
            summarize(doc)
            out_dir.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(markdown_table(doc), flush=True)
        log(f"wrote {out_file}")
    return 0


def cpu_check(fasta: Path, work: Path, args, entry: dict) -> dict:
    """CPU s per million tokens of each CPU stage on (a prefix of) the benchmark's own FASTA, and how many
    cores each would need at the measured runner rate: the single read task must stay under one core."""
    out = work / "cpu-check"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_cpu-one", str(fasta), str(out),
           "--limit", str(args.cpu_check), "--dim", "32"]
    rc, _, _ = run_logged(cmd, work / "cpu-check.log", args.timeout, env=child_env())
    shutil.rmtree(out, ignore_errors=True)
    if rc != 0:
        return {"error": tail(work / "cpu-check.log", 10)}
    res = json.loads((work / "cpu-check.log").read_text().strip().splitlines()[-1])
    runs = [r for r in entry.get("runs", {}).values() if r.get("exit_code") == 0 and r.get("tokens_per_second_steady")]
    rate = max((r["tokens_per_second_steady"] for r in runs), default=0)
    per = res["cpu_s_per_mtok"]
    res["cores_needed_at_runner_rate"] = {k: round(v * rate / 1e6, 3) for k, v in per.items()} if rate else None
    res["runner_rate_tok_per_s"] = rate
    return res


# ------------------------------------------------------------------------------------------ cpu stages


def _vm_kb(key: str) -> int:
    return _proc_status_kb(os.getpid(), key) or 0


def cpu_stage_run(fasta: Path, out_dir: Path, block: int = 2048, budget: int = 65536, dim: int = 32,
                  rows_per_part: int = 16384, limit: int = 0, sample_every: int = 250_000,
                  breakdown_every: int = 8) -> dict:
    """The real CPU-stage code on one FASTA, one core, no Ray: per-stage process time and RSS samples.

    read = `runner.stream.read_blocks` (FASTA parse + duplicate filter + Arrow blocks: the single read
    task), its duplicate-filter share timed inside `DuplicateFilter.check`; tokenize+pack =
    `runner.stream.pack_records` (what each pack task runs), split into tokenize / pack by re-timing
    `Preparer.prepare` and `pack_block` on every `breakdown_every`-th block; write = fake embeddings
    (width `dim`) through `PartWriter`, as the driver writes them.
    """
    import numpy as np
    import pyarrow.compute as pc

    import runner.stream as stream
    from runner.batch import InputRecord
    from runner.models.esm2 import Esm2Codec
    from runner.packing import pack_block
    from runner.prepare import DuplicateFilter, Preparer
    from runner.sink import EmbeddedRows, PartWriter

    pt = time.process_time

    class TimedFilter(DuplicateFilter):
        """The read task's duplicate filter, kept for its size and timed."""

        made: list[DuplicateFilter] = []
        cpu = 0.0

        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            TimedFilter.made.append(self)

        def check(self, ids, sources=None):
            t = pt()
            try:
                return super().check(ids, sources)
            finally:
                TimedFilter.cpu += pt() - t

    stream.DuplicateFilter = TimedFilter  # read_blocks builds its filter from this module global

    def dedup_bytes() -> int:
        return sum(f.nbytes for f in TimedFilter.made)

    codec = Esm2Codec()
    settings = stream.PackSettings(codec, None, "truncate", 128, budget)
    preparer = Preparer(codec)
    writer = PartWriter(out_dir, dim, rows_per_part)
    vectors = np.random.default_rng(0).standard_normal((block, dim)).astype(np.float32)
    cpu = {"read": 0.0, "tokenize_pack": 0.0, "write": 0.0}
    split = {"tokenize": 0.0, "pack": 0.0, "tokens": 0}
    records = tokens = batches = nblocks = 0
    samples = []
    next_sample = sample_every
    rss_start = _vm_kb("VmRSS")
    wall = time.perf_counter()
    blocks = stream.read_blocks(stream.ReadSettings(paths=(str(fasta),), id_column="id", seq_column="sequence",
                                                    records_per_block=block))
    while not limit or records < limit:
        t0 = pt()
        table = next(blocks, None)
        t1 = pt()
        cpu["read"] += t1 - t0
        if table is None:
            break
        packed = stream.pack_records(table, settings)
        t2 = pt()
        cpu["tokenize_pack"] += t2 - t1
        ids = packed.column("ids").combine_chunks().flatten().to_pylist()
        n = len(ids)
        if n:
            rows = EmbeddedRows(
                ids=ids,
                lengths=packed.column("residues").combine_chunks().flatten().to_numpy().astype(np.int32),
                truncated=packed.column("truncated").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                vectors=vectors[:n] if n <= block else np.resize(vectors, (n, dim)),
                ordinals=packed.column("ordinals").combine_chunks().flatten().to_numpy(),
            )
            writer.write(rows)
        t3 = pt()
        cpu["write"] += t3 - t2
        block_tokens = int(pc.sum(pc.list_value_length(packed.column("tokens"))).as_py() or 0)
        tokens += block_tokens
        batches += int(sum(1 for c in packed.column("ids").to_pylist() if c))
        if nblocks % breakdown_every == 0:  # re-time the two halves of pack_records on this block
            cols = table.to_pydict()
            s0 = pt()
            windows = []
            for rid, seq, source, ordinal in zip(cols["id"], cols["sequence"], cols["source"], cols["ordinal"],
                                                 strict=True):
                got = preparer.prepare(InputRecord(rid, seq, source, ordinal))
                if isinstance(got, list):
                    windows.extend(got)
            s1 = pt()
            pack_block(windows, budget)
            s2 = pt()
            split["tokenize"] += s1 - s0
            split["pack"] += s2 - s1
            split["tokens"] += block_tokens
        nblocks += 1
        records += table.num_rows
        if records >= next_sample:
            samples.append({"records": records, "rss_mib": round(_vm_kb("VmRSS") / 1024, 1),
                            "dedup_mib": round(dedup_bytes() / 2**20, 1)})
            next_sample += sample_every
    writer.close()
    wall = time.perf_counter() - wall
    samples.append({"records": records, "rss_mib": round(_vm_kb("VmRSS") / 1024, 1),
                    "dedup_mib": round(dedup_bytes() / 2**20, 1)})
    mtok = tokens / 1e6
    tp = cpu["tokenize_pack"]
    frac = split["tokenize"] / (split["tokenize"] + split["pack"]) if split["tokens"] else 0.0
    per = {
        "read": cpu["read"] / mtok,
        "read_parse_and_block": (cpu["read"] - TimedFilter.cpu) / mtok,
        "read_dedup": TimedFilter.cpu / mtok,
        "tokenize_pack": tp / mtok,
        "tokenize": tp * frac / mtok,
        "pack": tp * (1 - frac) / mtok,
        "write": cpu["write"] / mtok,
    }
    per["total"] = per["read"] + per["tokenize_pack"] + per["write"]
    peak = _vm_kb("VmHWM") / 1024
    return {
        "records": records,
        "tokens": tokens,
        "batches": batches,
        "input_bytes": fasta.stat().st_size,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": {**{k: round(v, 3) for k, v in cpu.items()}, "read_dedup": round(TimedFilter.cpu, 3)},
        "cpu_s_per_mtok": {k: round(v, 4) for k, v in per.items()},
        "mtok_per_cpu_s": {k: round(1 / v, 3) for k, v in per.items() if v > 0},
        "rss_start_mib": round(rss_start / 1024, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_end_mib": samples[-1]["rss_mib"],
        "dedup_filter_mib": round(dedup_bytes() / 2**20, 1),
        "rss_peak_minus_dedup_mib": round(peak - dedup_bytes() / 2**20, 1),
        "rss_samples": samples,
        "settings": {"records_per_block": block, "token_budget": budget, "embed_dim": dim,
                     "rows_per_part": rows_per_part, "breakdown_every": breakdown_every},
    }


def cmd_cpu_one(args) -> int:
    res = cpu_stage_run(Path(args.fasta), Path(args.out_dir), args.block, args.budget, args.dim,
                        args.rows_per_part, args.limit, args.sample_every)
    print(json.dumps(res), flush=True)
    return 0


def cmd_cpu_stages(args) -> int:
    counts = [int(float(c)) for c in args.records.split(",")]
    date = dt.date.today().isoformat()
    out_file = Path(args.out) / f"{date}-cpu-stages.json"
    doc = {"date": date, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "host": platform.node(),
           "input": f"synthetic proteins, lognormal lengths median {args.median:g} sigma 0.65 clipped 30..1022, "
                    f"60-column FASTA, unique ids", "runs": {}}
    work_ctx = (contextlib.nullcontext(args.workdir) if args.workdir
                else tempfile.TemporaryDirectory(prefix="runner-cpu-bench-"))
    with work_ctx as work_s:
        work = Path(work_s)
        work.mkdir(parents=True, exist_ok=True)
        for n in counts:
            # ~ (header 10 + residues * 61/60 + 2) bytes a record in, plus dim*4 + ~30 bytes a row out
            need = int(n * (args.median * 1.3 + 14) + n * (args.dim * 4 + 40)) + (1 << 30)
            free = shutil.disk_usage(work).free
            if need > free:
                log(f"skipping {n:,} records: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free in {work}")
                doc["runs"][str(n)] = {"skipped": f"needs ~{need / 2**30:.1f} GiB disk, {free / 2**30:.1f} free"}
                continue
            fasta = work / f"cpu-{n}.fasta"
            t = time.perf_counter()
            info = write_short_fasta(fasta, n, median=args.median)
            log(f"{n:,} records: FASTA {info['bytes'] / 2**20:,.0f} MiB, {info['tokens']:,} tokens, "
                f"written in {time.perf_counter() - t:.0f}s")
            out = work / f"cpu-out-{n}"
            cmd = [sys.executable, str(Path(__file__).resolve()), "_cpu-one", str(fasta), str(out),
                   "--dim", str(args.dim), "--block", str(args.block), "--budget", str(args.budget),
                   "--sample-every", str(max(n // 20, 50_000))]
            log_path = work / f"cpu-{n}.log"
            rc, secs, _ = run_logged(cmd, log_path, args.timeout, env=child_env())
            shutil.rmtree(out, ignore_errors=True)
            fasta.unlink(missing_ok=True)
            if rc != 0:
                log(f"{n:,} records failed ({rc}):\n{tail(log_path)}")
                doc["runs"][str(n)] = {"error": tail(log_path, 10)}
                continue
            res = json.loads(log_path.read_text().strip().splitlines()[-1])
            doc["runs"][str(n)] = res
            per = res["cpu_s_per_mtok"]
            log(f"{n:,} records in {secs:.0f}s: CPU s/Mtok read {per['read']:.3f} (dedup {per['read_dedup']:.3f}), "
                f"tokenize {per['tokenize']:.3f}, pack {per['pack']:.3f}, "
                f"write {per['write']:.3f}; RSS peak {res['rss_peak_mib']} MiB (dedup filter {res['dedup_filter_mib']} "
                f"MiB, peak minus dedup {res['rss_peak_minus_dedup_mib']} MiB)")
    done = [r for r in doc["runs"].values() if "rss_peak_mib" in r]
    if len(done) >= 2:
        a, b = done[0], done[-1]
        doc["memory_growth"] = {
            "records": [a["records"], b["records"]],
            "rss_peak_mib": [a["rss_peak_mib"], b["rss_peak_mib"]],
            "dedup_filter_mib": [a["dedup_filter_mib"], b["dedup_filter_mib"]],
            "rss_peak_minus_dedup_mib": [a["rss_peak_minus_dedup_mib"], b["rss_peak_minus_dedup_mib"]],
            "non_dedup_growth_mib": round(b["rss_peak_minus_dedup_mib"] - a["rss_peak_minus_dedup_mib"], 1),
        }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {out_file}")
    return 0


def merge_docs(base: dict, new: dict) -> dict:
    """`new` into `base`: per model, its runs and reference replace those of the same name; ratios recomputed."""
    for key, value in new.items():
        if key != "models" and key not in TARGETS and key != "targets":
            base.setdefault(key, value)
    for m, entry in new.get("models", {}).items():
        into = base.setdefault("models", {}).setdefault(m, {})
        runs = {**into.get("runs", {}), **entry.get("runs", {})}
        into.update({k: v for k, v in entry.items() if k != "runs"})
        into["runs"] = runs
        into.update(compute_ratios(into))
    summarize(base)
    return base


def cmd_merge(args) -> int:
    """Merge result files (e.g. a 1-GPU run and a 4-GPU run) into one, recomputing every ratio."""
    docs = [json.loads(Path(p).read_text()) for p in args.files]
    merged = docs[0]
    for d in docs[1:]:
        merged = merge_docs(merged, d)
    for entry in merged.get("models", {}).values():
        entry.update(compute_ratios(entry))
    summarize(merged)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(merged, indent=2, default=str) + "\n")
    print(markdown_table(merged))
    log(f"wrote {args.output}")
    return 0


def cmd_make_ckpt(args) -> int:
    t = time.perf_counter()
    write_random_esm2(Path(args.path), args.layers, args.dim, args.heads, args.seed, args.dtype)
    print(f"wrote {args.path} in {time.perf_counter() - t:.1f}s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("gpu", help="runner embed vs the reference script, on GPUs")
    g.add_argument("--models", default="650M,3B", help=f"comma list of {', '.join(ARCH)}")
    g.add_argument("--seqs", help="synthetic sequences per GPU: N or 650M=20480,3B=8192 "
                                  f"(default {DEFAULT_SEQS['650M']} / {DEFAULT_SEQS['3B']})")
    g.add_argument("--ref-seqs", help="sequences for the reference script (it reports tok/s, so fewer are "
                                      f"enough): N or 650M=2000,3B=600 (default {DEFAULT_REF_SEQS['650M']} / "
                                      f"{DEFAULT_REF_SEQS['3B']})")
    g.add_argument("--ref-modes", default=REF_MODES)
    g.add_argument("--reference", help="path of reference_bench.py (omit to skip the reference figures)")
    g.add_argument("--gpus", default="1", help="GPU counts, e.g. 1 or 1,4 (4 gives scaling_efficiency_4gpu)")
    g.add_argument("--shadow-rates", default="0,0.01", help="shadow rates run at the smallest GPU count")
    g.add_argument("--token-budget", help="passed to runner embed (default: its auto budget)")
    g.add_argument("--eager-baseline", action="store_true",
                   help="also run shadow 0 with --no-compile at the smallest GPU count (gives compile_speedup)")
    g.add_argument("--rows-per-part", type=int, default=2048, help="small parts give the steady-state clock")
    g.add_argument("--runner-arg", action="append", help="extra argument for runner embed (repeatable)")
    g.add_argument("--out", default=str(RESULTS))
    g.add_argument("--workdir", help="keep FASTA/checkpoints/logs here (default: a temporary directory)")
    g.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    g.add_argument("--cpu-check", type=int, default=20000,
                   help="records of the bench FASTA timed through the CPU stages (0 = skip)")
    g.add_argument("--keep", action="store_true", help="keep runner outputs")
    g.add_argument("--keep-checkpoints", action="store_true")
    g.add_argument("--no-merge", action="store_true", help="overwrite, not merge into, today's result file")
    g.add_argument("--dry-run", action="store_true", help="print the plan and the commands only")
    g.set_defaults(fn=cmd_gpu)

    c = sub.add_parser("cpu-stages", help="CPU-stage cost and memory at 1M / 10M records (no Ray, no GPU)")
    c.add_argument("--records", default="1000000,10000000")
    c.add_argument("--median", type=float, default=100, help="median residues (short: worst case per token)")
    c.add_argument("--dim", type=int, default=32, help="fake embedding width written")
    c.add_argument("--block", type=int, default=2048, help="records per block (runner's records_per_block)")
    c.add_argument("--budget", type=int, default=65536, help="token budget per packed batch")
    c.add_argument("--out", default=str(RESULTS))
    c.add_argument("--workdir")
    c.add_argument("--timeout", type=float, default=3600)
    c.set_defaults(fn=cmd_cpu_stages)

    mg = sub.add_parser("merge", help="merge result files (later files win per model run), recompute ratios")
    mg.add_argument("files", nargs="+")
    mg.add_argument("-o", "--output", required=True)
    mg.set_defaults(fn=cmd_merge)

    o = sub.add_parser("_cpu-one", help=argparse.SUPPRESS)
    o.add_argument("fasta")
    o.add_argument("out_dir")
    o.add_argument("--limit", type=int, default=0)
    o.add_argument("--dim", type=int, default=32)
    o.add_argument("--block", type=int, default=2048)
    o.add_argument("--budget", type=int, default=65536)
    o.add_argument("--rows-per-part", type=int, default=16384)
    o.add_argument("--sample-every", type=int, default=250_000)
    o.set_defaults(fn=cmd_cpu_one)

    k = sub.add_parser("_make-ckpt", help=argparse.SUPPRESS)
    k.add_argument("path")
    k.add_argument("layers", type=int)
    k.add_argument("dim", type=int)
    k.add_argument("heads", type=int)
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    k.set_defaults(fn=cmd_make_ckpt)

    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
