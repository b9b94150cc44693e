"""Finding and reading inputs: FASTA variants, gzip, globs, directories, Parquet, CSV/TSV, bad inputs."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fasta_reference import TRICKY_FASTA, reference_fasta

from runner.errors import RunnerError
from runner.input import sources
from runner.input.sources import detect_format, expand_inputs, read_fasta, read_records, sniff_input

DATA = Path(__file__).parent / "data"


def _pairs(records):
    return [(r.id, r.sequence) for r in records]


def test_multiline_fasta_with_descriptions_and_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "a.fasta"
    p.write_text("\n\n>seq1 some description\nMKT\nLLV\n\n>seq2\tdesc\nAC\n>seq3\n>seq4 x\nGG\n")
    recs = list(read_records([p]))
    assert _pairs(recs) == [("seq1", "MKTLLV"), ("seq2", "AC"), ("seq3", ""), ("seq4", "GG")]
    assert [r.ordinal for r in recs] == [0, 1, 2, 3]
    assert all(r.source == str(p) for r in recs)


def test_crlf_and_no_final_newline(tmp_path: Path) -> None:
    p = tmp_path / "crlf.fa"
    p.write_bytes(b">a desc\r\nMK\r\nTL\r\n\r\n>b\r\nAAA")
    assert _pairs(read_records([p])) == [("a", "MKTL"), ("b", "AAA")]


def test_header_with_gt_inside_and_bom(tmp_path: Path) -> None:
    p = tmp_path / "bom.fa"
    p.write_bytes(b"\xef\xbb\xbf>x a>b\nMK>T\n")
    assert _pairs(read_records([p])) == [("x", "MK>T")]


def test_gzip_detected_by_magic_not_extension(tmp_path: Path) -> None:
    text = b">g1\nACGT\nAC\n>g2\nTT\n"
    named = tmp_path / "x.fasta.gz"
    named.write_bytes(gzip.compress(text))
    hidden = tmp_path / "y.fasta"  # gzip content without the .gz name
    hidden.write_bytes(gzip.compress(text))
    plain_gz = tmp_path / "z.fa.gz"  # .gz name, plain content
    plain_gz.write_bytes(text)
    for p in (named, hidden, plain_gz):
        assert _pairs(read_records([p])) == [("g1", "ACGTAC"), ("g2", "TT")]


def test_records_spanning_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks put record boundaries at every possible place relative to a chunk edge."""
    recs = [(f"r{i}", "ACDEFGHIK"[: i % 9 + 1] * (i % 4 + 1)) for i in range(40)]
    body = "".join(f">{rid} d\r\n{seq[:5]}\r\n{seq[5:]}\r\n" for rid, seq in recs)
    p = tmp_path / "c.fa"
    p.write_text(body)
    for chunk in (1, 2, 3, 5, 7, 64):
        monkeypatch.setattr(sources, "CHUNK_BYTES", chunk)
        assert _pairs(read_fasta(p)) == recs, chunk


def test_test_data_files() -> None:
    recs = list(read_records(expand_inputs([str(DATA / "*.fasta")])))
    assert len(recs) == 18
    assert recs[0].id == "UniRef50_UPI0003108055"
    assert recs[0].sequence.startswith("MPADAREYLESKHATRRFDRPAEVAGVV")
    assert [r.ordinal for r in recs] == list(range(18))


def test_ordinals_are_global_across_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.fa", tmp_path / "b.fa"
    a.write_text(">a1\nAA\n>a2\nCC\n")
    b.write_text(">b1\nGG\n")
    recs = list(read_records([a, b], start_ordinal=10))
    assert [(r.id, r.ordinal, Path(r.source).name) for r in recs] == [
        ("a1", 10, "a.fa"),
        ("a2", 11, "a.fa"),
        ("b1", 12, "b.fa"),
    ]


