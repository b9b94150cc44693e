"""ESM-2 from transformers checkpoints: the packed ESM-2 against transformers' own EsmModel, the weight-name
table, the fair-esm conversion, the hub-name path through the Hugging Face cache, and the loader's errors."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from conftest import fake_hub_cache, pack
from safetensors.torch import load_file, save_file

from runner.errors import CheckpointError, RunnerError
from runner.models.esm2 import ESM2Embedder, load_esm2
from runner.models.registry import load_codec, load_model, model_family, model_info
from runner.stages.pooling import pool_packed


def transformers_hidden_states(directory: Path, seqs: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """transformers' own tokenizer and EsmModel, FP32, padded batch: (per layer [T, D] packed, input ids [T])."""
    from transformers import AutoTokenizer, EsmModel

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = EsmModel.from_pretrained(directory, add_pooling_layer=False).eval()
    batch = tokenizer(seqs, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    keep = batch["attention_mask"].bool()  # [B, L]
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)  # the last entry is after the final norm
    return [h[keep] for h in out.hidden_states], batch["input_ids"][keep]


@pytest.fixture(scope="module")
def proteins(some_proteins: list[tuple[str, str]]) -> list[str]:
    return [seq for _, seq in some_proteins]


@pytest.fixture(scope="module")
def bin_esm_dir(tmp_path_factory: pytest.TempPathFactory, tiny_hf_esm2_script: ModuleType) -> Path:
    """A bare EsmModel (with its untrained pooler) saved as pytorch_model.bin, 3 layers, another seed."""
    return tiny_hf_esm2_script.make_hf_esm2(
        tmp_path_factory.mktemp("hf_bin") / "esm_bin", layers=3, dim=48, heads=3, seed=1, model="esm",
        weights_format="bin",
    )


# --- numerics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["masked-lm safetensors", "EsmModel bin"])
def test_every_layer_matches_transformers(
    layout: str, tiny_hf_esm2_dir: Path, bin_esm_dir: Path, proteins: list[str]
) -> None:
    directory = tiny_hf_esm2_dir if layout.startswith("masked") else bin_esm_dir
    proteins = proteins if layout.startswith("masked") else proteins[:6]  # all 15 once is enough
    model = load_model(str(directory))
    assert isinstance(model, ESM2Embedder)  # the same packed ESM-2 as fair-esm checkpoints run
    reference, ids = transformers_hidden_states(directory, proteins)
    tokens, positions, cu, max_len = pack(model.codec, proteins)
    assert torch.equal(tokens, ids)  # runner's codec tokenizes as transformers' EsmTokenizer
    assert len(reference) == model.num_layers + 1
    for layer, ref in enumerate(reference):  # hidden_states[i] = layer i here, 0 = embeddings
        hidden = model.forward_packed(tokens, positions, cu, max_len, layer)  # [T, D]
        token_diff = (hidden - ref).abs().max().item()
        assert token_diff < 1e-4, f"layer {layer}: per-token max abs diff {token_diff:.2e}"
        cosine = F.cosine_similarity(pool_packed(hidden, cu, "mean", 1, 1), pool_packed(ref, cu, "mean", 1, 1))
        assert cosine.min().item() >= 0.9999, f"layer {layer}"


