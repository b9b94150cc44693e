"""What the driver and the CPU stages cost per row and per token, with embedding actors that return vectors at once.

    python scripts/bench_driver.py --records 100000 --medians 60,300 --dims 1280,2560 \\
        --out benchmarks/results/2026-11-30-driver-scale.json

No Ray and no weights: the real code of each stage runs in this one process, on one core, timed with the
process clock (CPU seconds, not wall seconds, so other load on the machine inflates them less):

- read: `runner.input.stream.read_blocks` (FASTA parse, duplicate-id filter, Arrow blocks): the single read task;
  `read_dedup` is the same with --dedup's cleaning and sequence table.
- pack: `runner.input.stream.pack_records` per block (clean, tokenize, pack): the parallel pack tasks.
- actor host work: `InstantEmbedStage`, a TEST-ONLY stand-in for `runner.stages.embed_stage.EmbedStage` that runs the
  real `_embed_row` (Arrow in, Arrow out) but returns a fixed random matrix instead of a forward. It lives in
  this script only: nothing in runner can reach it. Its cost is spent on the actors' hosts, not the driver.
- driver: `runner.driver.collect.handle_table` on each stand-in output with a real `PartWriter` (Arrow parts of
  D-wide float32 vectors, fsynced and renamed) and, for --dedup, `CopyWriter.flush`: what the one driver does
  per row, minus Ray Data's own delivery (object fetch, executor), which comes on top.

`--part-writers driver,actors` measures both ways of writing the pooled parts (`runner embed --part-writer`):
`driver` as above; `actors`: the stand-in actors write their staged parts themselves (runner.output.staged: Arrow,
CRC-32, fsync, rename; counted in the actors' host work) and the driver's handle_table only commits them (ordinal
check, one journal line each, a rename; grouped, as in a job).

`--ray-delivery N` also measures what the earlier figures leave out: Ray Data's own delivery of stage outputs to the
driver. A local Ray streams N small tables (the size of one batch's output with --part-writer actors: a record
row and a shadow row) from actors through `iter_batches`, as `runner.driver.collect.drain` pulls them, and the
driver process's CPU seconds per table (its executor threads included) are reported.

`--stages read` measures the read task alone (seconds, not minutes): `read` as above, `read_parse` (the FASTA
parse into Arrow columns, `runner.input.sources.read_runs`, a part of `read`) and `read_handoff` (each block pickled
with protocol 5 and its buffers copied once: the least that handing it to Ray's object store costs, on top of
`read`; Ray's own object creation per block comes on top of that), on the plain input, the same input
gzipped (`gz`), with Illumina-style read names as headers (`named`: ~52-byte headers, ~36-byte ids; the synthetic
ids are 2-7 bytes) and, with --dedup, the 40 %-repeated input; µs per record and the H200s one read task keeps
up with, for each model width in --dims (the rate of the GPUs differs, the read cost does not).

From the per-row and per-token costs it reports the rows/s and tokens/s one core sustains per stage and the
cores each stage needs at 8, 64 and 256 H200s' rate (650M: ~330k tok/s per GPU on short reads, 324k on
protein-length; 3B: ~91k), and whether the one driver (one core, one process) keeps up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import pickle
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

# Tokens/s one H200 embeds (runner, actor clock; benchmarks/results/2026-11-29-nvidia-h200*.json and issue 18).
GPU_RATE = {(1280, 60): 330_000, (1280, 300): 324_000, (2560, 60): 91_000, (2560, 300): 91_000}
GPU_COUNTS = (8, 64, 256)


def instant_stage(dim: int, work: Path, staged_dir: str = "", part_rows: int = 16384):
    """A TEST-ONLY EmbedStage whose forward is a fixed random matrix [B, dim]: the real constructor (on a tiny
    checkpoint, so every attribute the row code uses exists) and the real Arrow in/out, no forward. With
    `staged_dir` it writes staged parts there, as `runner embed --part-writer actors` does."""
    import numpy as np
    from tiny_esm2 import make_esm2

    from runner.output.sink import embedding_schema
    from runner.stages.embed_stage import EmbedStage, StageSettings, output_schema

    class InstantEmbedStage(EmbedStage):
        def __init__(self, settings: StageSettings) -> None:
            super().__init__(settings)
            self.embed_dim = dim  # the width benchmarked, not the tiny model's
            self.schema = output_schema(dim)
            if self.staged_dir is not None:
                self.part_schema = embedding_schema(dim, self.part_columns)
            self._vectors = np.random.default_rng(0).standard_normal((1 << 14, dim)).astype(np.float32)

        def embed_guarded(self, batch, pieces=None):
            n = len(batch.ids)
            vectors = self._vectors[np.arange(n) % len(self._vectors)]
            return vectors, np.ones(n, dtype=bool), [None] * n

    checkpoint = work / "instant-tiny.pt"
    if not checkpoint.exists():
        make_esm2(checkpoint)
    return InstantEmbedStage(StageSettings(model=str(checkpoint), precision="fp32", layers=(-1,), poolings=("mean",),
                                           device="cpu", staged_dir=staged_dir, part_rows=part_rows))


def measure(fasta: Path, out_dir: Path, dim: int, block: int, budget: int, rows_per_part: int, dedup: bool,
            part_writer: str = "driver", copy_threads: int | None = None) -> dict:
    """Every stage of one FASTA through the real code; CPU seconds per stage. `part_writer`: "driver" (the driver
    writes every part) or "actors" (the stand-in actors write staged parts, the driver commits them). With
    `dedup`, `copy_threads` threads write the copy parts (runner.input.dedup.COPY_THREADS when None; 0: the
    driver's own thread): their CPU seconds are `copy_threads`, apart from the driver's."""
    import numpy as np

    from runner.config import EmbedConfig
    from runner.driver.collect import handle_table
    from runner.driver.metrics import DriverMetrics
    from runner.input.dedup import COPY_THREADS, CopyWriter
    from runner.input.prepare import Preparer
    from runner.input.stream import PackSettings, ReadSettings, pack_records, read_blocks
    from runner.models.esm2 import Esm2Codec
    from runner.output.report import JobReport
    from runner.output.resume import OrdinalSet
    from runner.output.sink import ChunkMerger, PartWriter, RejectWriter
    from runner.output.staged import remove_staged, staged_dir

    pt = time.process_time
    codec = Esm2Codec()
    read = ReadSettings((str(fasta),), "id", "sequence", block, dedup=Preparer(codec) if dedup else None)
    t = pt()
    blocks = list(read_blocks(read))
    cpu_read = pt() - t

    pack = PackSettings(codec, None, "truncate", 128, budget)
    t = pt()
    packed = [pack_records(b, pack) for b in blocks]
    cpu_pack = pt() - t
    del blocks

    shutil.rmtree(out_dir, ignore_errors=True)
    staged = str(staged_dir(out_dir)) if part_writer == "actors" else ""
    stage = instant_stage(dim, out_dir.parent, staged, rows_per_part)
    t = pt()
    outputs = [stage(p.slice(i, 1)) for p in packed for i in range(p.num_rows)]  # Ray Data: batch_size=1
    cpu_actor = pt() - t
    tokens = sum(int(np.sum(np.diff(np.asarray(c)))) for p in packed for c in p.column("cu_seqlens").to_pylist())
    del packed

    writer = PartWriter(out_dir, dim, rows_per_part)
    rejects = RejectWriter(out_dir)
    report = JobReport(out_dir=out_dir)
    written = OrdinalSet()
    threads = COPY_THREADS if copy_threads is None else copy_threads
    copies = CopyWriter(writer, written, [], threads=threads) if dedup else None
    config = EmbedConfig(model="instant")
    metrics = DriverMetrics("instant", "fp16")
    merger = ChunkMerger()
    # Ray Data hands the driver each actor output as one table (batch_size=None): one per packed batch here.
    wall = time.perf_counter()
    t = pt()
    for table in outputs:
        handle_table(table, writer, rejects, report, merger, config, "fp16", metrics, written, copies)
        if copies is not None:
            report.records_done += copies.flush()
    if copies is not None:
        report.records_done += copies.finish()
    writer.close()
    rejects.close()
    cpu_copies = copies.thread_seconds if copies is not None else 0.0
    cpu_driver = pt() - t - cpu_copies  # the process's CPU (the part clock's thread too), less the copy threads'
    wall_driver = time.perf_counter() - wall
    left_staged = remove_staged(out_dir)  # nothing is left uncommitted in a clean run
    assert left_staged == 0, left_staged
    rows = writer.rows_written
    assert rows + rejects.count == report.records_read, (rows, rejects.count, report.records_read)
    part_bytes = sum(p.stat().st_size for p in (out_dir / "embeddings").glob("part-*.arrow"))
    shutil.rmtree(out_dir, ignore_errors=True)
    result = {
        "records": report.records_read,
        "rows": rows,
        "tokens_embedded": tokens,
        "tokens_per_row": round(tokens / max(rows, 1), 1),
        "cpu_seconds": {"read": round(cpu_read, 3), "pack": round(cpu_pack, 3), "actor_host": round(cpu_actor, 3),
                        "driver": round(cpu_driver, 3),
                        **({"copy_threads": round(cpu_copies, 3)} if copies is not None else {})},
        "driver_wall_seconds": round(wall_driver, 3),
        "part_bytes_per_row": round(part_bytes / max(rows, 1), 1),
        "part_writer": part_writer,
        "parts": len(writer.parts),
        "parts_committed_from_actors": writer.committed,
    }
    if copies is not None:
        result["dedup"] = copies.counts.section(report.records_read)
        result["copy_threads"] = threads
    return result


def measure_read(fasta: Path, block: int, dedup: bool) -> dict:
    """The read task alone: CPU seconds of `read_runs` (parse) and of `read_blocks` (parse, duplicate ids, blocks)."""
    import pyarrow.compute as pc

    from runner.input.prepare import Preparer
    from runner.input.sources import read_runs
    from runner.input.stream import ReadSettings, read_blocks
    from runner.models.esm2 import Esm2Codec

    pt = time.process_time
    t = pt()
    records = sum(len(run) for run in read_runs([fasta]))
    cpu_parse = pt() - t
    settings = ReadSettings((str(fasta),), "id", "sequence", block, dedup=Preparer(Esm2Codec()) if dedup else None)
    t = pt()
    blocks = list(read_blocks(settings))
    cpu_read = pt() - t
    t = pt()
    for block in blocks:  # what handing a block to Ray's object store costs at least: pickle 5 and a copy of the buffers
        buffers: list = []
        head = pickle.dumps(block, protocol=5, buffer_callback=buffers.append)
        stored = bytearray(len(head) + sum(b.raw().nbytes for b in buffers))
        at = len(head)
        for b in buffers:
            view = b.raw().cast("B")
            stored[at : at + view.nbytes] = view
            at += view.nbytes
    cpu_handoff = pt() - t
    # tokens the GPUs embed: every record with a sequence to embed (repeats travel without one), +2 specials each
    sent = [b.column("sequence").drop_null() for b in blocks]
    tokens = sum(int(pc.sum(pc.utf8_length(s)).as_py() or 0) + 2 * len(s) for s in sent)
    rows = sum(b.num_rows for b in blocks)
    assert rows == records, (rows, records)
    return {"records": records, "rows": rows, "tokens_embedded": tokens, "tokens_per_row": round(tokens / rows, 1),
            "cpu_seconds": {"read": round(cpu_read, 4), "read_parse": round(cpu_parse, 4),
                            "read_handoff": round(cpu_handoff, 4)},
            "input_bytes": fasta.stat().st_size}


def write_named_reads(src: Path, dst: Path) -> None:
    """`src` with each header replaced by an Illumina-style read name and description (as reads converted to FASTA
    carry): the read task's cost per record grows with the header bytes it scans and the id bytes it hashes."""
    import re

    counter = iter(range(1 << 62))

    def name(_: re.Match) -> bytes:
        i = next(counter)
        return b">A00123:8:H5KJHDSXX:%d:%d:%d:%d 1:N:0:ATCACGTT" % (1 + i % 4, 1101 + i // 200_000 % 90,
                                                                    1000 + i * 7 % 30_000, 1000 + i % 37_000)

    dst.write_bytes(re.sub(rb"^>[^\n]*", name, src.read_bytes(), flags=re.MULTILINE))


def read_inputs(work: Path, fasta: Path, median: int, records: int, dedup: bool) -> list[tuple[str, Path, bool]]:
    """The read task's inputs for one median: plain, gzipped, Illumina-named and (with dedup) 40 % repeated."""
    import gzip

    from bench_dedup import write_repeated_fasta

    gz = work / f"m{median}.fasta.gz"
    gz.write_bytes(gzip.compress(fasta.read_bytes(), compresslevel=6))
    named = work / f"m{median}-named.fasta"
    write_named_reads(fasta, named)
    variants = [("plain", fasta, False), ("gz", gz, False), ("named", named, False)]
    if dedup:
        repeated = work / f"m{median}-repeated.fasta"
        write_repeated_fasta(repeated, records, 0.4, median=median, lo=10)
        variants.append(("dedup40", repeated, True))
    return variants


class _OneBatchOutput:
    """A Ray Data actor returning, per input row, a table shaped like one batch's output with staged parts: one
    record row with `rows` ordinals and one row with a D-wide vector (a shadow sample)."""

    def __init__(self, dim: int, rows: int) -> None:
        import numpy as np
        import pyarrow as pa

        from runner.stages.embed_stage import output_schema

        schema = output_schema(dim)
        columns = {}
        for field in schema:
            if field.name == "staged_ordinals":
                columns[field.name] = pa.array([list(range(rows)), None], field.type)
            elif field.name == "embedding":
                columns[field.name] = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(2 * dim, np.float32)), dim)
            elif pa.types.is_string(field.type):
                columns[field.name] = pa.array(["x", "y"], field.type)
            elif pa.types.is_list(field.type) or pa.types.is_struct(field.type):
                columns[field.name] = pa.nulls(2, field.type)
            elif pa.types.is_boolean(field.type):
                columns[field.name] = pa.array([True, True])
            else:
                columns[field.name] = pa.array([1, 0], field.type)
        self.table = pa.table(columns, schema=schema)

    def __call__(self, batch):
        return self.table


