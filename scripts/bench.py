"""Throughput benchmark of `runner embed` against the reference ESM-2 / ESM C anchors, and of its CPU stages.

    python scripts/bench.py gpu --models 650M,3B --gpus 1 --shadow-rates 0,0.01 \\
        --reference build/bench_ref/reference_bench.py --out benchmarks/results/
    python scripts/bench.py gpu --models esmc300,esmc600 --gpus 1 --shadow-rates 0 \\
        --reference build/bench_ref/reference_bench.py --out benchmarks/results/
    python scripts/bench.py gpu --models 650M --gpus 1 --shadow-rates 0 --outputs per_token_fp16,layers3
    python scripts/bench.py gpu --models 650M --gpus 1 --shadow-rates 0 --outputs layers3 --repeats 3 \\
        --seqs 650M=6144 --cpu-check 0
    python scripts/bench.py cpu-stages --records 1000000,10000000 --out benchmarks/results/
    python scripts/bench.py dedup --model 650M --gpus 1 --seqs 40960 --repeat-fraction 0.4 --out benchmarks/results/

`gpu`: per architecture, writes a synthetic FASTA (the reference script's generator: lognormal lengths,
median 300, sigma 0.65, clipped to 30..1022, 20 amino acids, seed 0) and a random-weight fair-esm checkpoint
of the real architecture (fp16 weights; ESM C: an original-layout .pth), runs the reference script (fair-esm
FP32/FP16 extract, minimal packed varlen FP16; for ESM C transformers' EsmcModel, SDPA, FP16, padded batches of
4096 and 16384 tokens) and `python -m runner embed` (a subprocess: this process never imports Ray) once per GPU
count and shadow rate, samples driver RSS (/proc) and GPU memory per process (nvidia-smi) meanwhile, and
writes `<out>/<YYYY-MM-DD>-<gpu>.json` (merged into an existing file of the same name) plus a markdown table.
Steady tok/s comes from the actors' own clock in the manifest (`steady_candidates` lists the fallbacks).

`cpu-stages`: CPU only, no Ray, no weights: writes an N-record FASTA and runs the real read
(parse + duplicate filter), tokenize/pack (`runner.input.stream.pack_records`, ESM-2 codec) and write
(`PartWriter`, fake dim-32 embeddings) code in a fresh process per N; reports CPU seconds per million
tokens per stage and RSS sampled along the way (flat in N except for the duplicate filter, by design).

`dedup` (scripts/bench_dedup.py): a FASTA where a share of the records repeat earlier sequences, run without
and with --dedup; the actors' busy seconds must fall in proportion to the tokens left out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_cpu_stages import cmd_cpu_one, cmd_cpu_stages, cpu_check
from bench_data import write_random_esm2, write_random_esmc, write_synth_fasta
from bench_dedup import add_parser as add_dedup_parser
from bench_monitor import child_env, gpu_name, log, run_logged, tail
from bench_report import TARGETS, compute_ratios, markdown_table, merge_docs, output_pairs_lines, summarize

# Module map: bench_data (synthetic FASTA, random checkpoints), bench_monitor (subprocesses, RSS and GPU
# sampling), bench_report (ratios, targets, table, merge), bench_cpu_stages (the `cpu-stages` benchmark).

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
    # ESM C (the reference script's names): 300M and 600M, 64-wide heads, SwiGLU; checkpoints in the original layout.
    "esmc300": (30, 960, 15),
    "esmc600": (36, 1152, 18),
}
ESMC_ARCHS = ("esmc300", "esmc600")
# Steady tok/s per GPU the ESM C models should reach on one H200 (issue 16: by FLOPs 300M has about twice the
# headroom of ESM-2 650M), and at least 3x transformers' best batch size (bench_report's vs_transformers_esmc).
TOK_TARGETS = {"esmc300": 500_000, "esmc600": 300_000}

# Defaults sized so that one H200 runs 650M + 3B, shadow 0 and 0.01, in about 8 minutes (see README).
# Multiples of runner's 2048 records per block: the driver receives one block's embeddings at a time, and
# the steady-state clock needs a few blocks after the first (650M: 10 blocks, 3B: 4 blocks).
DEFAULT_SEQS = {"tiny": 4096, "8M": 20480, "35M": 20480, "150M": 20480, "650M": 20480, "3B": 8192,
                "esmc300": 30720, "esmc600": 20480}
DEFAULT_REF_SEQS = {"tiny": 64, "8M": 4000, "35M": 4000, "150M": 3000, "650M": 2000, "3B": 600,
                    "esmc300": 2000, "esmc600": 2000}
REF_MODES = "extract32,extract16,packed16"
ESMC_REF_MODES = "hfc16,hfc16_16384"  # transformers' EsmcModel at its default and its best batch size


def ref_modes(args, model: str) -> str:
    """The reference modes of a model: --ref-modes when given, else its family's (ESM-2 or ESM C)."""
    return args.ref_modes or (ESMC_REF_MODES if model in ESMC_ARCHS else REF_MODES)