def test_fair_esm_conversion_gives_the_same_vectors(
    tmp_path: Path, tiny_hf_esm2_dir: Path, tiny_hf_esm2_script: ModuleType, proteins: list[str]
) -> None:
    import esm
    from esm.model.esm2 import ESM2

    pt = tiny_hf_esm2_script.to_fair_esm(tiny_hf_esm2_dir, tmp_path / "esm2_converted.pt")
    hf_model, pt_model = load_model(str(tiny_hf_esm2_dir)), load_esm2(str(pt))
    torch.testing.assert_close(pt_model.rotary_inv_freq, hf_model.rotary_inv_freq, rtol=0, atol=0)
    tokens, positions, cu, max_len = pack(hf_model.codec, proteins)
    via_hf = hf_model.forward_packed(tokens, positions, cu, max_len, -1)  # [T, D]
    via_pt = pt_model.forward_packed(tokens, positions, cu, max_len, -1)  # [T, D]
    assert torch.equal(via_hf, via_pt)  # the same weights give the same vectors, bit for bit

    # Independently of runner's forward: fair-esm's own ESM2 module holding the converted weights computes what
    # transformers computes (so the name table is right, not merely self-consistent).
    with torch.serialization.safe_globals([argparse.Namespace]):
        data = torch.load(pt, weights_only=True)
    cfg = data["cfg"]["model"]
    fair = ESM2(cfg.encoder_layers, cfg.encoder_embed_dim, cfg.encoder_attention_heads,
                esm.data.Alphabet.from_architecture("ESM-1b"), cfg.token_dropout).eval()
    state = {k.removeprefix("encoder.sentence_encoder."): v for k, v in data["model"].items()}
    result = fair.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= {"lm_head.weight", "lm_head.bias", "lm_head.dense.weight", "lm_head.dense.bias",
                                        "lm_head.layer_norm.weight", "lm_head.layer_norm.bias",
                                        "contact_head.regression.weight", "contact_head.regression.bias"}
    seqs = proteins[:5]
    converter = esm.data.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    _, _, padded = converter([(str(i), s) for i, s in enumerate(seqs)])  # [B, L]
    with torch.no_grad():
        reps = fair(padded, repr_layers=[cfg.encoder_layers])["representations"][cfg.encoder_layers]  # [B, L, D]
    fair_packed = reps[padded != fair.padding_idx]  # [T, D]
    reference, _ = transformers_hidden_states(tiny_hf_esm2_dir, seqs)
    assert (fair_packed - reference[-1]).abs().max().item() < 1e-4


def test_vocab_in_another_order_is_mapped(tmp_path: Path, tiny_hf_esm2_dir: Path, proteins: list[str]) -> None:
    shuffled = tmp_path / "shuffled"
    shutil.copytree(tiny_hf_esm2_dir, shuffled)
    vocab = (shuffled / "vocab.txt").read_text().split()
    order = list(range(len(vocab)))
    order[4], order[5], order[22], order[23] = 5, 4, 23, 22  # L <-> A, W <-> C
    (shuffled / "vocab.txt").write_text("\n".join(vocab[i] for i in order) + "\n")
    weights = load_file(shuffled / "model.safetensors")
    rows = weights["esm.embeddings.word_embeddings.weight"]
    weights["esm.embeddings.word_embeddings.weight"] = rows[order].contiguous()
    save_file(weights, shuffled / "model.safetensors", metadata={"format": "pt"})
    original, remapped = load_model(str(tiny_hf_esm2_dir)), load_model(str(shuffled))
    tokens, positions, cu, max_len = pack(original.codec, proteins[:3])
    assert torch.equal(original.forward_packed(tokens, positions, cu, max_len, -1),
                       remapped.forward_packed(tokens, positions, cu, max_len, -1))

    (shuffled / "vocab.txt").write_text("\n".join(["<cls>", "<pad>", "<eos>", "<unk>", *"ACGT"]) + "\n")
    with pytest.raises(CheckpointError, match="vocab.txt is not ESM-2's alphabet"):
        load_codec(str(shuffled))


def test_sharded_weights_with_an_index(
    tmp_path: Path, tiny_hf_esm2_dir: Path, proteins: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path / "cache"))  # the hashes it remembers stay here
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_hf_esm2_dir, sharded)
    weights = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(weights)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: weights[k] for k in part}, sharded / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    single, split = load_model(str(tiny_hf_esm2_dir)), load_model(str(sharded))
    tokens, positions, cu, max_len = pack(single.codec, proteins[:3])
    assert torch.equal(single.forward_packed(tokens, positions, cu, max_len, -1),
                       split.forward_packed(tokens, positions, cu, max_len, -1))
    assert len(model_info(str(sharded), compute_sha256=True).checkpoint_sha256) == 64
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lacks the shard"):
        load_model(str(sharded))


# --- the hub name, through the Hugging Face cache ----------------------------------------------------


