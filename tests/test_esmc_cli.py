"""ESM C through `runner embed` and `runner validate` on CPU: transformers' numbers, the shadow, NaN/Inf abort,
resume and chunking, as for ESM-2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import embeddings_by_id, invoke, ray_with_hub_cache

DATA = Path(__file__).parent / "data"


HUB_NAME = "biohub/ESMC-300M"


@pytest.fixture(scope="module", autouse=True)
def local_ray(tmp_path_factory: pytest.TempPathFactory, tiny_esmc: tuple[Path, Path]):
    """One local Ray for the module, started with a Hugging Face cache that holds the tiny ESM C under HUB_NAME and
    HF_HUB_OFFLINE=1 (no network here): the driver and the actors resolve the hub name as from a user's warm cache."""
    with ray_with_hub_cache(tmp_path_factory.mktemp("hf_hub"), HUB_NAME, tiny_esmc[0]):
        yield


def transformers_mean(directory: Path, seqs: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """Mean over the residues (<cls> and <eos> left out) of transformers' FP32 EsmcModel last_hidden_state."""
    from transformers import AutoTokenizer, EsmcModel

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = EsmcModel.from_pretrained(directory).float().eval()
    out = {}
    with torch.no_grad():
        for sid, seq in seqs:
            ids = tokenizer(seq, return_tensors="pt")["input_ids"]
            out[sid] = model(ids).last_hidden_state[0, 1:-1].mean(0).numpy()
    return out


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def proteins() -> list[tuple[str, str]]:
    from conftest import read_fasta

    return read_fasta(DATA / "some_proteins.fasta")


@pytest.mark.slow
def test_embed_equals_transformers_with_the_shadow_on_every_sequence(tmp_path: Path, tiny_esmc: tuple[Path, Path]) -> None:
    """Every stored vector equals transformers' FP32 mean over residues; the FP32 shadow checks all of them; a
    chain break embeds, an alignment gap is rejected; the .pth of the same weights stores the same vectors."""
    directory, pth = tiny_esmc
    seqs = [*proteins(), ("complex", "MKTAYIAKQR|QISFVKSHFSRQ")]
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{sid}\n{seq}\n" for sid, seq in seqs) + ">gapped\nMKT--AYI\n")
    out = tmp_path / "dir"
    code, output = invoke("embed", str(fasta), "--model", str(directory), "--out", str(out), "--gpus", "0",
                          "--shadow-rate", "1", "--rows-per-part", "6")
    assert code == 0, output
    got = embeddings_by_id(out)
    expected = transformers_mean(directory, seqs)
    assert sorted(got) == sorted(expected)
    worst = min(cosine(got[sid], expected[sid]) for sid in expected)
    print(f"\nrunner embed vs transformers EsmcModel FP32 over {len(expected)} sequences: cosine min {worst:.8f}, "
          f"max abs diff {max(np.abs(got[s] - expected[s]).max() for s in expected):.2e}")
    assert worst >= 0.9999
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["model"]["family"] == "esmc"
    assert manifest["model"]["licence"] is None  # a local directory: runner cannot know where it came from
    assert manifest["pooling"] == "mean" and manifest["counts"]["rejects"] == 1
    shadow = manifest["shadow"]
    assert shadow["compared"] == len(seqs) and shadow["violations"] == 0 and shadow["cosine_min"] > 0.9999
    rejects = pa.ipc.open_file(out / "rejects.arrow").read_all().to_pydict()
    assert rejects["id"] == ["gapped"] and "-" in rejects["reason"][0]

    from_pth = tmp_path / "pth"
    code, output = invoke("embed", str(fasta), "--model", str(pth), "--out", str(from_pth), "--gpus", "0",
                          "--shadow-rate", "0")
    assert code == 0, output
    again = embeddings_by_id(from_pth)
    assert max(float(np.abs(again[s] - got[s]).max()) for s in got) < 1e-6


@pytest.mark.slow
def test_resume_and_chunked_long_sequences(tmp_path: Path, tiny_esmc: tuple[Path, Path]) -> None:
    """--long chunk stores the residue-weighted mean of its windows; a lost part is redone on the rerun."""
    directory = tiny_esmc[0]
    seqs = proteins()[:8]
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{sid}\n{seq}\n" for sid, seq in seqs))
    out = tmp_path / "chunked"
    args = ("embed", str(fasta), "--model", str(directory), "--out", str(out), "--gpus", "0", "--shadow-rate", "0",
            "--max-residues", "200", "--long", "chunk", "--chunk-overlap", "50", "--rows-per-part", "3")
    code, output = invoke(*args)
    assert code == 0, output
    first = embeddings_by_id(out)
    long_id, long_seq = next((sid, s) for sid, s in seqs if len(s) > 400)
    starts = list(range(0, len(long_seq) - 200, 150)) + [len(long_seq) - 200]
    windows = [(f"w{i}", long_seq[s : s + 200]) for i, s in enumerate(starts)]
    ref = transformers_mean(directory, windows)
    expected = sum(ref[w] * len(s) for w, s in windows) / sum(len(s) for _, s in windows)
    assert cosine(first[long_id], expected) >= 0.9999
    victim = sorted((out / "embeddings").glob("part-*.arrow"))[1]
    victim.unlink()
    code, output = invoke(*args)
    assert code == 0, output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["resumed_rows"] == len(seqs) - 3 and manifest["counts"]["rows"] == len(seqs)
    second = embeddings_by_id(out)
    assert sorted(second) == sorted(first)
    assert max(float(np.abs(second[s] - first[s]).max()) for s in first) < 1e-6


def test_nonfinite_aborts_and_names_sequence(tmp_path: Path, overflow_esmc_dir: Path) -> None:
    fasta = tmp_path / "in.fasta"
    fasta.write_text(">fine1\nMKTAYIAKQR\n>boom\nMKTWAYIAK\n>fine2\nMKVLAAGIV\n")
    out = tmp_path / "emb"
    code, output = invoke("embed", str(fasta), "--model", str(overflow_esmc_dir), "--out", str(out), "--gpus", "0",
                          "--rows-per-part", "1", "--shadow-rate", "0")
    assert code == 3, output
    assert "boom" in output and "Traceback" not in output
    assert json.loads((out / "manifest.json").read_text())["status"] == "aborted"
    stored = embeddings_by_id(out) if list((out / "embeddings").glob("part-*.arrow")) else {}
    assert "boom" not in stored and all(np.isfinite(v).all() for v in stored.values())


def test_validate_bf16_against_fp32(tmp_path: Path, tiny_esmc: tuple[Path, Path]) -> None:
    report_path = tmp_path / "report.json"
    code, output = invoke("validate", str(DATA / "some_proteins.fasta"), "--model", str(tiny_esmc[0]), "--gpus", "0",
                          "--precision", "bf16", "--sample", "9", "--max-residues", "300", "--min-cosine", "0.99",
                          "--out", str(report_path))
    assert code == 0, output
    report = json.loads(report_path.read_text())
    overall = report["variants"][0]["overall"]
    assert report["passed"] is True and report["sample"]["used"] == 9
    assert 0.99 <= overall["cosine_min"] <= overall["cosine_max"] < 1  # bf16 really drifts, a little


def test_hub_name_from_an_offline_cache_records_the_licence(tmp_path: Path, tiny_esmc: tuple[Path, Path]) -> None:
    """`--model biohub/ESMC-300M` served from the Hugging Face cache (as after a first download): the same vectors
    as the directory, and the manifest records the hub name's licence from runner's licence table."""
    from runner.models.licences import licence_record

    seqs = proteins()[:4]
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{sid}\n{seq}\n" for sid, seq in seqs))
    out = tmp_path / "hub"
    code, output = invoke("embed", str(fasta), "--model", HUB_NAME, "--out", str(out), "--gpus", "0",
                          "--shadow-rate", "0")
    assert code == 0, output
    got = embeddings_by_id(out)
    expected = transformers_mean(tiny_esmc[0], seqs)
    assert min(cosine(got[sid], expected[sid]) for sid in expected) >= 0.9999
    model = json.loads((out / "manifest.json").read_text())["model"]
    assert model["name"] == HUB_NAME and model["family"] == "esmc" and "models--biohub--ESMC-300M" in model["checkpoint"]
    assert model["licence"] == licence_record(HUB_NAME) and model["licence"]["name"] == "MIT"
    assert len(model["checkpoint_sha256"]) == 64
