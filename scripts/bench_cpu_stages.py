"""The CPU-stage benchmark (`bench.py cpu-stages`, and `cpu_check` inside `bench.py gpu`): the real read,
tokenize/pack and write code of runner on one core, no Ray, no weights; CPU seconds per million tokens per
stage and RSS samples. Each measurement runs in a fresh process (`bench.py _cpu-one`), so RSS is its own."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_data import write_short_fasta
from bench_monitor import _proc_status_kb, child_env, log, run_logged, tail

BENCH = Path(__file__).resolve().with_name("bench.py")  # the command line; its `_cpu-one` runs cmd_cpu_one


def _vm_kb(key: str) -> int:
    return _proc_status_kb(os.getpid(), key) or 0


def cpu_stage_run(fasta: Path, out_dir: Path, block: int = 2048, budget: int = 65536, dim: int = 32,
                  rows_per_part: int = 16384, limit: int = 0, sample_every: int = 250_000,
                  breakdown_every: int = 8) -> dict:
    """The real CPU-stage code on one FASTA, one core, no Ray: per-stage process time and RSS samples.

    read = `runner.input.stream.read_blocks` (FASTA parse + duplicate filter + Arrow blocks: the single read
    task), its duplicate-filter share timed inside `DuplicateFilter.check`; tokenize+pack =
    `runner.input.stream.pack_records` (what each pack task runs), split into tokenize / pack by re-timing
    `Preparer.prepare` and `pack_block` on every `breakdown_every`-th block; write = fake embeddings
    (width `dim`) through `PartWriter`, as the driver writes them.
    """
    import numpy as np
    import pyarrow.compute as pc

    import runner.input.stream as stream
    from runner.input.batch import InputRecord
    from runner.input.packing import pack_block
    from runner.input.prepare import DuplicateFilter, Preparer
    from runner.models.esm2 import Esm2Codec
    from runner.output.sink import EmbeddedRows, PartWriter

    pt = time.process_time

    class TimedFilter(DuplicateFilter):
        """The read task's duplicate filter, kept for its size and timed."""

        made: list[DuplicateFilter] = []
        cpu = 0.0

        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            TimedFilter.made.append(self)

        def register(self, ids, sources=None):
            t = pt()
            try:
                return super().register(ids, sources)
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
            cmd = [sys.executable, str(BENCH), "_cpu-one", str(fasta), str(out),
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


def cpu_check(fasta: Path, work: Path, args, entry: dict) -> dict:
    """CPU s per million tokens of each CPU stage on (a prefix of) the benchmark's own FASTA, and how many
    cores each would need at the measured runner rate: the single read task must stay under one core."""
    out = work / "cpu-check"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, str(BENCH), "_cpu-one", str(fasta), str(out),
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