def test_hub_name_loads_from_the_hugging_face_cache(
    tmp_path: Path, tiny_hf_esm2_dir: Path, monkeypatch: pytest.MonkeyPatch, proteins: list[str]
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network here: the cache must serve it
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path / "cache"))  # runner's own hash cache stays here
    name = "facebook/esm2_t6_8M_UR50D"
    assert model_family(name) == "esm2"
    with pytest.raises(CheckpointError, match="cannot download facebook/esm2_t6_8M_UR50D"):
        load_model(name)
    published = model_info(name)  # not cached: the published architecture, nothing downloaded
    assert (published.embed_dim, published.num_layers, published.checkpoint) == (320, 6, "")

    snapshot = fake_hub_cache(tmp_path / "hub", name, tiny_hf_esm2_dir)
    model = load_model(name)
    assert model.info.name == name and model.info.checkpoint == str(snapshot.resolve())
    local = load_model(str(tiny_hf_esm2_dir))
    tokens, positions, cu, max_len = pack(model.codec, proteins[:3])
    assert torch.equal(model.forward_packed(tokens, positions, cu, max_len, -1),
                       local.forward_packed(tokens, positions, cu, max_len, -1))
    info = model_info(name, compute_sha256=True)
    assert info.embed_dim == 64 and info.checkpoint == str(snapshot.resolve())
    assert len(info.checkpoint_sha256) == 64 and info.parameters == model.info.parameters
    assert model_info(name).embed_dim == 64  # cached now: the config of the cached snapshot


