"""The --dedup benchmark (`bench.py dedup`): one FASTA in which a share of the records repeat an earlier record's
sequence, embedded without and with --dedup; the GPU time (the actors' busy seconds, from the manifests) must
fall in proportion to the tokens --dedup leaves out, and every repeat must get its first record's vector."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import re
import shutil
import tempfile
from pathlib import Path

from bench_data import AA, write_random_esm2
from bench_monitor import gpu_name, log

ARCH = {"tiny": (2, 64, 4), "8M": (6, 320, 20), "150M": (30, 640, 20), "650M": (33, 1280, 20),
        "3B": (36, 2560, 40)}


def write_repeated_fasta(path: Path, n: int, repeat_fraction: float, seed: int = 0, median: float = 300,
                         sigma: float = 0.65, lo: int = 30, hi: int = 1022, width: int = 60) -> dict:
    """N records of which `repeat_fraction` repeat an earlier record's sequence (drawn uniformly from the
    distinct ones, placed anywhere after it); some repeats are lower-case (cleaning makes them equal)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    distinct = n - int(round(n * repeat_fraction))
    lens = np.clip(np.exp(rng.standard_normal(distinct) * sigma + math.log(median)), lo, hi).astype(np.int64)
    lut = np.frombuffer(AA.encode(), dtype=np.uint8)
    res = lut[rng.integers(0, len(AA), int(lens.sum()), dtype=np.uint8)].tobytes()
    starts = np.concatenate([[0], np.cumsum(lens)])
    order = np.concatenate([np.arange(distinct), rng.integers(0, distinct, n - distinct)])
    rng.shuffle(order)
    residues = 0
    with open(path, "wb") as f:
        for i, k in enumerate(order.tolist()):
            seq = res[starts[k] : starts[k + 1]]
            if i % 3 == 0:
                seq = seq.lower()
            residues += len(seq)
            body = b"\n".join(seq[j : j + width] for j in range(0, len(seq), width))
            f.write(b">r%d\n%s\n" % (i, body))
    return {"records": n, "distinct": distinct, "repeat_fraction": repeat_fraction, "residues": residues,
            "tokens": residues + 2 * n, "bytes": path.stat().st_size}


def busy_seconds(manifest: dict) -> float:
    """Seconds the embedding actors spent in forwards, summed over actors (the GPU time of the job)."""
    return sum(a.get("busy_seconds", 0.0) for a in manifest.get("throughput", {}).get("actors", {}).values())


