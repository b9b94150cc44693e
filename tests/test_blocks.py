"""Stream block sizes (runner.driver.cluster.block_records) and what they do to a small job's delivery."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.driver import cluster
from runner.driver.cluster import MIN_BLOCK_RECORDS, block_records, count_small_input


def write_fasta(path: Path, records: int, gz: bool = False) -> Path:
    text = "".join(f">p{i} protein {i}\nMKTAYIAKQR\nQISFVKSHFS\n" for i in range(records))
    if gz:
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize(("records", "actors", "expected"), [
    (1515, 1, 379),  # four blocks for the one actor: the first rows reach the driver after a quarter of the job
    (1515, 2, 190),
    (5000, 8, 157),  # every one of 8 GPUs gets blocks (one 2,048-record block each kept 3 of them busy)
    (100_000, 2, 2048),  # enough blocks at the configured size: unchanged
    (15, 1, MIN_BLOCK_RECORDS),  # never below the floor: a tiny job is one block
])
def test_a_small_input_is_cut_into_about_four_blocks_per_actor(tmp_path: Path, records: int, actors: int,
                                                               expected: int) -> None:
    fasta = write_fasta(tmp_path / "in.fasta", records)
    assert block_records(2048, count_small_input([fasta]), actors) == expected


def test_records_of_every_input_count_gzip_and_parquet_included(tmp_path: Path) -> None:
    fasta = write_fasta(tmp_path / "a.fasta.gz", 800, gz=True)
    table = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(800)], "sequence": ["MKT"] * 800}), table)
    assert block_records(2048, count_small_input([fasta, table]), 1) == 400


def test_a_configured_size_below_the_floor_is_kept(tmp_path: Path) -> None:
    fasta = write_fasta(tmp_path / "in.fasta", 1000)
    assert block_records(20, count_small_input([fasta]), 1) == 20  # tests and users who asked for small blocks keep them


def test_a_large_input_is_not_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fasta = write_fasta(tmp_path / "in.fasta", 1000)
    monkeypatch.setattr(cluster, "SMALL_INPUT_BYTES", fasta.stat().st_size - 1)
    monkeypatch.setattr("runner.driver.progress.count_inputs", lambda paths: pytest.fail("counted a large input"))
    assert block_records(2048, count_small_input([fasta]), 1) == 2048


def test_an_unreadable_input_keeps_the_configured_size(tmp_path: Path) -> None:
    assert block_records(2048, count_small_input([tmp_path / "missing.fasta"]), 1) == 2048


def test_a_small_gpu_job_runs_eager_by_default(tmp_path: Path) -> None:
    from runner.driver.cluster import EAGER_BELOW_TOKENS_PER_GPU, compile_by_default

    fasta = write_fasta(tmp_path / "in.fasta", 1515)  # 20 residues + 2 special tokens a record: 33,330 tokens
    assert not compile_by_default(1, count_small_input([fasta]))  # compiling (10-17 s an actor on an H200) would cost more than it saves
    assert not compile_by_default(0, count_small_input([fasta]))  # CPU jobs never compile by default
    per_record = 22
    big = write_fasta(tmp_path / "big.fasta", EAGER_BELOW_TOKENS_PER_GPU // per_record + 1)
    assert compile_by_default(1, count_small_input([big]))
    assert not compile_by_default(2, count_small_input([big]))  # the threshold is per GPU


def test_a_large_or_table_input_compiles_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.driver.cluster import compile_by_default

    table = tmp_path / "b.parquet"
    pq.write_table(pa.table({"id": ["q"], "sequence": ["MKT"]}), table)
    assert compile_by_default(1, count_small_input([table]))  # residues unknown without reading the table: the default stays
    fasta = write_fasta(tmp_path / "in.fasta", 10)
    monkeypatch.setattr(cluster, "SMALL_INPUT_BYTES", fasta.stat().st_size - 1)
    assert compile_by_default(1, count_small_input([fasta]))  # not counted: the default stays
