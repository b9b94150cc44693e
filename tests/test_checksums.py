"""The CRC-32 that every part and per-token file is summed with (runner.output.checksums.crc32): ISA-L's where the
`isal` package imports, zlib.crc32 otherwise. Journals, manifests, `runner verify` and resume of outputs written by
either must agree, so the two must give the same value for every buffer."""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from runner.output import checksums
from runner.output.checksums import (
    CRC32_IMPL,
    ChecksummedFile,
    check_file,
    crc32,
    crc_hex,
    fastest_crc32,
    file_crc,
    write_checksummed,
)

SIZES = [0, 1, 3, 255, 4097, 65_537, (3 << 20) + 7, 17 << 20]  # empty, tiny, odd, over zlib's GIL-release size, MiBs


def test_the_installed_isal_is_the_crc_in_use() -> None:
    # isal is a dependency (pyproject.toml): a silent fall back to zlib.crc32 would cost the speed it was added for
    pytest.importorskip("isal.isal_zlib")
    assert CRC32_IMPL == "isal"
    assert crc32 is not zlib.crc32


@pytest.mark.parametrize("size", SIZES)
def test_crc32_equals_zlibs_on_random_buffers_whole_and_continued(size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    assert crc32(data) == zlib.crc32(data)
    cut = size // 3  # a value carried from one piece to the next, as ChecksummedFile sums its writes
    assert crc32(data[cut:], crc32(data[:cut])) == zlib.crc32(data)
    view = memoryview(np.frombuffer(data[: size - size % 4], np.float32)).cast("B")  # what the writers pass
    assert crc32(view) == zlib.crc32(view)


def test_without_isal_the_choice_is_zlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)  # the import fails, as on a bundle without it
    assert fastest_crc32() == (zlib.crc32, "zlib")


def _table(rows: int) -> pa.Table:
    rng = np.random.default_rng(rows)
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(rows * 96, dtype=np.float32)), 96)
    return pa.table({"id": [f"seq{i}" for i in range(rows)], "embedding": vectors})


@pytest.mark.parametrize(("write_with", "check_with"), [("fast", "zlib"), ("zlib", "fast")])
def test_a_file_written_with_one_crc_verifies_with_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_with: str, check_with: str
) -> None:
    implementation = {"fast": crc32, "zlib": zlib.crc32}
    path = tmp_path / "part.arrow"
    monkeypatch.setattr(checksums, "crc32", implementation[write_with])
    size, crc = write_checksummed(path, _table(3000))
    monkeypatch.setattr(checksums, "crc32", implementation[check_with])
    record = {"rows": 3000, "bytes": size, "crc32": crc}
    assert check_file(path, record) is None
    assert file_crc(path) == (crc, size)
    data = bytearray(path.read_bytes())  # one flipped bit deep inside the vectors is caught by the other CRC too
    data[size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    assert check_file(path, record) == f"checksum mismatch (CRC-32 {file_crc(path)[0]}, written as {crc})"


def test_a_checksummed_file_sums_every_write_of_any_size_and_buffer_type(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    writes = [rng.bytes(10), rng.standard_normal(3 << 20, dtype=np.float32).astype(np.float16), b"", rng.bytes(1),
              memoryview(rng.bytes(4 * 12_345)).cast("i"), bytearray(rng.bytes((5 << 20) + 3))]
    sink = ChecksummedFile(tmp_path / "summed")
    for data in writes:
        assert sink.write(data) == memoryview(data).nbytes
    assert sink.tell() == sink.size
    sink.fsync()
    sink.close()
    assert (crc_hex(sink.crc), sink.size) == file_crc(tmp_path / "summed")
    unsummed = ChecksummedFile(tmp_path / "unsummed", summed=False)  # RUNNER_BENCH_NO_TOKEN_CRC: bytes only
    for data in writes:
        unsummed.write(data)
    unsummed.close()
    assert unsummed.crc == 0 and (tmp_path / "unsummed").read_bytes() == (tmp_path / "summed").read_bytes()
