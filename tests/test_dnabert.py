"""DNABERT-S / DNABERT-2 (MosaicBERT): packed forward against an independent per-sequence reference,
checkpoint loading (both released layouts, missing / unexpected weights), and the codec."""

from __future__ import annotations

import importlib.util
import math
import pickle
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runner.errors import CheckpointError, RunnerError
from runner.models.dnabert import DnabertCodec, DnabertEmbedder, dnabert_codec, dnabert_info, load_dnabert
from runner.stages.pooling import pool_packed

REPO = Path(__file__).resolve().parents[1]


def _import_tiny():
    spec = importlib.util.spec_from_file_location("tiny_dnabert", REPO / "scripts" / "tiny_dnabert.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_dnabert"] = module
    spec.loader.exec_module(module)
    return module


tiny = _import_tiny()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny checkpoints: DNABERT-2 layout with 4 heads (power of two) and DNABERT-S layout with
    6 heads (not a power of two, like the released 12: exercises the interleaved ALiBi slopes)."""
    root = tmp_path_factory.mktemp("dnabert")
    return {
        "dnabert2": tiny.make_dnabert(root / "d2", layers=2, dim=32, heads=4, seed=0, layout="dnabert2"),
        "dnabert-s": tiny.make_dnabert(root / "ds", layers=3, dim=48, heads=6, seed=1, layout="dnabert-s"),
    }


# ---------------------------------------------------------------------------------------------------
# An independent reference: per sequence, dense attention with an explicit ALiBi matrix, reading the
# released weight names straight from the safetensors file.
# ---------------------------------------------------------------------------------------------------


def ref_slopes(n_heads: int) -> list[float]:
    """ALiBi slopes as in the ALiBi paper / MosaicBERT: geometric for 2^k heads; otherwise those of the
    nearest lower power of two followed by every other slope of the next power of two."""

    def pow2(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return pow2(n_heads)
    lower = 2 ** math.floor(math.log2(n_heads))
    return pow2(lower) + pow2(2 * lower)[0::2][: n_heads - lower]


def ref_forward(directory: Path, ids: list[int], layer: int = -1) -> torch.Tensor:
    """Hidden states [n, D] of one sequence, float64, no packing."""
    import json

    from safetensors.torch import load_file

    cfg = json.loads((directory / "config.json").read_text())
    raw = load_file(str(directory / "model.safetensors"))
    w = {k.removeprefix("bert."): v.double() for k, v in raw.items()}
    d, h, inner = cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"]
    hd, eps = d // h, cfg["layer_norm_eps"]
    n = len(ids)
    ln = lambda x, p: F.layer_norm(x, (d,), w[p + ".weight"], w[p + ".bias"], eps)  # noqa: E731
    x = (
        w["embeddings.word_embeddings.weight"][torch.tensor(ids)]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = ln(x, "embeddings.LayerNorm")
    pos = torch.arange(n, dtype=torch.float64)
    dist = (pos[None, :] - pos[:, None]).abs()  # [n, n]
    bias = -torch.tensor(ref_slopes(h), dtype=torch.float64)[:, None, None] * dist  # [h, n, n]
    stop = cfg["num_hidden_layers"] if layer == -1 else layer
    for i in range(stop):
        p = f"encoder.layer.{i}."
        qkv = x @ w[p + "attention.self.Wqkv.weight"].T + w[p + "attention.self.Wqkv.bias"]  # [n, 3d]
        q, k, v = (
            qkv[:, j * d : (j + 1) * d].reshape(n, h, hd).transpose(0, 1) for j in range(3)
        )  # [h, n, hd]
        scores = q @ k.transpose(1, 2) / math.sqrt(hd) + bias  # [h, n, n]
        ctx = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, d)  # [n, d]
        att = ctx @ w[p + "attention.output.dense.weight"].T + w[p + "attention.output.dense.bias"]
        x = ln(att + x, p + "attention.output.LayerNorm")
        gv = x @ w[p + "mlp.gated_layers.weight"].T  # [n, 2I]
        mid = F.gelu(gv[:, :inner]) * gv[:, inner:]
        x = ln(mid @ w[p + "mlp.wo.weight"].T + w[p + "mlp.wo.bias"] + x, p + "mlp.layernorm")
    return x


def _random_batch(codec: DnabertCodec, lengths: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = random.Random(seed)
    return [codec.encode(tiny.random_dna(rng, n)) for n in lengths]


def _pack(encoded: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    tokens = torch.from_numpy(np.concatenate(encoded).astype(np.int64))  # [T]
    positions = torch.from_numpy(np.concatenate([np.arange(len(e)) for e in encoded]).astype(np.int64))  # [T]
    cu = torch.tensor([0, *np.cumsum([len(e) for e in encoded])], dtype=torch.int32)  # [B+1]
    return tokens, positions, cu, max(len(e) for e in encoded)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)


LENGTHS = [1, 7, 60, 250, 33, 900, 2]


@pytest.mark.parametrize("layout", ["dnabert2", "dnabert-s"])
@pytest.mark.parametrize("layer", [-1, 0, 1])
def test_packed_forward_matches_per_sequence_reference(tiny_dirs, layout, layer):
    directory = tiny_dirs[layout]
    model = load_dnabert(str(directory))
    model.select_attention(torch.device("cpu"))
    encoded = _random_batch(model.codec, LENGTHS)
    tokens, positions, cu, max_len = _pack(encoded)
    with torch.inference_mode():
        hidden = model.forward_packed(tokens, positions, cu, max_len, layer)  # [T, D]
    assert hidden.shape == (int(cu[-1]), model.info.embed_dim)
    assert hidden.dtype == torch.float32
    refs = [ref_forward(directory, e.tolist(), layer) for e in encoded]
    ref_tokens = torch.cat(refs)  # [T, D]
    assert (hidden.double() - ref_tokens).abs().max().item() < 2e-4
    pooled = pool_packed(hidden, cu, "mean_all", 1, 1)  # [B, D]
    ref_pooled = torch.stack([r.mean(0) for r in refs])  # [B, D]
    assert _cos(pooled, ref_pooled).min().item() >= 0.9999


def test_bf16_packed_drift_is_bounded(tiny_dirs):
    model = load_dnabert(str(tiny_dirs["dnabert2"]))
    model.select_attention(torch.device("cpu"))
    encoded = _random_batch(model.codec, LENGTHS, seed=3)
    tokens, positions, cu, max_len = _pack(encoded)
    with torch.inference_mode():
        ref = pool_packed(model.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean_all", 1, 1)
        half = model.to(torch.bfloat16)
        half.fp32_layernorm = True
        out = half.forward_packed(tokens, positions, cu, max_len, -1)  # [T, D]
    assert out.dtype == torch.bfloat16
    cos = _cos(pool_packed(out, cu, "mean_all", 1, 1), ref)
    assert cos.min().item() >= 0.99
    assert cos.mean().item() >= 0.995


def test_layer_out_of_range_is_a_user_error(tiny_dirs):
    model = load_dnabert(str(tiny_dirs["dnabert2"]))
    tokens, positions, cu, max_len = _pack(_random_batch(model.codec, [10]))
    with pytest.raises(RunnerError, match="--layer"):
        model.forward_packed(tokens, positions, cu, max_len, model.info.num_layers + 1)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def _rewrite_weights(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_missing_weight_is_named(tiny_dirs, tmp_path):
    name = "bert.encoder.layer.1.mlp.wo.bias"
    bad = _rewrite_weights(tiny_dirs["dnabert2"], tmp_path / "bad", lambda s: s.pop(name))
    with pytest.raises(CheckpointError, match=r"missing: encoder\.layer\.1\.mlp\.wo\.bias"):
        load_dnabert(str(bad))


def test_unexpected_weight_is_named(tiny_dirs, tmp_path):
    def add(state):
        state["bert.encoder.layer.0.attention.self.bogus.weight"] = torch.zeros(3)

    bad = _rewrite_weights(tiny_dirs["dnabert2"], tmp_path / "bad", add)
    with pytest.raises(
        CheckpointError, match=r"unexpected: encoder\.layer\.0\.attention\.self\.bogus\.weight"
    ):
        load_dnabert(str(bad))


def test_wrong_shape_is_named(tiny_dirs, tmp_path):
    def shrink(state):
        state["encoder.layer.0.mlp.wo.weight"] = state["encoder.layer.0.mlp.wo.weight"][:, :5].contiguous()

    bad = _rewrite_weights(tiny_dirs["dnabert-s"], tmp_path / "bad", shrink)
    with pytest.raises(CheckpointError, match=r"wrong shape: encoder\.layer\.0\.mlp\.wo\.weight"):
        load_dnabert(str(bad))


def test_known_heads_are_ignored_and_both_layouts_load(tiny_dirs):
    from safetensors.torch import load_file

    d2 = load_file(str(tiny_dirs["dnabert2"] / "model.safetensors"))
    assert any(k.startswith("cls.predictions.") for k in d2)  # the MLM head is in the file ...
    ds = load_file(str(tiny_dirs["dnabert-s"] / "model.safetensors"))
    assert "pooler.dense.weight" in ds and not any(k.startswith("bert.") for k in ds)
    for layout in ("dnabert2", "dnabert-s"):
        model = load_dnabert(str(tiny_dirs[layout]))  # ... and loading drops it without complaint
        assert not any(k.startswith(("cls.", "pooler.")) for k in model.state_dict())
        assert model.info.family == "dnabert"
        assert len(model.info.checkpoint_sha256) == 64
        assert not any(p.requires_grad for p in model.parameters())


def test_pytorch_model_bin_loads_the_same(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    src = tiny_dirs["dnabert2"]
    dst = tmp_path / "bin"
    shutil.copytree(src, dst)
    torch.save(load_file(str(dst / "model.safetensors")), dst / "pytorch_model.bin")
    (dst / "model.safetensors").unlink()
    a, b = load_dnabert(str(src)), load_dnabert(str(dst))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_not_a_directory_or_hub_name(tmp_path):
    with pytest.raises(CheckpointError, match="neither"):
        load_dnabert(str(tmp_path / "nope"))


def test_hub_failure_suggests_local_directory(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match="local directory"):
        load_dnabert("zhihan1996/DNABERT-S")
    with pytest.raises(CheckpointError, match="local directory"):
        dnabert_codec("zhihan1996/DNABERT-2-117M")


def test_info_without_weights(tiny_dirs, monkeypatch):
    for layout, directory in tiny_dirs.items():
        info = dnabert_info(str(directory))
        model = load_dnabert(str(directory))
        assert info.parameters == model.info.parameters, layout
        assert (info.embed_dim, info.num_layers) == (model.info.embed_dim, model.info.num_layers)
    import huggingface_hub

    def not_cached(*args, **kwargs):
        raise FileNotFoundError("not in cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    info = dnabert_info("zhihan1996/DNABERT-S")
    assert (info.embed_dim, info.num_layers, info.checkpoint) == (768, 12, "")
    assert 116_000_000 < info.parameters < 118_000_000  # 117M with the pooler; the encoder alone ~116.5M


def test_model_from_config_dict_alone():
    cfg = {"vocab_size": 50, "hidden_size": 24, "num_hidden_layers": 1, "num_attention_heads": 3,
           "intermediate_size": 40}  # fmt: skip
    model = DnabertEmbedder(cfg)
    tokens = torch.tensor([1, 7, 9, 2, 1, 2])
    cu = torch.tensor([0, 4, 6], dtype=torch.int32)
    with torch.inference_mode():
        out = model.forward_packed(tokens, torch.tensor([0, 1, 2, 3, 0, 1]), cu, 4, -1)
    assert out.shape == (6, 24) and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------------------------------


def test_codec_cleaning_and_alphabet(tiny_dirs):
    codec = dnabert_codec(str(tiny_dirs["dnabert2"]))
    assert codec.kind == "dna"
    assert codec.clean(" acgu\nNu t\t") == "ACGTNTT"
    assert codec.invalid_characters("ACGTN") == ""
    assert codec.invalid_characters("ACXGTB-X") == "-BX"
    assert (codec.special_start, codec.special_end) == (1, 1)
    assert codec.default_pooling == "mean_all"


def test_codec_adds_cls_and_sep_once(tiny_dirs):
    codec = dnabert_codec(str(tiny_dirs["dnabert2"]))
    ids = codec.encode("ACGTACGGTTACNAC")
    assert ids.dtype == np.int32
    assert ids[0] == codec.cls_id == 1 and ids[-1] == codec.sep_id == 2
    assert (ids[1:-1] > 2).all()  # no special token inside
    assert codec.encode("").tolist() == [1, 2]
    # A tokenizer without a post-processor still gets exactly one [CLS] and one [SEP].
    import json

    raw = json.loads((tiny_dirs["dnabert2"] / "tokenizer.json").read_text())
    raw["post_processor"] = None
    bare = DnabertCodec(json.dumps(raw))
    assert bare.encode("ACGTACGGTTACNAC").tolist() == ids.tolist()


def test_codec_respects_token_limit(tiny_dirs):
    codec = dnabert_codec(str(tiny_dirs["dnabert2"]))
    assert codec.max_tokens == 512 and codec.max_residues == 2048
    long = tiny.random_dna(random.Random(5), codec.max_residues)
    ids = codec.encode(long)  # the tiny 96-token BPE makes ~700 tokens of 2048 nt: cut to the limit
    assert len(ids) == codec.max_tokens
    assert ids[0] == codec.cls_id and ids[-1] == codec.sep_id
    full = codec.tokenizer.encode(long, add_special_tokens=False).ids
    assert ids[1:-1].tolist() == full[: codec.max_tokens - 2]  # the head of the sequence is kept
    small = DnabertCodec(codec.tokenizer_json, max_tokens=8)
    assert len(small.encode(long)) == 8


def test_codec_pickles(tiny_dirs):
    codec = dnabert_codec(str(tiny_dirs["dnabert-s"]))
    seq = tiny.random_dna(random.Random(2), 300)
    before = codec.encode(seq)
    blob = pickle.dumps(codec)
    again = pickle.loads(blob)
    assert again._tokenizer is None  # rebuilt lazily from the JSON text
    assert again.encode(seq).tolist() == before.tolist()
    assert (again.max_residues, again.max_tokens) == (codec.max_residues, codec.max_tokens)


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_fp16_packed_matches_fp32_exact_on_gpu(tiny_dirs):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dev = torch.device("cuda")
    # 12 heads like the release (interleaved ALiBi slopes); head dim 16, the smallest flex compiles.
    directory = tiny.make_dnabert(tiny_dirs["dnabert2"].parent / "gpu", layers=4, dim=192, heads=12, seed=4)
    ref_model = load_dnabert(str(directory)).to(dev)
    ref_model.attention_backend = "exact"
    model = load_dnabert(str(directory)).to(dev, torch.float16)
    backend = model.select_attention(dev)
    assert backend in ("flash_attn", "flex")
    rng = random.Random(7)
    lengths = [int(min(2000, max(50, rng.lognormvariate(math.log(250), 0.6)))) for _ in range(200)]
    encoded = _random_batch(model.codec, lengths, seed=8)
    tokens, positions, cu, max_len = (t.to(dev) if torch.is_tensor(t) else t for t in _pack(encoded))
    with torch.inference_mode():
        ref = pool_packed(ref_model.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean_all", 1, 1)
        out = pool_packed(model.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean_all", 1, 1)
    cos = _cos(out, ref)
    assert cos.mean().item() >= 0.999
    assert cos.min().item() >= 0.99


def test_registry_dispatches_a_dnabert_directory(tiny_dirs):
    from runner.models.registry import load_codec, load_model, model_family, model_info

    spec = str(tiny_dirs["dnabert-s"])
    assert model_family(spec) == "dnabert"
    assert isinstance(load_codec(spec), DnabertCodec)
    assert isinstance(load_model(spec), DnabertEmbedder)
    assert model_info(spec).family == "dnabert"