# --- errors ------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(directory: Path, edit) -> None:
    weights = load_file(directory / "model.safetensors")
    edit(weights)
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_weight_problems_are_listed_in_one_error(tmp_path: Path, tiny_hf_esm2_dir: Path) -> None:
    broken = _copy(tiny_hf_esm2_dir, tmp_path / "broken")

    def edit(w: dict) -> None:
        del w["esm.encoder.layer.1.attention.self.key.weight"]
        w["classifier.dense.weight"] = torch.zeros(2, 64)
        w["esm.encoder.layer.0.intermediate.dense.bias"] = torch.zeros(7)

    _edit_weights(broken, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(str(broken))
    message = str(err.value)
    assert "missing: encoder.layer.1.attention.self.key.weight" in message
    assert "unexpected: classifier.dense.weight" in message
    assert "wrong shape: encoder.layer.0.intermediate.dense.bias (7,)" in message
    assert "\n" not in message

    uneven = _copy(tiny_hf_esm2_dir, tmp_path / "uneven")
    _edit_weights(uneven, lambda w: w.update(
        {"esm.encoder.layer.0.attention.self.rotary_embeddings.inv_freq": torch.ones(8)}))
    with pytest.raises(CheckpointError, match="rotary inv_freq of .* differs"):
        load_model(str(uneven))


def test_directory_problems_name_what_is_wrong(tmp_path: Path, tiny_hf_esm2_dir: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunnerError, match="has no config.json"):
        load_codec(str(empty))
    other = _copy(tiny_hf_esm2_dir, tmp_path / "llama")
    _edit_config(other, model_type="llama")
    with pytest.raises(RunnerError, match="model_type 'llama', which runner does not run"):
        model_family(str(other))
    esm1b = _copy(tiny_hf_esm2_dir, tmp_path / "esm1b")
    _edit_config(esm1b, position_embedding_type="absolute", emb_layer_norm_before=True)
    with pytest.raises(CheckpointError, match="only ESM-2 .* is supported"):
        load_codec(str(esm1b))
    novocab = _copy(tiny_hf_esm2_dir, tmp_path / "novocab")
    (novocab / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match="no readable vocab.txt"):
        load_codec(str(novocab))
    noweights = _copy(tiny_hf_esm2_dir, tmp_path / "noweights")
    (noweights / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors or pytorch_model.bin"):
        load_model(str(noweights))
    # A .bin is unpickled with weights_only=True: a pickled object other than tensors is refused, not run.
    torch.save({"esm.embeddings.word_embeddings.weight": argparse.Namespace(x=1)}, noweights / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="cannot read weights .*pytorch_model.bin"):
        load_model(str(noweights))


# --- GPU (python -m pytest -m gpu -s tests/test_esm2_hf.py) -----------------------------------------


def _on_gpu(model: ESM2Embedder, compiled: bool = True) -> ESM2Embedder:
    """The model as an embedding actor runs it: fp16 on the GPU, fastest attention, compiled layers, fused GELU."""
    device = torch.device("cuda")
    model = model.to(device=device, dtype=torch.float16)
    model.select_attention(device)
    model.use_compile(compiled)
    model.fused_gelu = True  # embed's default on GPUs (--exact-gelu turns it off)
    return model


def _cuda(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.cuda() for t in tensors]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fp16_packed_vs_transformers_fp32(tiny_hf_esm2_dir: Path, proteins: list[str]) -> None:
    model = _on_gpu(load_model(str(tiny_hf_esm2_dir)))
    tokens, positions, cu, max_len = pack(model.codec, proteins)
    hidden = model.forward_packed(*_cuda(tokens, positions, cu), max_len, -1)  # [T, D] fp16
    pooled = pool_packed(hidden.float(), cu.cuda(), "mean", 1, 1).cpu()  # [B, D]
    reference, _ = transformers_hidden_states(tiny_hf_esm2_dir, proteins)
    pooled_ref = pool_packed(reference[-1], cu, "mean", 1, 1)  # [B, D]
    cosine = F.cosine_similarity(pooled, pooled_ref)
    print(f"\ntiny HF ESM-2, {model.attention_backend} fp16 packed vs transformers FP32: cosine mean "
          f"{cosine.mean().item():.6f} min {cosine.min().item():.6f}, max abs diff "
          f"{(pooled - pooled_ref).abs().max().item():.3e}")
    assert model.attention_backend in ("flash_attn", "torch_varlen") and model.compiling
    assert cosine.mean().item() >= 0.999 and cosine.min().item() >= 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_650m_from_transformers_runs_the_fair_esm_model_code(
    tmp_path: Path, tiny_hf_esm2_script: ModuleType, proteins: list[str]
) -> None:
    """The 650M architecture (random weights) saved by transformers and the same weights as a fair-esm file:
    one model class, the same kernels, bit-identical fp16 outputs, the same speed; and close to transformers'
    own FP32 forward."""
    import time

    from transformers import EsmModel

    hf_dir = tiny_hf_esm2_script.make_hf_esm2(tmp_path / "esm2_650M_hf", layers=33, dim=1280, heads=20, seed=0)
    pt = tiny_hf_esm2_script.to_fair_esm(hf_dir, tmp_path / "esm2_650M.pt")
    seqs = (proteins * 8)[:96]  # 96 real proteins, ~45k tokens: one packed batch
    models = {"transformers dir": _on_gpu(load_model(str(hf_dir))), "fair-esm .pt": _on_gpu(load_esm2(str(pt)))}
    tokens, positions, cu, max_len = pack(models["fair-esm .pt"].codec, seqs)
    tokens, positions, cu = _cuda(tokens, positions, cu)
    outputs, speed = {}, {}
    for name, model in models.items():
        for _ in range(3):  # compile and warm up
            outputs[name] = model.forward_packed(tokens, positions, cu, max_len, -1)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            model.forward_packed(tokens, positions, cu, max_len, -1)
        torch.cuda.synchronize()
        speed[name] = 10 * tokens.numel() / (time.perf_counter() - start)
    rates = ", ".join(f"{name} {tps / 1e3:.0f}k tok/s" for name, tps in speed.items())
    hf, fair = models.values()
    print(f"\n650M, one packed batch of {tokens.numel()} tokens, {hf.attention_backend}: {rates}")
    assert type(hf) is type(fair) and hf.attention_backend == fair.attention_backend
    assert hf.compiling and fair.compiling and hf.fused_gelu_in_use == fair.fused_gelu_in_use
    assert torch.equal(outputs["transformers dir"], outputs["fair-esm .pt"])

    reference = EsmModel.from_pretrained(hf_dir, add_pooling_layer=False).cuda().eval()
    sample = proteins[:8]
    tokens, positions, cu, max_len = pack(hf.codec, sample)
    tokens, positions, cu = _cuda(tokens, positions, cu)
    with torch.no_grad():  # one sequence at a time: no padding in the reference
        ref_hidden = [reference(tokens[a:b][None]).last_hidden_state[0] for a, b in zip(cu[:-1], cu[1:], strict=True)]
    pooled_ref = pool_packed(torch.cat(ref_hidden).float(), cu, "mean", 1, 1)  # [8, D]
    pooled = pool_packed(hf.forward_packed(tokens, positions, cu, max_len, -1).float(), cu, "mean", 1, 1)  # [8, D]
    cosine = F.cosine_similarity(pooled, pooled_ref)
    print(f"650M random weights, fp16 packed vs transformers FP32: cosine mean {cosine.mean().item():.6f} "
          f"min {cosine.min().item():.6f}")
    assert cosine.mean().item() >= 0.999 and cosine.min().item() >= 0.99