def test_expand_globs_directories_and_dedup(tmp_path: Path) -> None:
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    for name in ("b.fasta", "a.fa.gz", "sub/c.faa", "sub/t.tsv", "x.parquet", "notes.txt", "sub/readme.md"):
        (d / name).write_bytes(b">x\nA\n")
    got = expand_inputs([str(d)])
    assert [p.relative_to(d).as_posix() for p in got] == [
        "a.fa.gz",
        "b.fasta",
        "sub/c.faa",
        "sub/t.tsv",
        "x.parquet",
    ]
    # repeats (the same file by another spelling too) are read once, in first-seen order
    again = expand_inputs([str(d / "b.fasta"), str(d / "*.fa*"), str(d / "." / "b.fasta"), str(d)])
    assert [p.relative_to(d).as_posix() for p in again][:2] == ["b.fasta", "a.fa.gz"]
    assert len(again) == 5
    # an explicitly named file is taken whatever its extension
    assert expand_inputs([str(d / "notes.txt")]) == [d / "notes.txt"]


def test_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(RunnerError, match=r"input .*nope\.fa not found: check the path"):
        expand_inputs([str(tmp_path / "nope.fa")])
    with pytest.raises(RunnerError, match=r"not found: check the path"):
        expand_inputs([str(tmp_path / "*.fasta")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(RunnerError, match="holds no supported file"):
        expand_inputs([str(tmp_path / "empty")])


def test_not_fasta_text_and_binary(tmp_path: Path) -> None:
    txt = tmp_path / "seqs.txt"
    txt.write_text("\n\nMKTLLV\n>a\nAA\n")
    bad_fa = tmp_path / "bad.fasta"
    bad_fa.write_text("id,sequence\na,MK\n")
    binary = tmp_path / "blob.fa"
    binary.write_bytes(bytes(range(256)) * 4)
    for p in (txt, bad_fa, binary):
        with pytest.raises(RunnerError, match=r"is not a FASTA file \(first line does not start with '>'\)"):
            sniff_input(p)
        with pytest.raises(RunnerError, match="is not a FASTA file"):
            next(read_records([p]))


def test_not_fasta_raised_before_later_files_are_read(tmp_path: Path) -> None:
    good, bad = tmp_path / "g.fa", tmp_path / "b.fa"
    good.write_text(">a\nAA\n")
    bad.write_text("nope\n")
    it = read_records([good, bad])
    assert next(it).id == "a"
    with pytest.raises(RunnerError, match="not a FASTA file"):
        next(it)


def test_empty_fasta_file_has_no_records(tmp_path: Path) -> None:
    p = tmp_path / "e.fa"
    p.write_text("\n \n")
    assert sniff_input(p) == "fasta"
    assert list(read_records([p])) == []


def test_parquet(tmp_path: Path) -> None:
    p = tmp_path / "t.parquet"
    table = pa.table({"name": ["p1", "p2", "p3"], "seq": ["MK", None, "AC"], "other": [1, 2, 3]})
    pq.write_table(table, p, row_group_size=2)
    assert sniff_input(p, id_column="name", seq_column="seq") == "parquet"
    recs = list(read_records([p], id_column="name", seq_column="seq"))
    assert _pairs(recs) == [("p1", "MK"), ("p2", ""), ("p3", "AC")]
    assert [r.ordinal for r in recs] == [0, 1, 2]


def test_parquet_integer_ids(tmp_path: Path) -> None:
    p = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"id": [7, 8], "sequence": ["AA", "CC"]}), p)
    assert _pairs(read_records([p])) == [("7", "AA"), ("8", "CC")]