def checkpoint_path(work: Path, model: str) -> Path:
    """The random checkpoint of a model: fair-esm .pt for ESM-2, EvolutionaryScale's .pth layout for ESM C."""
    return work / (f"esmc-{model}.pth" if model in ESMC_ARCHS else f"esm2-{model}.pt")

# Output variants (issue 15), each run beside the plain shadow-0 run at the smallest GPU count (and repeat):
# name -> extra `runner embed` arguments for a model of L layers. bench_report compares each with the plain run
# (`<variant>_vs_pooled`); per-token runs also report the bytes/s the actors wrote.
OUTPUT_VARIANTS = {
    "per_token_fp16": lambda layers: ("--per-token", "--per-token-dtype", "float16"),
    "per_token": lambda layers: ("--per-token",),
    # issue 19: per_token_fp16 with the per-token CRC-32 switched off (VARIANT_ENV): the checksum's end-to-end cost
    "per_token_fp16_nocrc": lambda layers: ("--per-token", "--per-token-dtype", "float16"),
    # 650M: --layers 0,17,33 (embeddings, middle, last) x three poolings, pooled only
    "layers3": lambda layers: ("--layers", f"0,{(layers + 1) // 2},{layers}", "--pooling", "mean,cls,max"),
    # issue 18: the embedding actors write the pooled parts, the driver only commits them (default from 8 GPUs on)
    "actor_parts": lambda layers: ("--part-writer", "actors"),
}

# Environment a variant's `runner embed` runs with besides child_env() (benchmark-only switches).
VARIANT_ENV = {"per_token_fp16_nocrc": {"RUNNER_BENCH_NO_TOKEN_CRC": "1"}}


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


# ------------------------------------------------------------------------------------------ gpu command


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


def steady_candidates(thr: dict, mem: dict, parts: dict) -> dict[str, float | None]:
    """Every steady tok/s clock of a run, best first; None where a clock is missing or not sane.

    `thr`: the manifest's `throughput` section; `mem`: the monitor's figures; `parts`: `steady_from_parts`.
    """
    wall = thr.get("wall_seconds") or 0
    tokens = thr.get("tokens") or 0
    first = thr.get("first_output_seconds")
    actors = thr.get("actor_steady_tokens_per_second")
    return {
        # The actors' own clocks first: each times its batches, so neither nvidia-smi's 0.5 s sampling nor
        # the driver receiving outputs in bursts (seen: a driver "steady" of 500k tok/s for a 223k tok/s
        # GPU) moves it. Manifests from before it have no such field.
        "actor clock": actors if actors and actors > 0 else None,
        # Then the GPU's busy window (nvidia-smi), the driver's first-output clock and the part files' mtimes.
        "gpu busy window": round(tokens / mem["gpu_busy_seconds"], 1) if mem.get("gpu_busy_seconds") else None,
        "manifest": thr.get("steady_tokens_per_second")
        if first is not None and wall and first < 0.8 * wall else None,
        "part mtimes": parts.get("steady_tokens_per_second")
        if parts.get("steady_seconds", 0) >= 0.3 * wall else None,
        "wall": thr.get("tokens_per_second"),
    }


def pick_steady(candidates: dict[str, float | None]) -> tuple[float | None, str]:
    """The first clock with a value, and its name ("wall" when none has one)."""
    source = next((name for name, value in candidates.items() if value), "wall")
    return candidates.get(source), source