def ray_delivery(tables: int, dim: int, rows: int) -> dict:
    """Driver CPU seconds per stage-output table that Ray Data delivers (read -> 2 actors -> iter_batches)."""
    import ray

    from runner.driver.collect import PREFETCH_BLOCKS  # as drain pulls them

    path = os.pathsep.join([str(REPO), str(REPO / "scripts"), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})  # the actors import this script's class
    try:
        # one input block per output (as pack tasks hand the actors their blocks); Ray Data may still coalesce
        # outputs, so the tables the driver receives are counted
        ds = ray.data.range(tables, override_num_blocks=tables).map_batches(
            _OneBatchOutput, fn_constructor_kwargs={"dim": dim, "rows": rows}, batch_size=1, batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=2), num_cpus=1)
        received = delivered = 0
        wall, t = time.perf_counter(), time.process_time()  # includes the stream's start: an upper bound
        for table in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=PREFETCH_BLOCKS):
            received += table.num_rows
            delivered += 1
        cpu = time.process_time() - t
        wall = time.perf_counter() - wall
    finally:
        ray.shutdown()
    tables = max(delivered, 1)
    return {"tables": delivered, "rows_per_batch": rows, "dim": dim, "table_rows_received": received,
            "driver_cpu_seconds": round(cpu, 3), "wall_seconds": round(wall, 3),
            "driver_cpu_ms_per_table": round(cpu / tables * 1e3, 3),
            "tables_per_s_one_core": round(tables / cpu) if cpu else None,
            "rows_per_s_one_core": round(tables * rows / cpu) if cpu else None}


