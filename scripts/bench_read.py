"""Memory and time of reading results back (`runner.open`) and of `runner export`, on synthetic jobs.

Writes two job folders in runner's output layout (docs/outputs.md; rows stored out of input order, as a
job's driver writes them): `pooled` (N rows, one `embedding` column of width D) and `tokens` (M sequences,
layer L mean + cls pooled and per-token float16 arrays). Then each operation runs in a fresh process that
samples its own anonymous RSS (RssAnon: the memory it allocated; pages of the memory-mapped files are
page cache, not counted) every 20 ms and reports wall seconds, peak RssAnon and output bytes.

    python scripts/bench_read.py --rows 100000 --dim 1280 --out benchmarks/results/2026-11-30-cpu-read-export.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent


def write_parts(out: Path, columns: dict[str, np.ndarray | list], rows_per_part: int, order: np.ndarray) -> None:
    """Pooled parts holding `columns` (input order) stored in `order`, `rows_per_part` rows a part."""
    (out / "embeddings").mkdir(parents=True)
    for part, start in enumerate(range(0, len(order), rows_per_part)):
        rows = order[start : start + rows_per_part]
        arrays = {}
        for name, values in columns.items():
            if isinstance(values, np.ndarray) and values.ndim == 2:
                arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(values[rows].ravel()), values.shape[1])
            else:
                arrays[name] = pa.array([values[i] for i in rows]) if isinstance(values, list) else pa.array(values[rows])
        table = pa.table(arrays)
        with pa.ipc.new_file(str(out / "embeddings" / f"part-{part:05d}.arrow"), table.schema) as writer:
            for batch in table.to_batches(max_chunksize=1024):  # the driver appends in batches
                writer.write_batch(batch)


def manifest(out: Path, dim: int, layers: list[int], poolings: list[str], per_token: dict | None) -> None:
    (out / "manifest.json").write_text(json.dumps({
        "status": "complete",
        "model": {"name": "synthetic", "family": "esm2", "embed_dim": dim, "num_layers": 33},
        "layer": layers[0], "pooling": poolings[0],
        "outputs": {"layers": layers, "poolings": poolings, "per_token": per_token},
    }))


def make_jobs(root: Path, rows: int, dim: int, seqs: int, residues: int, rows_per_part: int) -> None:
    rng = np.random.default_rng(0)
    # Completion order: input order shuffled within windows of 4096 rows (actors finish batches out of order).
    order = np.concatenate([rng.permutation(np.arange(s, min(s + 4096, rows))) for s in range(0, rows, 4096)])
    ids = [f"seq{i:09d}" for i in range(rows)]
    write_parts(root / "pooled", {
        "id": ids, "length": rng.integers(50, 1000, rows).astype(np.int32), "truncated": np.zeros(rows, bool),
        "embedding": rng.standard_normal((rows, dim), dtype=np.float32), "ordinal": np.arange(rows, dtype=np.int64),
    }, rows_per_part, order)
    manifest(root / "pooled", dim, [33], ["mean"], None)

    job = root / "tokens"
    lengths = rng.integers(residues // 2, residues * 3 // 2, seqs).astype(np.int32)
    refs: dict[int, tuple[str, int]] = {}
    batch_order = rng.permutation(seqs)
    for start in range(0, seqs, 64):  # one token file per packed batch of 64 sequences
        batch = batch_order[start : start + 64]
        name = f"actor-{start // 64 % 4}/tok-{uuid.uuid4().hex}.arrow"
        arrays = [rng.standard_normal((lengths[i], dim), dtype=np.float32).astype(np.float16) for i in batch]
        inner = pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(arrays).ravel()), dim)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths[batch])]).astype(np.int32))
        table = pa.table({"id": [f"seq{i:09d}" for i in batch], "ordinal": pa.array(batch, pa.int64()),
                          "length": pa.array(lengths[batch]), "layer33": pa.ListArray.from_arrays(offsets, inner)})
        (job / "tokens" / name).parent.mkdir(parents=True, exist_ok=True)
        with pa.ipc.new_file(str(job / "tokens" / name), table.schema) as writer:
            writer.write_table(table)
        for row, i in enumerate(batch):
            refs[int(i)] = (name, row)
    write_parts(job, {
        "id": [f"seq{i:09d}" for i in range(seqs)], "length": lengths, "truncated": np.zeros(seqs, bool),
        "layer33_mean": rng.standard_normal((seqs, dim), dtype=np.float32),
        "layer33_cls": rng.standard_normal((seqs, dim), dtype=np.float32),
        "ordinal": np.arange(seqs, dtype=np.int64),
        "tokens_file": [refs[i][0] for i in range(seqs)], "tokens_row": np.array([refs[i][1] for i in range(seqs)], np.int32),
    }, rows_per_part, batch_order)
    manifest(job, dim, [33], ["mean", "cls"], {"dtype": "float16", "layers": [33]})


def run_one(op: str, job: Path, work: Path) -> dict:
    """One operation in this process, its own RssAnon sampled."""
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak[0] = max(peak[0], int(line.split()[1]))
            time.sleep(0.02)

    # Imports before the clock: the operation is what is timed (pyarrow's to_numpy imports pandas once).
    import h5py  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch  # noqa: F401

    import runner
    import runner.output.results  # noqa: F401
    from runner.output.export import export

    threading.Thread(target=sample, daemon=True).start()
    time.sleep(0.05)
    baseline = peak[0]
    start = time.perf_counter()
    out_bytes = 0
    res = runner.open(job)
    if op == "open":
        _ = res.ids
    elif op == "pooled":
        out_bytes = res.pooled().nbytes
    elif op == "pooled-memmap":
        target = np.lib.format.open_memmap(work / "pooled.npy", mode="w+", dtype=np.float32, shape=(len(res), res.dim))
        res.pooled(out=target)
        target.flush()
        out_bytes = target.nbytes
    elif op == "iter-pooled":
        out_bytes = sum(v.nbytes for _, v in res.iter_pooled(pooling="mean" if len(res.poolings) > 1 else None))
    elif op == "per-token-100":
        ids = res.ids
        for i in np.random.default_rng(1).integers(0, len(ids), 100):
            out_bytes += res.per_token(ids[i]).nbytes
    elif op == "iter-per-token":
        for _, array in res.iter_per_token():
            float(array.sum(dtype=np.float32))  # touch every value: the pages are really read
            out_bytes += array.nbytes
    elif op.startswith("export-"):
        fmt = op.removeprefix("export-")
        summary = export(res, fmt, work / f"out.{fmt}", overwrite=True)
        out_bytes = summary.bytes
    seconds = time.perf_counter() - start
    time.sleep(0.05)
    done.set()
    return {"op": op, "job": job.name, "rows": len(res), "seconds": round(seconds, 3),
            "peak_rss_anon_mib": round(peak[0] / 1024, 1), "baseline_rss_anon_mib": round(baseline / 1024, 1),
            "output_mib": round(out_bytes / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the pooled-only job")
    parser.add_argument("--dim", type=int, default=1280, help="vector width (1280 = ESM-2 650M)")
    parser.add_argument("--seqs", type=int, default=1000, help="sequences of the per-token job")
    parser.add_argument("--residues", type=int, default=300, help="mean residues per sequence of the per-token job")
    parser.add_argument("--rows-per-part", type=int, default=16384)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_read"))
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--one", nargs=2, metavar=("OP", "JOB"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], Path(args.one[1]), args.workdir / "work")))
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    (args.workdir / "work").mkdir(parents=True)
    make_jobs(args.workdir, args.rows, args.dim, args.seqs, args.residues, args.rows_per_part)
    plan = [(op, "pooled") for op in ("open", "pooled", "pooled-memmap", "iter-pooled", "export-parquet",
                                       "export-npz", "export-hdf5")]
    plan += [(op, "tokens") for op in ("open", "per-token-100", "iter-per-token", "export-npz", "export-hdf5",
                                       "export-fair-esm")]
    results = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for op, job in plan:
        proc = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--one", op,
                               str(args.workdir / job)], capture_output=True, text=True, env=env, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    sizes = {job: sum(p.stat().st_size for p in (args.workdir / job).rglob("*.arrow")) for job in ("pooled", "tokens")}
    report = {
        "command": "python scripts/bench_read.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "jobs": {"pooled": {"rows": args.rows, "dim": args.dim, "arrow_mib": round(sizes["pooled"] / 2**20, 1)},
                 "tokens": {"seqs": args.seqs, "mean_residues": args.residues, "dim": args.dim,
                            "per_token_dtype": "float16", "arrow_mib": round(sizes["tokens"] / 2**20, 1)}},
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