def run_runner(fasta: Path, ckpt: Path, out_dir: Path, gpus: int, shadow: float, args, work: Path,
               extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, "-m", "runner", "embed", str(fasta), "--model", str(ckpt), "--out", str(out_dir),
           "--gpus", str(gpus), "--shadow-rate", str(shadow), "--no-progress",
           "--rows-per-part", str(args.rows_per_part)]
    if args.token_budget:
        cmd += ["--token-budget", str(args.token_budget)]
    cmd += args.runner_arg or []
    cmd += list(extra)
    log(f"runner: {' '.join(cmd)}")
    log_path = work / f"runner-{out_dir.name}.log"
    rc, secs, mem = run_logged(cmd, log_path, args.timeout, env={**child_env(), **(env or {})}, monitor=True)
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
        # The actors' own figures (None for manifests from before them): the forward rate and whether
        # the GPU (busy fraction near 1) or the pipeline feeding it (well below 1) set the pace.
        "forward_tokens_per_second": thr.get("forward_tokens_per_second"),
        "actor_busy_fraction": thr.get("actor_busy_fraction"),
        # What the job stored (issue 15): layers, poolings, columns, and the per-token files written.
        "outputs": manifest.get("outputs"),
    })
    # Whatever steady-state / memory figures the manifest offers (added by other work), verbatim.
    extra = find_keys(manifest, re.compile(r"steady|peak|memory|rss", re.I))
    extra.pop("settings.shadow_queue", None)
    if extra:
        result["manifest_extra"] = extra
    parts = steady_from_parts(out_dir)
    result["from_parts"] = parts
    candidates = steady_candidates(thr, mem, parts)
    result["steady_candidates"] = candidates
    result["tokens_per_second_steady"], result["steady_source"] = pick_steady(candidates)
    if manifest.get("shadow"):
        result["shadow"] = manifest["shadow"]
    if "with_shadow" in thr:  # the actor clock while the shadow ran; manifests before it lack the key
        result["with_shadow"] = thr["with_shadow"]
    per_token = (manifest.get("outputs") or {}).get("per_token") or {}
    if per_token.get("written_bytes") and result["tokens"] and result["tokens_per_second_steady"]:
        # Bytes the actors wrote per token, at the steady token rate: the per-token write rate the job sustained.
        result["per_token_bytes_per_token"] = round(per_token["written_bytes"] / result["tokens"], 1)
        result["per_token_bytes_per_second"] = round(
            per_token["written_bytes"] / result["tokens"] * result["tokens_per_second_steady"], 1)
        log(f"per-token: {per_token['written_bytes'] / 2**30:.2f} GiB in {per_token.get('written_files')} files, "
            f"{result['per_token_bytes_per_second'] / 2**30:.2f} GiB/s at the steady rate; actors spent "
            f"{per_token.get('write_seconds')} s writing")
    log(f"runner done in {secs:.0f}s: {result['tokens']} tokens, wall {result['tokens_per_second_wall']} tok/s, "
        f"steady {result['tokens_per_second_steady']} tok/s ({result['steady_source']}), "
        f"forward {result['forward_tokens_per_second']} tok/s, busy {result['actor_busy_fraction']}, "
        f"driver RSS {mem.get('driver_rss_peak_mib')} MiB, GPU/process {mem.get('gpu_process_peak_mib')} MiB")
    if result.get("with_shadow"):
        window = result["with_shadow"]
        log(f"with the shadow running (from {window['from_seconds']} s, {window['batches']} batches, "
            f"{window['tokens']} tokens): {window['tokens_per_second']} tok/s")
    return result



def variant_args(variants: list[str], layers: int) -> list[tuple[str, tuple[str, ...]]]:
    """(name, extra runner embed arguments) of each requested output variant for a model of `layers` layers."""
    return [(v, OUTPUT_VARIANTS[v](layers)) for v in variants]


def repeat_jobs(repeat: int, first_pair: bool, variants: list[str], layers: int) -> list[tuple[str, tuple[str, ...]]]:
    """The runs of one (GPUs, rate) pair in one repeat, in order: (variant or "" for the plain run, extra arguments).

    The output variants run beside the plain run of the first pair (same GPU, same input), each in its own
    `runner embed` process as a user runs it. Odd repeats run the plain run first, even repeats last (plain,
    variants | variants, plain | plain, variants ...): a steady drift of the GPU's clocks over the call then
    favours neither side, and the median of the per-repeat ratios (bench_report) cancels the rest."""
    jobs = variant_args(variants, layers) if first_pair else []
    return [("", ()), *jobs] if repeat % 2 == 1 else [*jobs, ("", ())]