def memcpy_gb_per_s(mib: int = 256, repeats: int = 5) -> float:
    """This process's memory-copy bandwidth (best of `repeats`): the driver's per-row cost is mostly copies of
    D-wide vectors, so this calibrates the figures against the machine they ran on (and its other load)."""
    import numpy as np

    src = np.ones(mib << 18, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()  # CPU time, as every stage figure: time waiting for a core does not count
        np.copyto(dst, src)
        best = min(best, time.process_time() - t)
    return round(src.nbytes / best / 1e9, 2)


def derive(res: dict, dim: int, median: int) -> dict:
    """Per-row / per-token costs, one core's rates and the cores each stage needs at 8/64/256 H200s."""
    rows, tokens = res["rows"], res["tokens_embedded"]
    cpu = res["cpu_seconds"]
    # read and pack see every record; the driver every row written; per token = per embedded token
    per_row_us = {k: round(v / max(rows, 1) * 1e6, 2) for k, v in cpu.items()}
    per_mtok_s = {k: round(v / max(tokens, 1) * 1e6, 3) for k, v in cpu.items()}
    one_core = {k: {"rows_per_s": round(rows / v) if v else None, "tokens_per_s": round(tokens / v) if v else None}
                for k, v in cpu.items()}
    gpu_rate = GPU_RATE[(dim, 300 if median >= 200 else 60)]
    need = {}
    for g in GPU_COUNTS:
        tok_s = g * gpu_rate
        row_s = tok_s / res["tokens_per_row"]
        need[f"{g}_h200"] = {
            "tokens_per_s": tok_s,
            "rows_per_s": round(row_s),
            "cores": {k: round(v / max(tokens, 1) * tok_s, 2) for k, v in cpu.items()},
            "disk_write_mb_per_s": round(row_s * res.get("part_bytes_per_row", 0) / 1e6, 1),
        }
    driver_rows = (one_core.get("driver") or {}).get("rows_per_s") or 0
    read_rows = one_core["read"]["rows_per_s"] or 0
    extra = {}
    if "read_handoff" in cpu:  # --stages read: the read task's blocks handed on as well (its end-to-end cost)
        end_to_end = cpu["read"] + cpu["read_handoff"]
        extra["one_read_task_with_handoff_keeps_up_with_h200s"] = round(
            rows / end_to_end * res["tokens_per_row"] / gpu_rate, 1)
    return {**extra, "per_row_us": per_row_us, "cpu_s_per_mtok": per_mtok_s, "one_core": one_core,
            "gpu_rate_per_h200": gpu_rate,
            "at": need,
            # The driver and the read task are one process each: a stage needing more than one core is the ceiling.
            "one_driver_keeps_up_with_h200s": round(driver_rows * res["tokens_per_row"] / gpu_rate, 1) if driver_rows
            else None,
            "one_read_task_keeps_up_with_h200s": round(read_rows * res["tokens_per_row"] / gpu_rate, 1)}


def measure_read_variants(doc: dict, args: argparse.Namespace, work: Path, fasta: Path, info: dict,
                          median: int) -> None:
    """--stages read: each input variant `args.repeats` times (medians of the samples), derived for each width."""
    for name, path, dedup in read_inputs(work, fasta, median, args.records, args.dedup):
        samples = [measure_read(path, args.block, dedup) for _ in range(args.repeats)]
        res = samples[0]
        res["cpu_seconds"] = {k: sorted(r["cpu_seconds"][k] for r in samples)[len(samples) // 2]
                              for k in res["cpu_seconds"]}
        res["cpu_seconds_samples"] = {k: [r["cpu_seconds"][k] for r in samples] for k in res["cpu_seconds"]}
        res["input"] = info if name == "plain" else {"variant": name, "bytes": path.stat().st_size}
        for dim in map(int, args.dims.split(",")):
            key = f"median{median}_d{dim}_{name}_read"
            doc["runs"][key] = {**res, **derive(res, dim, median)}
            print(f"{key}: {res['records']} records, {res['tokens_per_row']} tok/row, read us/record "
                  f"{doc['runs'][key]['per_row_us']}, one read task keeps up with "
                  f"{doc['runs'][key]['one_read_task_keeps_up_with_h200s']} H200s "
                  f"({doc['runs'][key]['one_read_task_with_handoff_keeps_up_with_h200s']} with the hand-off)", flush=True)


def per_repeat(res: dict, plain: dict) -> dict:
    """--dedup: what a repeat costs. The driver's: its CPU beyond the embedded rows' cost (the plain run's driver
    us/row, same writer and D) over the repeats; the copy threads': their CPU over the repeats."""
    repeats = res["dedup"]["repeats"]
    embedded = res["rows"] - repeats
    cpu = res["cpu_seconds"]
    extra = cpu["driver"] - plain["per_row_us"]["driver"] * 1e-6 * embedded
    return {"driver_us_per_repeat": round(extra / max(repeats, 1) * 1e6, 2),
            "copy_threads_us_per_repeat": round(cpu.get("copy_threads", 0.0) / max(repeats, 1) * 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=100_000, help="records per input (each median)")
    ap.add_argument("--medians", default="60,300", help="median residues of the synthetic proteins")
    ap.add_argument("--dims", default="1280,2560", help="embedding widths (650M: 1280, 3B: 2560)")
    ap.add_argument("--block", type=int, default=2048, help="records per block (runner's records_per_block)")
    ap.add_argument("--budget", type=int, default=65536, help="token budget per packed batch (H200 650M: ~64k)")
    ap.add_argument("--rows-per-part", type=int, default=16384)
    ap.add_argument("--dedup", action="store_true", help="also measure read and driver with --dedup")
    ap.add_argument("--repeat-fraction", type=float, default=0.4,
                    help="with --dedup: the share of records that repeat an earlier record's sequence")
    ap.add_argument("--copy-threads", type=int, default=None,
                    help="with --dedup: threads writing the copy parts (default: runner's; 0: the driver's thread)")
    ap.add_argument("--part-writers", default="driver",
                    help="who writes the pooled parts, comma-separated: driver, actors (runner embed --part-writer)")
    ap.add_argument("--ray-delivery", type=int, default=0, metavar="N",
                    help="also measure Ray Data's delivery of N one-batch tables to the driver (needs Ray)")
    ap.add_argument("--delivery-rows", type=int, default=680,
                    help="rows per batch assumed for --ray-delivery (650M, 64k tokens, short reads: ~680)")
    ap.add_argument("--stages", choices=("all", "read"), default="all",
                    help="all: every stage (minutes); read: the read task alone, on more input variants (seconds)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per input; each stage's median is reported")
    ap.add_argument("--workdir", help="where inputs and parts go (default: a temporary directory)")
    ap.add_argument("--out", required=True, help="result JSON file")
    args = ap.parse_args(argv)

    from bench_data import write_short_fasta
    from bench_dedup import write_repeated_fasta

    doc: dict = {"date": dt.date.today().isoformat(), "host": platform.node(), "cpu": platform.processor(),
                 "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                 "memcpy_gb_per_s_at_start": memcpy_gb_per_s(),
                 "command": "python scripts/bench_driver.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")}, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="runner-driver-bench-", dir=args.workdir) as work_s:
        work = Path(work_s)
        warm = work / "warm-up.fasta"  # first calls pay for imports and caches: not part of any figure
        write_repeated_fasta(warm, 3000, 0.4, median=60, lo=10)
        if args.stages == "read":
            measure_read(warm, args.block, True)
        for writer in args.part_writers.split(",") if args.stages == "all" else ():
            measure(warm, work / "out", 64, args.block, args.budget, args.rows_per_part, True, writer)
        for median in map(int, args.medians.split(",")):
            fasta = work / f"m{median}.fasta"
            info = write_short_fasta(fasta, args.records, median=median, lo=10)
            if args.stages == "read":
                measure_read_variants(doc, args, work, fasta, info, median)
                continue
            variants = [("plain", fasta, False)]
            if args.dedup:
                repeated = work / f"m{median}-repeated.fasta"
                write_repeated_fasta(repeated, args.records, args.repeat_fraction, median=median, lo=10)
                variants.append((f"dedup{round(args.repeat_fraction * 100)}", repeated, True))
            runs = [(w, *v) for w in args.part_writers.split(",") for v in variants]
            for dim in map(int, args.dims.split(",")):
                for writer, name, path, dedup in runs:
                    # the driver-writer keys keep their earlier names (2026-11-30-driver-scale.json)
                    key = f"median{median}_d{dim}_{name}" + ("" if writer == "driver" else f"_{writer}")
                    t = time.perf_counter()
                    samples = [measure(path, work / "out", dim, args.block, args.budget, args.rows_per_part, dedup,
                                       writer, args.copy_threads) for _ in range(args.repeats)]
                    res = samples[0]
                    # each stage's median over the repeats: other load on the machine moves single runs
                    res["cpu_seconds"] = {k: sorted(r["cpu_seconds"][k] for r in samples)[len(samples) // 2]
                                          for k in res["cpu_seconds"]}
                    res["cpu_seconds_samples"] = {k: [r["cpu_seconds"][k] for r in samples] for k in res["cpu_seconds"]}
                    res["input"] = info if name == "plain" else {"repeat_fraction": args.repeat_fraction}
                    res.update(derive(res, dim, median))
                    plain = doc["runs"].get(key.replace(f"_{name}", "_plain"))
                    if dedup and plain is not None:
                        res.update(per_repeat(res, plain))
                    doc["runs"][key] = res
                    print(f"{key}: {res['rows']} rows, {res['tokens_per_row']} tok/row, us/row {res['per_row_us']}, "
                          f"one driver keeps up with {res['one_driver_keeps_up_with_h200s']} H200s, one read task "
                          f"with {res['one_read_task_keeps_up_with_h200s']} ({time.perf_counter() - t:.0f}s)",
                          flush=True)
    if args.ray_delivery:
        doc["ray_delivery"] = ray_delivery(args.ray_delivery, 1280, args.delivery_rows)
        print(f"ray delivery: {doc['ray_delivery']}", flush=True)
    doc["load_average_at_end"] = os.getloadavg()
    doc["memcpy_gb_per_s_at_end"] = memcpy_gb_per_s()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