def compare_vectors(plain: Path, dedup: Path, fasta: Path) -> dict:
    """Repeats equal their first record bit for bit; every row close to the run without --dedup."""
    import numpy as np
    import pyarrow as pa

    def load(out: Path) -> dict:
        parts = sorted((out / "embeddings").glob("part-*.arrow"))
        table = pa.concat_tables([pa.ipc.open_file(p).read_all() for p in parts])
        dim = table.schema.field("embedding").type.list_size
        vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
        return dict(zip(table.column("id").to_pylist(), vectors, strict=True))

    a, b = load(plain), load(dedup)
    first: dict[str, str] = {}
    repeats_equal = True
    sid, seq = None, []
    records = []
    for line in fasta.read_text().splitlines():
        if line.startswith(">"):
            if sid is not None:
                records.append((sid, "".join(seq).upper()))
            sid, seq = line[1:].split()[0], []
        else:
            seq.append(line.strip())
    if sid is not None:
        records.append((sid, "".join(seq).upper()))
    for rid, s in records:
        rep = first.setdefault(s, rid)
        repeats_equal &= bool(np.array_equal(b[rid], b[rep]))
    ids = sorted(a)
    va = np.stack([a[i] for i in ids])
    vb = np.stack([b[i] for i in ids])
    cos = (va * vb).sum(1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
    return {"same_ids": set(a) == set(b), "repeats_equal_first_record": repeats_equal,
            "min_cosine_vs_plain": round(float(cos.min()), 6), "max_abs_diff_vs_plain": float(np.abs(va - vb).max())}


def cmd_dedup(args, run_runner) -> int:
    """`bench.py dedup`: plain and --dedup runs of one repeated-sequence FASTA, `repeats` interleaved pairs."""
    date = dt.date.today().isoformat()
    gpu = re.sub(r"[^a-z0-9]+", "-", gpu_name().lower()).strip("-") if args.gpus > 0 else "cpu"
    out_file = Path(args.out) / f"{date}-{gpu}-dedup.json"
    layers, dim, heads = ARCH[args.model]
    work_ctx = tempfile.TemporaryDirectory(prefix="runner-dedup-bench-") if not args.workdir else None
    work = Path(args.workdir or work_ctx.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    fasta = work / "repeated.fasta"
    data = write_repeated_fasta(fasta, args.seqs, args.repeat_fraction, median=args.median)
    log(f"{fasta}: {data}")
    ckpt = write_random_esm2(work / f"esm2-{args.model}.pt", layers, dim, heads)
    doc: dict = {"date": date, "device": gpu, "host": platform.node(), "model": args.model, "gpus": args.gpus,
                 "input": data, "runs": {}}
    run_args = argparse.Namespace(rows_per_part=args.rows_per_part, token_budget=args.token_budget,
                                  runner_arg=args.runner_arg, timeout=args.timeout)
    for k in range(1, args.repeats + 1):
        for mode, extra in (("plain", ()), ("dedup", ("--dedup",))):
            out = work / f"{mode}-{k}"
            shutil.rmtree(out, ignore_errors=True)
            res = run_runner(fasta, ckpt, out, args.gpus, 0.0, run_args, work, extra)
            manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
            res["busy_seconds"] = round(busy_seconds(manifest), 3)
            res["dedup"] = manifest.get("dedup")
            doc["runs"][f"{mode}_{k}"] = res
        plain, dedup = doc["runs"][f"plain_{k}"], doc["runs"][f"dedup_{k}"]
        if plain.get("tokens") and dedup.get("tokens") and plain["busy_seconds"] and dedup["busy_seconds"]:
            expected = dedup["tokens"] / plain["tokens"]
            measured = dedup["busy_seconds"] / plain["busy_seconds"]
            doc["runs"][f"dedup_{k}"]["vs_plain"] = {
                "token_ratio": round(expected, 4),
                "gpu_time_ratio": round(measured, 4),
                # 1.0 = the GPU time fell exactly in proportion to the tokens left out
                "gpu_time_ratio_over_token_ratio": round(measured / expected, 4),
                "wall_ratio": round(dedup["process_seconds"] / plain["process_seconds"], 4),
                **compare_vectors(work / f"plain-{k}", work / f"dedup-{k}", fasta),
            }
            log(f"pair {k}: tokens x{expected:.3f}, GPU time x{measured:.3f} ({measured / expected:.3f} of "
                f"proportional), {doc['runs'][f'dedup_{k}']['vs_plain']}")
        for mode in ("plain", "dedup"):
            if not args.keep:
                shutil.rmtree(work / f"{mode}-{k}", ignore_errors=True)
    pairs = [r["vs_plain"] for r in doc["runs"].values() if "vs_plain" in r]
    if pairs:
        ratios = sorted(p["gpu_time_ratio_over_token_ratio"] for p in pairs)
        doc["gpu_time_ratio_over_token_ratio_median"] = ratios[len(ratios) // 2]
        doc["target"] = "GPU time falls in proportion: gpu_time_ratio_over_token_ratio within 1 +- 0.05"
        doc["passed"] = all(abs(r - 1) <= 0.05 for r in ratios) and all(
            p["same_ids"] and p["repeats_equal_first_record"] for p in pairs)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(doc, indent=2) + "\n")
    log(f"wrote {out_file}")
    if work_ctx is not None:
        work_ctx.cleanup()
    return 0


def add_parser(sub, run_runner) -> None:
    """The `dedup` subcommand of bench.py (`run_runner` is bench.py's: one `runner embed` subprocess, measured)."""
    d = sub.add_parser("dedup", help="--dedup on a set with repeated sequences: GPU time vs a plain run")
    d.add_argument("--model", default="650M", choices=sorted(ARCH))
    d.add_argument("--gpus", type=int, default=1)
    d.add_argument("--seqs", type=int, default=40960, help="records (plain run embeds all of them)")
    d.add_argument("--repeat-fraction", type=float, default=0.4, help="share of records repeating an earlier one")
    d.add_argument("--median", type=float, default=300, help="median residues")
    d.add_argument("--repeats", type=int, default=1, help="interleaved plain/dedup pairs")
    d.add_argument("--rows-per-part", type=int, default=2048)
    d.add_argument("--token-budget", help="passed to runner embed (default: its auto budget)")
    d.add_argument("--runner-arg", action="append", help="extra argument for runner embed (repeatable)")
    d.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "benchmarks" / "results"))
    d.add_argument("--workdir", help="keep inputs/outputs here (default: a temporary directory)")
    d.add_argument("--keep", action="store_true", help="keep the runs' outputs")
    d.add_argument("--timeout", type=float, default=900)
    d.set_defaults(fn=lambda args: cmd_dedup(args, run_runner))