def run_name(gpus: int, rate: float, repeat: int = 1, sep: str = "_") -> str:
    """The key of a run in the result file, g<G>_s<R>[_r<k>] (k from 2); with sep="-", its output folder's."""
    return sep.join([f"g{gpus}", f"s{rate:g}"] + ([f"r{repeat}"] if repeat > 1 else []))


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
    # --repeats N runs the whole plan N times, interleaved (s0, s0.01, s0, s0.01, ...): a shadow cost of a
    # few percent is below the run-to-run noise of one pair (~5 % on an H200), so it is read from medians
    # and from back-to-back pairs. Repeat k >= 2 is named g<G>_s<R>_r<k>.
    runs_planned = [(g, r, k) for k in range(1, args.repeats + 1) for g, r in plan]
    variants = [v.strip() for v in (args.outputs or "").split(",") if v.strip()]
    unknown_variants = [v for v in variants if v not in OUTPUT_VARIANTS]
    if unknown_variants:
        sys.exit(f"unknown --outputs {unknown_variants}: choose from {', '.join(OUTPUT_VARIANTS)}")

    work_ctx = (contextlib.nullcontext(args.workdir) if args.workdir
                else tempfile.TemporaryDirectory(prefix="runner-bench-"))
    with work_ctx as work_s:
        work = Path(work_s)
        work.mkdir(parents=True, exist_ok=True)
        log(f"GPU: {name}; models {models}; GPU counts {gpus}; shadow rates {rates}; work dir {work}; "
            f"results -> {out_file}")
        for m in models:
            log(f"plan {m} {ARCH[m]}: FASTA of {seqs[m]} x GPUs synthetic proteins, fp16 random checkpoint, "
                f"reference {ref_seqs[m]} seqs ({ref_modes(args, m)}), runs {plan}")
        if args.dry_run:
            for m in models:
                if ref:
                    print(f"  {sys.executable} {ref} {m} {ref_seqs[m]} {ref_modes(args, m)}")
                for g, r, k in runs_planned:
                    for variant, extra in repeat_jobs(k, (g, r) == plan[0], variants, ARCH[m][0]):
                        name = run_name(g, r, k, "-") + (f"-{variant}" if variant else "")
                        print(f"  {sys.executable} -m runner embed {work}/{m}-{seqs[m] * g}.fasta --model "
                              f"{checkpoint_path(work, m)} --out {work}/out-{m}-{name} --gpus {g} "
                              f"--shadow-rate {r:g} --no-progress --rows-per-part {args.rows_per_part} {' '.join(extra)}"
                              + "".join(f"  ({k}={v})" for k, v in (VARIANT_ENV.get(variant) or {}).items()))
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
            "steady": "runner tok/s on the actors' own clock (manifest throughput.actor_steady_tokens_per_second: "
                      "every actor's tokens after its first batch / earliest first to latest last batch done); "
                      "else the GPU busy window (nvidia-smi), the driver's first output to end, the part mtimes "
                      "(runs.*.steady_source says which): excludes Ray start-up and model loading; *_wall ratios "
                      "include them",
            "forward": "runs.*.forward_tokens_per_second: tokens / seconds the actors spent in forwards (summed "
                       "over actors); actor_busy_fraction: the lowest actor's share of its span spent in forwards",
            "ratios": "per GPU at the smallest GPU count, shadow rate 0 unless named; top-level = worst model",
            "shadow_cost": "shadow_cost_R = 1 - (shadow-R run's actor clock from its shadow's first comparison to the end, "
                           "manifest throughput.with_shadow) / (shadow-0 run's steady actor clock); runs without "
                           "that window use their whole-job steady rate; shadow_cost_R_whole_job compares the whole "
                           "jobs; a window under 5 batches or 10 % of the tokens is 'lagging' (not a result)",
            "reference": "reference script run with its own (smaller) sequence count, same generator; "
                         "it reports tok/s after model load and a 64-sequence warm-up",
            "gpu_memory": "nvidia-smi used_memory per process (PyTorch caching allocator reservation)",
        })
        def save(entry: dict) -> None:
            """Ratios, summary and the result file as they stand: a run cut short by a time limit keeps the rest."""
            entry.update(compute_ratios(entry))
            summarize(doc)
            out_dir.mkdir(parents=True, exist_ok=True)
            out_file.write_text(json.dumps(doc, indent=2, default=str) + "\n")

        for m in models:
            layers, dim, heads = ARCH[m]
            entry = doc["models"].setdefault(m, {})
            entry["architecture"] = {"layers": layers, "embed_dim": dim, "heads": heads}
            if m in TOK_TARGETS:
                entry["target_tok_per_s"] = TOK_TARGETS[m]
            t = time.perf_counter()
            ckpt = checkpoint_path(work, m)
            if not ckpt.is_file():
                log(f"{m}: writing random fp16 checkpoint {ckpt}")
                family = ["--family", "esmc"] if m in ESMC_ARCHS else []
                rc, secs, _ = run_logged([sys.executable, str(Path(__file__).resolve()), "_make-ckpt", str(ckpt),
                                          str(layers), str(dim), str(heads), *family], work / f"ckpt-{m}.log",
                                         args.timeout, env=child_env())
                if rc != 0:
                    log(f"checkpoint failed:\n{tail(work / f'ckpt-{m}.log')}")
                    return 1
                log(f"{m}: checkpoint {ckpt.stat().st_size / 2**30:.2f} GiB in {secs:.0f}s")
            if ref:
                entry["reference"] = run_reference(ref, m, ref_seqs[m], ref_modes(args, m), work, args.timeout)
            runs = entry.setdefault("runs", {})
            for g, r, k in runs_planned:
                n = seqs[m] * max(g, 1)
                fasta = work / f"{m}-{n}.fasta"
                if not fasta.is_file():
                    info = write_synth_fasta(fasta, n)
                    log(f"{m}: FASTA {fasta.name}: {info['records']} records, {info['tokens']:,} tokens")
                for variant, extra in repeat_jobs(k, (g, r) == plan[0], variants, layers):
                    name = run_name(g, r, k) + (f"_{variant}" if variant else "")
                    out = work / (f"out-{m}-{run_name(g, r, k, '-')}" + (f"-{variant}" if variant else ""))
                    shutil.rmtree(out, ignore_errors=True)
                    runs[name] = run_runner(fasta, ckpt, out, g, r, args, work, extra, VARIANT_ENV.get(variant))
                    if variant:
                        runs[name]["variant"] = variant
                    if not args.keep:
                        shutil.rmtree(out, ignore_errors=True)
                    save(entry)
            for line in output_pairs_lines(entry):
                log(f"{m} {line}")
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
            save(entry)
            log(f"{m}: done in {time.perf_counter() - t:.0f}s: "
                + ", ".join(f"{k}={entry.get(k)}" for k in TARGETS if entry.get(k) is not None))
            if not args.keep_checkpoints:
                ckpt.unlink(missing_ok=True)
        print(markdown_table(doc), flush=True)
        log(f"wrote {out_file}")
    return 0


