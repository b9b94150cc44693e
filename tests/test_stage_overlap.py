"""Two calls of one embedding actor at once (GPU actors run two: runner.driver.cluster): one forward at a time on the
device, and the per-token write of one call overlapping the other call's forward. CPU only, no Ray."""

from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa

import runner.stages.embed_stage as embed_stage
from runner.input.stream import PackSettings, ReadSettings, pack_records, read_blocks
from runner.models.registry import load_codec
from runner.output.checksums import file_crc
from runner.stages.embed_stage import EmbedStage, StageSettings

DATA = Path(__file__).parent / "data"


def test_one_call_writes_its_token_file_while_the_other_runs_its_forward(tiny_esm2_path: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    records = next(read_blocks(ReadSettings((str(DATA / "some_proteins.fasta"),), "id", "sequence", 20)))
    packed = pack_records(records, PackSettings(load_codec(str(tiny_esm2_path)), None, "truncate", 128, 2048,
                                                keep_chunks_together=True))
    rows = [packed.slice(i, 1) for i in range(packed.num_rows) if packed.column("ids")[i].as_py()]
    assert len(rows) >= 2
    stage = EmbedStage(StageSettings(str(tiny_esm2_path), "fp32", -1, "mean", "cpu", per_token="float16",
                                     tokens_dir=str(tmp_path / "tokens")))
    in_forward = 0
    most_in_forward = 0
    forwards = 0  # forwards begun
    overlapped = threading.Event()
    lock = threading.Condition()
    embed_guarded, write = stage.embed_guarded, embed_stage.write_token_file

    def counting_forward(*args, **kwargs):
        nonlocal in_forward, most_in_forward, forwards
        with lock:
            in_forward += 1
            forwards += 1
            most_in_forward = max(most_in_forward, in_forward)
            lock.notify_all()
        try:
            return embed_guarded(*args, **kwargs)
        finally:
            with lock:
                in_forward -= 1

    def slow_write(*args, **kwargs):
        # The first writer waits (bounded) for the other call's forward to begin: it can only begin if the
        # write does not hold the device.
        with lock:
            if lock.wait_for(lambda: forwards >= 2, timeout=60):
                overlapped.set()
        return write(*args, **kwargs)

    monkeypatch.setattr(stage, "embed_guarded", counting_forward)
    monkeypatch.setattr(embed_stage, "write_token_file", slow_write)
    outs: list[pa.Table] = []
    threads = [threading.Thread(target=lambda t=t: outs.append(stage(t))) for t in rows[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(outs) == 2
    assert most_in_forward == 1  # never two forwards on the device at once
    assert overlapped.is_set()  # a forward ran while the other call was writing its token file
    for out in outs:
        embedded = out.filter(out.column("id").is_valid())
        files = set(embedded.column("tokens_file").to_pylist())
        assert len(files) == 1 and (tmp_path / "tokens" / next(iter(files))).is_file()  # complete before the rows left
        # Each window carries its file's checksum record, computed as the actor wrote it: the bytes on disk.
        path = tmp_path / "tokens" / files.pop()
        crc, size = file_crc(path)
        records = embedded.column("tokens_checksum").to_pylist()
        assert records == [{"rows": pa.ipc.open_file(path).read_all().num_rows, "bytes": size, "crc32": crc}] * len(records)
    # The startup report rides on exactly one output, whichever call finished first.
    assert sum(v is not None for out in outs for v in out.column("startup").to_pylist()) == 1
