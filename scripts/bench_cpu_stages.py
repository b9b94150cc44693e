"""Micro benchmark of the CPU stages: FASTA parsing, duplicate filtering, preparation and packing.

    python scripts/bench_cpu_stages.py [--records 200000] [--budget 16384]

Writes a synthetic FASTA (multi-line, lengths 50-1500) to a temporary directory and prints records/s for
each stage on one core. A stand-in per-residue codec is used so that no model module is needed.
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path

import numpy as np

from runner.models.base import SequenceCodec
from runner.packing import pack_block, packing_efficiency
from runner.prepare import DuplicateFilter, Preparer, prepare_block
from runner.sources import read_records

ALPHABET = "ACDEFGHIKLMNPQRSTVWYXBUZO"
_LUT = np.full(256, -1, dtype=np.int32)
_LUT[np.frombuffer(ALPHABET.encode(), dtype=np.uint8)] = np.arange(4, 4 + len(ALPHABET), dtype=np.int32)


class BenchCodec(SequenceCodec):
    """Vectorised per-residue codec, about as cheap as a real one can be."""

    kind = "protein"
    max_residues = 1022
    special_start = 1
    special_end = 1
    default_pooling = "mean"

    def clean(self, raw: str) -> str:
        s = "".join(raw.split()).upper()
        return s[:-1] if s.endswith("*") else s

    def invalid_characters(self, seq: str) -> str:
        return "".join(sorted(set(seq) - set(ALPHABET)))

    def encode(self, seq: str) -> np.ndarray:
        body = _LUT[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]
        return np.concatenate(([0], body, [2])).astype(np.int32)


def write_fasta(path: Path, n: int, gz: bool) -> int:
    rng = np.random.default_rng(0)
    letters = np.frombuffer(ALPHABET[:20].encode(), dtype=np.uint8)
    opener = gzip.open if gz else open
    residues = 0
    with opener(path, "wb") as f:
        for i in range(n):
            seq = letters[rng.integers(0, 20, int(rng.integers(50, 1500)))].tobytes()
            residues += len(seq)
            lines = b"\n".join(seq[j : j + 60] for j in range(0, len(seq), 60))
            f.write(b">seq%d some description\n%s\n" % (i, lines))
    return residues


def timed(label: str, n: int, fn):
    t = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t
    print(f"{label:<28} {dt:7.2f} s  {n / dt:12,.0f} records/s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--budget", type=int, default=16384)
    ap.add_argument("--block", type=int, default=2048)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain, packed = Path(tmp) / "b.fasta", Path(tmp) / "b.fasta.gz"
        residues = write_fasta(plain, args.records, gz=False)
        write_fasta(packed, args.records, gz=True)
        mb = plain.stat().st_size / 1e6
        print(f"{args.records:,} records, {residues:,} residues, {mb:.0f} MB plain")
        recs = timed("read FASTA", args.records, lambda: list(read_records([plain])))
        timed("read FASTA.gz", args.records, lambda: sum(1 for _ in read_records([packed])))
        ids = [r.id for r in recs]
        d = DuplicateFilter()
        timed(
            "duplicate filter",
            args.records,
            lambda: [d.seen_before(ids[i : i + args.block]) for i in range(0, len(ids), args.block)],
        )
        pre = Preparer(BenchCodec(), long="chunk", chunk_overlap=128)
        blocks = [recs[i : i + args.block] for i in range(0, len(recs), args.block)]
        prepared = timed(
            "prepare (clean+encode)", args.records, lambda: [prepare_block(b, pre) for b in blocks]
        )
        batches = timed(
            "pack_block (FFD)", args.records, lambda: [pack_block(w, args.budget) for w, _ in prepared]
        )
        flat = [b for bs in batches for b in bs]
        print(f"packing efficiency {packing_efficiency(flat):.4f} over {len(flat):,} batches")


if __name__ == "__main__":
    main()
