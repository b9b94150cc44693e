"""A transformers ESM-2 (a directory, and a hub name from the HF cache) through `runner embed` and `runner validate`
on CPU, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import embeddings_by_id, invoke, ray_with_hub_cache, read_fasta, read_parts

DATA = Path(__file__).parent / "data"


HUB_NAME = "facebook/esm2_t6_8M_UR50D"


@pytest.fixture(scope="module", autouse=True)
def local_ray(tmp_path_factory: pytest.TempPathFactory, tiny_hf_esm2_dir: Path):
    """One local Ray for the module. It starts with a Hugging Face cache that holds the tiny transformers ESM-2
    under HUB_NAME and with HF_HUB_OFFLINE=1 (no network here), so the driver and the actors resolve the hub
    name as they would from a user's warm cache."""
    with ray_with_hub_cache(tmp_path_factory.mktemp("hf_hub"), HUB_NAME, tiny_hf_esm2_dir,
                            RUNNER_CACHE_DIR=str(tmp_path_factory.mktemp("runner_cache"))):
        yield


def transformers_means(directory: Path, records: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """transformers' EsmModel FP32 forward with its own tokenizer: last_hidden_state averaged over the residues
    (BOS/EOS excluded, runner's ESM-2 default pooling)."""
    from transformers import AutoTokenizer, EsmModel

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = EsmModel.from_pretrained(directory, add_pooling_layer=False).eval()
    out = {}
    for sid, seq in records:
        batch = tokenizer([seq], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state[0]  # [n + 2, D]
        out[sid] = hidden[1:-1].mean(0).numpy()
    return out


@pytest.mark.slow
def test_embed_and_validate_a_transformers_directory(
    tmp_path: Path, tiny_hf_esm2_dir: Path, some_proteins: list[tuple[str, str]]
) -> None:
    out = tmp_path / "emb"
    # --shadow-rate 1: every sequence is re-embedded by the FP32 shadow pool too (the same model class).
    code, output = invoke("embed", str(DATA / "some_proteins.fasta"), "--model", str(tiny_hf_esm2_dir),
                          "--out", str(out), "--gpus", "0", "--shadow-rate", "1")
    assert code == 0, output
    got = embeddings_by_id(out)
    reference = transformers_means(tiny_hf_esm2_dir, some_proteins)
    assert sorted(got) == sorted(reference)
    for sid, ref in reference.items():
        cosine = float(got[sid] @ ref / (np.linalg.norm(got[sid]) * np.linalg.norm(ref)))
        assert cosine >= 0.9999, sid
        assert np.abs(got[sid] - ref).max() < 1e-4, sid
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["rows"] == len(some_proteins)
    model = manifest["model"]
    assert model["family"] == "esm2" and model["checkpoint"] == str(tiny_hf_esm2_dir.resolve())
    assert len(model["checkpoint_sha256"]) == 64 and model["embed_dim"] == 64 and model["num_layers"] == 2
    assert model["licence"] is None  # a local directory: where its weights came from is unknown
    shadow = manifest["shadow"]
    assert shadow["compared"] == len(some_proteins) and shadow["violations"] == 0
    assert shadow["cosine_min"] >= 0.9999  # FP32 against FP32 on CPU

    report_path = tmp_path / "validate.json"
    code, output = invoke("validate", str(DATA / "some_proteins.fasta"), "--model", str(tiny_hf_esm2_dir),
                          "--gpus", "0", "--precision", "bf16", "--sample", "6", "--max-residues", "300",
                          "--min-cosine", "0.99", "--out", str(report_path))
    assert code == 0, output
    report = json.loads(report_path.read_text())
    assert report["passed"] is True and report["sample"]["used"] == 6
    assert 0.99 <= report["variants"][0]["overall"]["cosine_min"] < 1  # bf16 drifts, a little


@pytest.mark.slow
def test_embed_a_hub_name_from_the_hugging_face_cache(tmp_path: Path, tiny_hf_esm2_dir: Path) -> None:
    out = tmp_path / "hub"
    code, output = invoke("embed", str(DATA / "few_proteins.fasta"), "--model", HUB_NAME, "--out", str(out),
                          "--gpus", "0", "--shadow-rate", "0")
    assert code == 0, output
    reference = transformers_means(tiny_hf_esm2_dir, read_fasta(DATA / "few_proteins.fasta"))
    for sid, got in embeddings_by_id(out).items():
        assert float(got @ reference[sid] / (np.linalg.norm(got) * np.linalg.norm(reference[sid]))) >= 0.9999
    model = json.loads((out / "manifest.json").read_text())["model"]
    assert model["name"] == HUB_NAME and "models--facebook--esm2_t6_8M_UR50D" in model["checkpoint"]
    assert model["licence"]["name"] == "MIT" and model["licence"]["confirmed"] is True



@pytest.mark.slow
def test_layers_and_per_token_vectors_follow_transformers_hidden_states(tmp_path: Path, tiny_hf_esm2_dir: Path) -> None:
    """--layers 0,1,-1 --pooling mean,cls --per-token on the directory: every stored vector equals transformers'
    EsmModel(output_hidden_states=True).hidden_states[layer] (FP32) for the same residue or <cls>."""
    from transformers import AutoTokenizer, EsmModel

    import runner

    out = tmp_path / "tok"
    code, output = invoke("embed", str(DATA / "few_proteins.fasta"), "--model", str(tiny_hf_esm2_dir), "--out",
                          str(out), "--gpus", "0", "--shadow-rate", "0", "--layers", "0,1,-1", "--pooling",
                          "mean,cls", "--per-token")
    assert code == 0, output
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_esm2_dir)
    model = EsmModel.from_pretrained(tiny_hf_esm2_dir, add_pooling_layer=False).eval()
    results = runner.open(out)
    table = read_parts(out)
    rows = {sid: i for i, sid in enumerate(table.column("id").to_pylist())}
    worst = 0.0
    for sid, seq in read_fasta(DATA / "few_proteins.fasta"):
        with torch.no_grad():
            hidden = model(**tokenizer([seq], return_tensors="pt"), output_hidden_states=True).hidden_states
        for layer in (0, 1, 2):  # -1 resolves to 2, after emb_layer_norm_after
            ref = hidden[layer][0].numpy()  # [n + 2, D]
            per_token = np.asarray(results.per_token(sid, layer), dtype=np.float32)  # [n, D]
            cls = np.asarray(table.column(f"layer{layer}_cls")[rows[sid]].as_py(), dtype=np.float32)
            mean = np.asarray(table.column(f"layer{layer}_mean")[rows[sid]].as_py(), dtype=np.float32)
            assert per_token.shape == ref[1:-1].shape
            worst = max(worst, float(np.abs(per_token - ref[1:-1]).max()), float(np.abs(cls - ref[0]).max()),
                        float(np.abs(mean - ref[1:-1].mean(0)).max()))
    assert worst < 1e-4, f"max abs diff {worst:.2e}"