# ------------------------------------------------------------------------------------------ merge, checkpoints, command line


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
    write = write_random_esmc if args.family == "esmc" else write_random_esm2
    write(Path(args.path), args.layers, args.dim, args.heads, args.seed, args.dtype)
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
    g.add_argument("--ref-modes", help=f"reference modes (default: {REF_MODES} for ESM-2, {ESMC_REF_MODES} for ESM C)")
    g.add_argument("--reference", help="path of reference_bench.py (omit to skip the reference figures)")
    g.add_argument("--gpus", default="1", help="GPU counts, e.g. 1 or 1,4 (4 gives scaling_efficiency_4gpu)")
    g.add_argument("--shadow-rates", default="0,0.01", help="shadow rates run at the smallest GPU count")
    g.add_argument("--token-budget", help="passed to runner embed (default: its auto budget)")
    g.add_argument("--eager-baseline", action="store_true",
                   help="also run shadow 0 with --no-compile at the smallest GPU count (gives compile_speedup)")
    g.add_argument("--rows-per-part", type=int, default=2048, help="small parts give the steady-state clock")
    g.add_argument("--runner-arg", action="append", help="extra argument for runner embed (repeatable)")
    g.add_argument("--outputs", help="output variants run beside the plain shadow-0 run and compared with it: "
                                     f"comma list of {', '.join(OUTPUT_VARIANTS)} (e.g. per_token_fp16,layers3)")
    g.add_argument("--repeats", type=int, default=1,
                   help="run the plan N times, interleaved; ratios use medians, shadow costs and output variants "
                        "also per repeat (variants alternate sides: plain first in odd repeats, last in even ones)")
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

    add_dedup_parser(sub, run_runner)

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
    k.add_argument("--family", default="esm2", choices=["esm2", "esmc"])
    k.set_defaults(fn=cmd_make_ckpt)

    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