@pytest.mark.parametrize("gz", [False, True])
def test_csv_and_tsv(tmp_path: Path, gz: bool) -> None:
    csv_text = b'id,sequence,x\n001,MKT,1\n"b,2",AC,2\nc,,3\n'
    tsv_text = b"id\tsequence\n001\tGG\n"
    c = tmp_path / ("s.csv.gz" if gz else "s.csv")
    t = tmp_path / ("s.tsv.gz" if gz else "s.tsv")
    c.write_bytes(gzip.compress(csv_text) if gz else csv_text)
    t.write_bytes(gzip.compress(tsv_text) if gz else tsv_text)
    assert detect_format(c) == "csv" and detect_format(t) == "tsv"
    assert sniff_input(c) == "csv" and sniff_input(t) == "tsv"
    recs = list(read_records([c, t]))
    # ids stay text (no 001 -> 1), quoted commas survive, empty sequence stays ''
    assert _pairs(recs) == [("001", "MKT"), ("b,2", "AC"), ("c", ""), ("001", "GG")]
    assert [r.ordinal for r in recs] == [0, 1, 2, 3]


def test_missing_columns_message(tmp_path: Path) -> None:
    c = tmp_path / "s.csv"
    c.write_text("name,seq\na,MK\n")
    p = tmp_path / "s.parquet"
    pq.write_table(pa.table({"name": ["a"], "seq": ["MK"]}), p)
    for path in (c, p):
        with pytest.raises(RunnerError) as e:
            sniff_input(path)
        msg = str(e.value)
        assert "'id'" in msg and "'sequence'" in msg and "'name', 'seq'" in msg
        assert "--id-column" in msg and "--seq-column" in msg
        with pytest.raises(RunnerError, match="--seq-column"):
            list(read_records([path]))
    assert _pairs(read_records([c], id_column="name", seq_column="seq")) == [("a", "MK")]


def test_corrupt_parquet_and_truncated_gzip(tmp_path: Path) -> None:
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"PAR1 not really")
    with pytest.raises(RunnerError, match="not a readable Parquet file"):
        sniff_input(p)
    g = tmp_path / "cut.fa.gz"
    rng = random.Random(0)
    body = "".join(rng.choice("ACGT") for _ in range(100_000)).encode()
    g.write_bytes(gzip.compress(b">a\n" + body)[:2000])
    with pytest.raises(RunnerError, match="gzip data ends early.*cut short"):
        list(read_records([g]))


def test_sniff_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RunnerError, match="not found"):
        sniff_input(tmp_path / "gone.fa")


# --- faults found part-way through a file: one line naming the file, the line, and the fix ----------------


def _many_csv_lines(n: int) -> bytes:
    return b"id,sequence\n" + b"".join(b"s%d,MKVLAAGG\n" % i for i in range(n))


def _drain(path: Path) -> int:
    sniff_input(path)
    return sum(1 for _ in read_records([path]))


def test_csv_row_of_wrong_width_and_undecodable_line_are_named(tmp_path: Path) -> None:
    body = _many_csv_lines(50_000)  # several pyarrow blocks: its own row numbers are per block
    lines = body.split(b"\n")
    wide = tmp_path / "wide.csv"
    wide.write_bytes(b"\n".join([*lines[:30_000], b"x,y,z", *lines[30_000:]]))
    with pytest.raises(RunnerError, match=r"wide\.csv line 30,001: 3 fields where the header has 2: fix or remove"):
        _drain(wide)
    bad_utf8 = tmp_path / "utf8.tsv"
    bad_utf8.write_bytes(body.replace(b",", b"\t").replace(b"s4000\t", b"s4000\t\xff\xfe"))
    with pytest.raises(RunnerError, match=r"utf8\.tsv line 4,002: undecodable text \(byte 0xff"):
        _drain(bad_utf8)


@pytest.mark.parametrize("name", ["cut.fa.gz", "cut.csv.gz"])
def test_gzip_cut_or_corrupt_mid_file_names_the_line(tmp_path: Path, name: str) -> None:
    text = _many_csv_lines(300_000) if "csv" in name else b"".join(b">r%d\nMKVLAAGG\n" % i for i in range(300_000))
    packed = gzip.compress(text)
    cut = tmp_path / name
    cut.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(RunnerError, match=r"gzip data ends early, after line [1-9][\d,]+.*cut short"):
        _drain(cut)
    broken = bytearray(packed)
    broken[len(packed) * 3 // 4 : len(packed) * 3 // 4 + 64] = bytes(64)
    corrupt = tmp_path / f"corrupt-{name}"
    corrupt.write_bytes(bytes(broken))
    with pytest.raises(RunnerError, match=r"gzip data is corrupt after line [1-9][\d,]+.*re-create or re-download"):
        _drain(corrupt)


def test_binary_appended_to_fasta_names_the_line_it_starts(tmp_path: Path) -> None:
    text = b"".join(b">r%d\nMKVLAAGG\n" % i for i in range(1000))
    p = tmp_path / "tail.fa"
    p.write_bytes(text + b"\x00\x17PK\x03\x04binary")
    with pytest.raises(RunnerError, match=r"tail\.fa line 2,001: binary data .* FASTA only up to line 2,000"):
        _drain(p)
    # the same inside gzip data
    g = tmp_path / "tail.fa.gz"
    g.write_bytes(gzip.compress(text + b"\x7fELF"))
    with pytest.raises(RunnerError, match=r"line 2,001: binary data \(byte 0x7f\)"):
        _drain(g)


def test_gz_name_without_gzip_data_says_so(tmp_path: Path) -> None:
    p = tmp_path / "x.fasta.gz"
    p.write_bytes(b"PK\x03\x04 a zip file, not gzip")
    with pytest.raises(RunnerError, match=r"x\.fasta\.gz is named \.gz but is not gzip data") as info:
        sniff_input(p)
    assert "not a FASTA" not in str(info.value)


@pytest.mark.parametrize("data", TRICKY_FASTA)
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 4 << 20])
def test_fasta_parser_matches_a_line_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data: bytes,
                                            chunk: int) -> None:
    """Every tricky layout, at every chunk size (record boundaries falling anywhere), plain and gzipped, gives
    the line reader's records with consecutive ordinals."""
    monkeypatch.setattr(sources, "CHUNK_BYTES", chunk)
    expected = reference_fasta(data)
    plain, packed = tmp_path / "t.fa", tmp_path / "t.fa.gz"
    plain.write_bytes(data)
    packed.write_bytes(gzip.compress(data))
    for p in (plain, packed):
        recs = list(read_fasta(p, start_ordinal=5))
        assert _pairs(recs) == expected
        assert [r.ordinal for r in recs] == list(range(5, 5 + len(expected)))


def test_fasta_parser_matches_a_line_reader_on_random_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Random FASTA-like text from pieces that make parsing hard (line ends, '>' at and off line starts,
    whitespace, multi-byte and broken UTF-8), at small chunk sizes."""
    pieces = [b">", b"\n", b"\r\n", b"\r", b" ", b"\t", b"\x0b", b"MK", b"ACGT", b"id", b"\xc3\xa9", b"\xff", b"\n>",
              b"\n\n", b"> x"]
    rng = random.Random(7)
    for trial in range(60):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 300)))
        data = b">" + body  # a FASTA file starts with a header
        monkeypatch.setattr(sources, "CHUNK_BYTES", rng.choice([1, 2, 5, 16, 1 << 20]))
        p = tmp_path / f"r{trial}.fa"
        p.write_bytes(data)
        recs = list(read_fasta(p))
        assert _pairs(recs) == reference_fasta(data), data
        assert [r.ordinal for r in recs] == list(range(len(recs)))


def test_record_too_large_for_arrow_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record past what one Arrow string holds (2 GiB; made small here) is one line naming it, not corrupt data."""
    monkeypatch.setattr(sources, "CHUNK_BYTES", 16)
    monkeypatch.setattr(sources, "MAX_PARSE_BYTES", 100)
    p = tmp_path / "big.fa"
    p.write_text(">ok\nMK\n>huge chr\n" + "ACGT\n" * 30 + ">after\nMK\n")
    records = read_fasta(p)
    assert next(records).id == "ok"
    with pytest.raises(RunnerError, match=r"big\.fa: record 'huge' is too large to read \(1\d\d bytes"):
        next(records)
