"""ESM-2: packed forward vs fair-esm's padded forward, checkpoint loading and its errors, the codec."""

from __future__ import annotations

import copy
import fractions
import hashlib
import shutil
import urllib.error
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_fair_esm, pack, shadow_math_models

from runner.errors import CheckpointError, RunnerError
from runner.kernels.fp16x3 import SplitWeight
from runner.models import checkpoints
from runner.models.checkpoints import download_esm2, load_fair_esm_checkpoint, sha256_file
from runner.models.esm2 import ESM2_MODELS, Esm2Codec, ESM2Embedder, esm2_codec, esm2_info, load_esm2
from runner.models.esm2_layers import linear_tanh_gelu
from runner.models.registry import load_codec, load_model, model_family
from runner.stages.pooling import pool_packed


def fair_esm_padded(model: torch.nn.Module, seqs: list[str], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fair-esm's own batch converter + padded forward: ([B, L, D] representations, [B] token counts)."""
    converter = model.alphabet.get_batch_converter()
    _, _, tokens = converter([(str(i), s) for i, s in enumerate(seqs)])  # [B, L] padded
    with torch.no_grad():
        reps = model(tokens, repr_layers=[layer])["representations"][layer]  # [B, L, D]
    return reps, (tokens != model.alphabet.padding_idx).sum(1)


def unpack_reference(reps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, L, D] padded -> [T, D] packed."""
    return torch.cat([reps[i, :n] for i, n in enumerate(lengths.tolist())])


@pytest.fixture(scope="module")
def embedder(tiny_esm2_path: Path) -> ESM2Embedder:
    return load_esm2(str(tiny_esm2_path))


@pytest.fixture(scope="module")
def proteins(some_proteins: list[tuple[str, str]]) -> list[str]:
    return [seq for _, seq in some_proteins]


# --- numerics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1, 2, -1])
def test_packed_matches_fair_esm_padded(
    embedder: ESM2Embedder, fair_esm_model: torch.nn.Module, proteins: list[str], layer: int
) -> None:
    tokens, positions, cu, max_len = pack(embedder.codec, proteins)
    hidden = embedder.forward_packed(tokens, positions, cu, max_len, layer)  # [T, D]
    ref_layer = embedder.resolve_layer(layer)
    reps, lengths = fair_esm_padded(fair_esm_model, proteins, ref_layer)
    assert torch.equal(lengths, (cu[1:] - cu[:-1]).long())
    ref = unpack_reference(reps, lengths)  # [T, D]
    assert hidden.shape == ref.shape and hidden.dtype == torch.float32

    token_diff = (hidden - ref).abs().max().item()
    assert token_diff < 1e-4, f"per-token max abs diff {token_diff:.2e}"
    pooled = pool_packed(hidden, cu, "mean", 1, 1)  # [B, D]
    pooled_ref = pool_packed(ref, cu, "mean", 1, 1)  # [B, D]
    cosine = F.cosine_similarity(pooled, pooled_ref, dim=-1)  # [B]
    assert cosine.min().item() >= 0.9999


def test_fused_qkv_shares_the_modules_memory_and_follows_moves(
    embedder: ESM2Embedder, fair_esm_model: torch.nn.Module, proteins: list[str]
) -> None:
    """q/k/v run as one [3D, D] projection whose memory the fair-esm module's own q/k/v weights share (no second
    copy on the GPU); fair-esm's forward over the module is unchanged, and a move to another dtype rebuilds."""
    model = copy.deepcopy(embedder)
    tokens, positions, cu, max_len = pack(model.codec, proteins[:4])
    packed = model.forward_packed(tokens, positions, cu, max_len, -1)
    dim = model.info.embed_dim
    for layer, weights in zip(model.esm.layers, model.layer_weights(), strict=True):
        attn = layer.self_attn
        assert weights.qkv_weight.shape == (3 * dim, dim) and weights.qkv_bias.shape == (3 * dim,)
        assert attn.q_proj.weight.data_ptr() == weights.qkv_weight.data_ptr()  # views, not copies
        assert attn.v_proj.weight.data_ptr() == weights.qkv_weight[2 * dim :].data_ptr()
        assert attn.k_proj.bias.data_ptr() == weights.qkv_bias[dim:].data_ptr()
        assert not attn.q_proj.weight.is_inference() and not attn.q_proj.weight.requires_grad
    assert model.layer_weights() is model.layer_weights()  # built once
    reps, lengths = fair_esm_padded(model.esm, proteins[:4], model.num_layers)  # the module itself still works
    reference, _ = fair_esm_padded(fair_esm_model, proteins[:4], model.num_layers)
    assert torch.equal(reps, reference)
    assert (unpack_reference(reps, lengths) - packed).abs().max().item() < 1e-4

    model.double()  # moves every weight: the fused ones must follow, not keep the float32 copies
    out = model.forward_packed(tokens, positions, cu, max_len, -1)
    assert out.dtype == torch.float64 and model.layer_weights()[0].qkv_weight.dtype == torch.float64
    assert (out - packed.double()).abs().max().item() < 1e-4


def test_fused_tanh_gelu_op_and_cpu_forward(embedder: ESM2Embedder, proteins: list[str]) -> None:
    """`linear_tanh_gelu` (cuBLASLt's GEMM + GELU epilogue on CUDA) is GELU's tanh approximation of the
    linear layer, eager and through inductor (a custom op it must not decompose); the model option only
    changes half precision on CUDA, so a CPU model computes fair-esm's erf GELU whatever it says."""
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in ((37, 16), (24, 16), (24,)))
    expected = F.gelu(F.linear(x, weight, bias), approximate="tanh")  # [37, 24]
    assert torch.allclose(linear_tanh_gelu(x, weight, bias), expected, atol=1e-6)
    assert not torch.allclose(F.gelu(F.linear(x, weight, bias)), expected, atol=1e-6)  # erf differs
    if shutil.which("cc") or shutil.which("gcc"):
        compiled = torch.compile(linear_tanh_gelu, dynamic=False)
        assert torch.allclose(compiled(x, weight, bias), expected, atol=1e-6)
    model = copy.deepcopy(embedder)
    model.fused_gelu = True
    tokens, positions, cu, max_len = pack(model.codec, proteins[:3])
    assert torch.equal(
        model.forward_packed(tokens, positions, cu, max_len, -1), embedder.forward_packed(tokens, positions, cu, max_len, -1)
    )


def test_intermediate_layer_differs_from_last(embedder: ESM2Embedder, proteins: list[str]) -> None:
    tokens, positions, cu, max_len = pack(embedder.codec, proteins[:3])
    first = embedder.forward_packed(tokens, positions, cu, max_len, 1)
    last = embedder.forward_packed(tokens, positions, cu, max_len, -1)
    assert torch.equal(last, embedder.forward_packed(tokens, positions, cu, max_len, 2))
    assert not torch.allclose(first, last)


def test_mask_tokens_follow_fair_esm_token_dropout(
    embedder: ESM2Embedder, fair_esm_model: torch.nn.Module
) -> None:
    """<mask> tokens change the per-sequence token-dropout scale; the packed path must rescale per sequence."""
    seqs = ["MKTAYIAKQRQISFVKSHFSRQ", "GGSWLLQA"]
    masked = ["MKTAYIA<mask>QRQIS<mask>VKSHFSRQ", "GGSWLLQA"]
    alphabet = fair_esm_model.alphabet
    converter = alphabet.get_batch_converter()
    _, _, padded = converter([("a", masked[0]), ("b", masked[1])])  # [2, L]
    with torch.no_grad():
        reps = fair_esm_model(padded, repr_layers=[2])["representations"][2]  # [2, L, D]
    tokens, positions, cu, max_len = pack(embedder.codec, seqs)
    tokens[8] = alphabet.mask_idx  # positions 7 and 13 of the first sequence, shifted by <cls>
    tokens[14] = alphabet.mask_idx
    lengths = (cu[1:] - cu[:-1]).long()
    assert torch.equal(tokens, unpack_reference(padded[..., None], lengths)[:, 0])
    hidden = embedder.forward_packed(tokens, positions, cu, max_len, -1)
    assert (hidden - unpack_reference(reps, lengths)).abs().max().item() < 1e-4


def test_bf16_packed_drift_is_bounded(
    embedder: ESM2Embedder, fair_esm_model: torch.nn.Module, proteins: list[str]
) -> None:
    low = copy.deepcopy(embedder).to(torch.bfloat16)
    tokens, positions, cu, max_len = pack(low.codec, proteins)
    hidden = low.forward_packed(tokens, positions, cu, max_len, -1)  # [T, D] bf16
    assert hidden.dtype == torch.bfloat16
    reps, lengths = fair_esm_padded(fair_esm_model, proteins, 2)
    pooled = pool_packed(hidden, cu, "mean", 1, 1)
    pooled_ref = pool_packed(unpack_reference(reps, lengths), cu, "mean", 1, 1)
    cosine = F.cosine_similarity(pooled, pooled_ref, dim=-1)
    drift = (pooled - pooled_ref).abs().max().item()
    assert drift > 0  # bf16 really computed in bf16
    assert cosine.min().item() >= 0.99, f"bf16 cosine min {cosine.min().item():.5f}"


def test_fp32_layernorm_option(embedder: ESM2Embedder, proteins: list[str]) -> None:
    low = copy.deepcopy(embedder).to(torch.bfloat16)
    tokens, positions, cu, max_len = pack(low.codec, proteins[:4])
    plain = low.forward_packed(tokens, positions, cu, max_len, -1)
    low.fp32_layernorm = True
    robust = low.forward_packed(tokens, positions, cu, max_len, -1)
    assert robust.dtype == torch.bfloat16 and torch.isfinite(robust).all()
    assert (robust.float() - plain.float()).abs().max().item() < 0.5
    # on an fp32 model the option changes nothing
    fp32 = copy.deepcopy(embedder)
    fp32.fp32_layernorm = True
    assert torch.equal(
        fp32.forward_packed(tokens, positions, cu, max_len, -1),
        embedder.forward_packed(tokens, positions, cu, max_len, -1),
    )


@pytest.mark.parametrize(
    ("math", "compiled", "max_one_minus_cos"), [("fp16x3", False, 1e-10), ("bf16x3", False, 1e-7), ("fp16x3", True, 1e-10)]
)
def test_split_math_forward_matches_fp32(
    embedder: ESM2Embedder, proteins: list[str], math: str, compiled: bool, max_one_minus_cos: float
) -> None:
    """The shadow's split projections (pre-split weights per layer) through the whole ESM-2 forward:
    FP32-class for fp16x3 (on CPU the half GEMM's arithmetic runs in float32, see tests/test_fp16x3.py),
    compiled too (inductor once optimised the hi/lo split away inside its fused kernels)."""
    if compiled and shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("inductor needs a C compiler")
    emulated = copy.deepcopy(embedder)
    emulated.emulate_fp32(math)
    assert emulated.use_compile(compiled) == compiled
    weights = emulated.layer_weights()
    assert len(weights) == emulated.num_layers
    assert all(isinstance(w.qkv_weight, SplitWeight) and isinstance(w.fc2_weight, SplitWeight) for w in weights)
    assert weights[0].qkv_weight.pairs.shape[0] == 3 * emulated.info.embed_dim  # q, k, v as one product
    tokens, positions, cu, max_len = pack(embedder.codec, proteins[:6])
    reference = pool_packed(embedder.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean", 1, 1)
    split = pool_packed(emulated.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean", 1, 1)
    one_fp16 = copy.deepcopy(embedder).half().float()  # weights rounded to fp16 once: FP16-class error
    rounded = pool_packed(one_fp16.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean", 1, 1)

    def one_minus_cos(a: torch.Tensor) -> float:
        return (1 - F.cosine_similarity(a.double(), reference.double(), dim=-1)).max().item()

    assert not torch.equal(split, reference)  # the split path really ran
    assert emulated.compiling == compiled
    assert one_minus_cos(split) < max_one_minus_cos
    assert one_minus_cos(split) < one_minus_cos(rounded) / 100
    emulated.emulate_fp32("ieee")
    emulated.use_compile(False)
    assert isinstance(emulated.layer_weights()[0].qkv_weight, torch.Tensor)  # plain weights again
    assert torch.equal(
        pool_packed(emulated.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean", 1, 1), reference
    )


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compiled_layers_match_eager(embedder: ESM2Embedder, proteins: list[str]) -> None:
    """The torch.compile path (fused kernels on GPUs; inductor's C++ on CPU) computes the same layers,
    for two batch shapes without a recompile per shape."""
    compiled = copy.deepcopy(embedder)
    assert compiled.use_compile(True) and compiled.compiling
    for batch in (proteins[:5], proteins[5:8]):
        tokens, positions, cu, max_len = pack(embedder.codec, batch)
        eager = embedder.forward_packed(tokens, positions, cu, max_len, -1)
        fused = compiled.forward_packed(tokens, positions, cu, max_len, -1)
        assert fused.shape == eager.shape
        assert (fused - eager).abs().max().item() < 1e-4
    assert compiled.compiling  # no fallback happened


def test_compiled_layers_keep_every_size_but_the_tokens_static(embedder: ESM2Embedder, proteins: list[str]) -> None:
    """One graph per layer part for every batch size, with only the token dimension symbolic: symbolic
    weight sizes (torch.compile's dynamic=True) made inductor's fused kernels several times slower."""
    graphs: list[list[tuple]] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        values = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
        graphs.append([tuple(v.shape) for v in values if isinstance(v, torch.Tensor)])
        return gm.forward

    model = copy.deepcopy(embedder)
    torch._dynamo.reset()
    model.use_compile(True, backend=recording_backend)
    outputs = []
    for batch in (proteins[:5], proteins[5:8], proteins[:2]):
        tokens, positions, cu, max_len = pack(embedder.codec, batch)
        outputs.append(model.forward_packed(tokens, positions, cu, max_len, -1))
        assert torch.allclose(outputs[-1], embedder.forward_packed(tokens, positions, cu, max_len, -1), atol=1e-5)
    assert model.compiling and len(graphs) == 3  # first inputs, middle and last output part, compiled once each
    dim = model.info.embed_dim
    for shapes in graphs:
        symbolic = [shape for shape in shapes if any(isinstance(size, torch.SymInt) for size in shape)]
        assert symbolic, "the token dimension must be symbolic"
        for shape in symbolic:  # only dim 0 (tokens) is symbolic, and it is the same symbol everywhere
            assert all(isinstance(size, int) for size in shape[1:]), shape
            assert str(shape[0]) == str(symbolic[0][0])
        assert (dim,) in shapes  # LayerNorm weights and biases: static sizes


def test_compile_failure_falls_back_to_eager(
    embedder: ESM2Embedder, proteins: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    model = copy.deepcopy(embedder)

    def broken_compile(*args: object) -> torch.Tensor:
        raise RuntimeError("inductor: no kernel for you")

    model.compiled = (broken_compile, broken_compile, broken_compile)
    tokens, positions, cu, max_len = pack(model.codec, proteins[:3])
    with caplog.at_level("WARNING", logger="runner"):
        out = model.forward_packed(tokens, positions, cu, max_len, -1)
    assert torch.equal(out, embedder.forward_packed(tokens, positions, cu, max_len, -1))
    assert not model.compiling
    assert "torch.compile failed" in caplog.text and "no kernel for you" in caplog.text
    # an error of the inputs is not blamed on compile: it propagates from the eager rerun
    model.compiled = (broken_compile, broken_compile, broken_compile)
    with pytest.raises(IndexError):
        model.forward_packed(tokens.clamp(max=10_000) + 10_000, positions, cu, max_len, -1)


def test_overflow_checkpoint_is_non_finite_only_for_its_residue(overflow_esm2_path: Path) -> None:
    model = load_esm2(str(overflow_esm2_path))
    seqs = ["MKTAYIAKQRQISFVK", "MKTAYWAKQRQ", "GGSALLQAPE"]  # only the second contains W
    tokens, positions, cu, max_len = pack(model.codec, seqs)
    hidden = model.forward_packed(tokens, positions, cu, max_len, -1)
    pooled = pool_packed(hidden, cu, "mean", 1, 1)
    assert torch.isfinite(pooled).all(dim=1).tolist() == [True, False, True]


def test_layer_out_of_range(embedder: ESM2Embedder) -> None:
    tokens, positions, cu, max_len = pack(embedder.codec, ["MKT"])
    for bad in (3, -4, 100):
        with pytest.raises(RunnerError, match="out of range"):
            embedder.forward_packed(tokens, positions, cu, max_len, bad)


def test_select_attention_on_cpu(embedder: ESM2Embedder) -> None:
    assert embedder.select_attention(torch.device("cpu")) == "exact"
    assert embedder.attention_backend == "exact"


# --- loading -----------------------------------------------------------------------------------------


def test_loads_without_contact_regression(
    tmp_path: Path, tiny_esm2_script: ModuleType, embedder: ESM2Embedder
) -> None:
    path = tiny_esm2_script.make_esm2(tmp_path / "noreg.pt", contact_regression=False)
    assert not (tmp_path / "noreg-contact-regression.pt").exists()
    model = load_esm2(str(path))
    tokens, positions, cu, max_len = pack(model.codec, ["MKTAYIAKQR", "GGSWLLQA"])
    torch.testing.assert_close(
        model.forward_packed(tokens, positions, cu, max_len, -1),
        embedder.forward_packed(tokens, positions, cu, max_len, -1),
    )


def _rewrite_inv_freq(src: Path, dst: Path, scale_of_layer: dict[int, float]) -> Path:
    """A copy of fair-esm checkpoint `src` whose layer i stores rotary inv_freq scaled by scale_of_layer[i]."""
    data = load_fair_esm_checkpoint(src)
    for name, value in data["model"].items():
        if name.endswith("rot_emb.inv_freq"):
            layer = int(name.split(".layers.")[1].split(".")[0])
            data["model"][name] = value * scale_of_layer.get(layer, 1.0)
    torch.save(data, dst)
    shutil.copy(checkpoints.regression_path(src), checkpoints.regression_path(dst))  # fair-esm's loader wants it
    return dst


def test_rotary_frequencies_come_from_the_checkpoint(
    tmp_path: Path, tiny_esm2_path: Path, embedder: ESM2Embedder, proteins: list[str]
) -> None:
    # Frequencies unlike fair-esm's formula (as released files may hold them rounded): the packed forward must
    # use the stored ones, as fair-esm's own module does.
    # (The esm2_ prefix: fair-esm's loader picks its checkpoint version by the file name.)
    path = _rewrite_inv_freq(tiny_esm2_path, tmp_path / "esm2_freq.pt", {0: 1.5, 1: 1.5})
    model = load_esm2(str(path))
    torch.testing.assert_close(model.rotary_inv_freq, embedder.rotary_inv_freq * 1.5)
    reference, _ = load_fair_esm(path)
    tokens, positions, cu, max_len = pack(model.codec, proteins[:4])
    hidden = model.forward_packed(tokens, positions, cu, max_len, -1)  # [T, D]
    ref = unpack_reference(*fair_esm_padded(reference.eval(), proteins[:4], model.num_layers))
    assert (hidden - ref).abs().max().item() < 1e-4
    default = embedder.forward_packed(tokens, positions, cu, max_len, -1)  # the unscaled table
    assert (hidden - default).abs().max().item() > 1e-2

    uneven = _rewrite_inv_freq(tiny_esm2_path, tmp_path / "esm2_uneven.pt", {1: 1.5})
    with pytest.raises(CheckpointError, match="inv_freq differs between layer 0 and layer"):
        load_esm2(str(uneven))


def test_model_info_and_parameters(
    embedder: ESM2Embedder, fair_esm_model: torch.nn.Module, tiny_esm2_path: Path
) -> None:
    info = embedder.info
    assert (info.family, info.embed_dim, info.num_layers) == ("esm2", 64, 2)
    assert info.parameters == sum(p.numel() for p in fair_esm_model.parameters())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in embedder.parameters())
    file_info = esm2_info(str(tiny_esm2_path), compute_sha256=True)
    assert file_info.parameters == info.parameters and file_info.embed_dim == 64
    assert file_info.checkpoint_sha256 == hashlib.sha256(tiny_esm2_path.read_bytes()).hexdigest()
    named = esm2_info("esm2_t33_650M_UR50D")
    assert (named.embed_dim, named.num_layers) == (1280, 33)
    assert 640e6 < named.parameters < 660e6


def test_sha256_file_streams(tmp_path: Path) -> None:
    f = tmp_path / "blob"
    data = np.random.default_rng(0).bytes(3 * 1024 + 7)
    f.write_bytes(data)
    assert sha256_file(f, chunk_bytes=1024) == hashlib.sha256(data).hexdigest()


def _rewrite(src: Path, dst: Path, edit) -> Path:  # noqa: ANN001 - edit: callable(dict) -> None
    data = load_fair_esm_checkpoint(src)
    edit(data)
    torch.save(data, dst)
    shutil.copy(checkpoints.regression_path(src), checkpoints.regression_path(dst))  # fair-esm's loader wants it
    return dst


def test_missing_file_is_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_esm2(str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match="not found"):
        esm2_codec(str(tmp_path / "nope.pt"))


def test_garbage_file_is_checkpoint_error(tmp_path: Path) -> None:
    text = tmp_path / "text.pt"
    text.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_esm2(str(text))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_esm2(str(truncated))


def test_disallowed_class_is_named(tmp_path: Path, tiny_esm2_path: Path) -> None:
    path = _rewrite(tiny_esm2_path, tmp_path / "evil.pt", lambda d: d.update(extra=fractions.Fraction(1, 3)))
    with pytest.raises(CheckpointError, match=r"fractions\.Fraction"):
        load_esm2(str(path))


def test_missing_weights_are_listed(tmp_path: Path, tiny_esm2_path: Path) -> None:
    def drop(d: dict) -> None:
        for name in [k for k in d["model"] if ".layers.1." in k]:
            del d["model"][name]

    path = _rewrite(tiny_esm2_path, tmp_path / "holey.pt", drop)
    with pytest.raises(
        CheckpointError, match=r"lacks \d+ weight\(s\).*layers\.1\.fc1\.bias.*and \d+ more"
    ) as e:
        load_esm2(str(path))
    assert "\n" not in str(e.value)


def test_unexpected_and_misshapen_weights(tmp_path: Path, tiny_esm2_path: Path) -> None:
    extra = _rewrite(
        tiny_esm2_path,
        tmp_path / "extra.pt",
        lambda d: d["model"].update({"encoder.classifier.weight": torch.zeros(2)}),
    )
    with pytest.raises(CheckpointError, match="classifier.weight"):
        load_esm2(str(extra))

    def widen(d: dict) -> None:
        d["cfg"]["model"].encoder_embed_dim = 128
        d["cfg"]["model"].encoder_attention_heads = 8

    wrong = _rewrite(tiny_esm2_path, tmp_path / "wrong.pt", widen)
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_esm2(str(wrong))


def test_wrong_structure(tmp_path: Path, tiny_esm2_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "nomodel.pt")
    with pytest.raises(CheckpointError, match="no 'model' state dict"):
        load_esm2(str(tmp_path / "nomodel.pt"))
    esm1 = _rewrite(tiny_esm2_path, tmp_path / "esm1.pt", lambda d: d.update(args=d.pop("cfg")["model"]))
    with pytest.raises(CheckpointError, match="only ESM-2"):
        load_esm2(str(esm1))
    nocfg = _rewrite(
        tiny_esm2_path, tmp_path / "nocfg.pt", lambda d: delattr(d["cfg"]["model"], "encoder_layers")
    )
    with pytest.raises(CheckpointError, match="lacks encoder_layers"):
        load_esm2(str(nocfg))


def test_unknown_model_name() -> None:
    with pytest.raises(RunnerError, match="model esm3_huge not found: use one of esm2_t6_8M_UR50D"):
        model_family("esm3_huge")
    with pytest.raises(RunnerError, match="not found"):
        load_model("esm2_t33_650M")  # close to a real name, still unknown
    with pytest.raises(RunnerError, match="not an ESM-2 model"):
        load_esm2("esm3_huge")


def test_download_offline_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    calls: list[str] = []

    def offline(url: str, dst: str, *args: object, **kwargs: object) -> None:
        calls.append(url)
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(CheckpointError, match=r"could not download esm2_t6_8M_UR50D .*local \.pt file"):
        download_esm2("esm2_t6_8M_UR50D")
    assert calls == ["https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t6_8M_UR50D.pt"]

    # Already in fair-esm's cache: nothing is downloaded for the model; a missing regression only warns.
    cached = checkpoints.hub_checkpoint_dir() / "esm2_t6_8M_UR50D.pt"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"x")
    calls.clear()
    assert download_esm2("esm2_t6_8M_UR50D") == cached
    assert calls == [
        "https://dl.fbaipublicfiles.com/fair-esm/regression/esm2_t6_8M_UR50D-contact-regression.pt"
    ]


# --- registry ----------------------------------------------------------------------------------------


def test_registry_dispatch(tmp_path: Path, tiny_esm2_path: Path) -> None:
    for name in ESM2_MODELS:
        assert model_family(name) == "esm2"
    assert model_family(str(tiny_esm2_path)) == "esm2"
    assert model_family("zhihan1996/DNABERT-S") == "dnabert"
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    with pytest.raises(RunnerError, match="has no config.json"):
        model_family(str(hf_dir))  # a directory without config.json: the missing file is named
    (hf_dir / "config.json").write_text("{}")
    assert model_family(str(hf_dir)) == "dnabert"
    assert isinstance(load_codec(str(tiny_esm2_path)), Esm2Codec)
    assert isinstance(load_model(str(tiny_esm2_path)), ESM2Embedder)


# --- codec -------------------------------------------------------------------------------------------


def test_codec_clean_validate_encode() -> None:
    codec = Esm2Codec()
    assert (
        codec.kind,
        codec.max_residues,
        codec.special_start,
        codec.special_end,
        codec.default_pooling,
    ) == (
        "protein",
        1022,
        1,
        1,
        "mean",
    )
    assert codec.clean(" mk ta\nyi*\t") == "MKTAYI"
    assert codec.clean("MK**") == "MK*"  # only one trailing stop is dropped
    assert codec.invalid_characters("MKTAYI") == ""
    assert codec.invalid_characters("MK*T-A.J1J") == "*-.1J"
    assert codec.invalid_characters("XBUZO") == ""

    import esm

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    _, _, expected = alphabet.get_batch_converter()([("a", "MKTAYIXBUZO")])
    encoded = codec.encode("MKTAYIXBUZO")
    assert encoded.dtype == np.int32
    assert encoded.tolist() == expected[0].tolist()
    with pytest.raises(RunnerError, match="cannot embed: J"):
        codec.encode("MKJ")


def test_codec_pickles() -> None:
    import pickle

    codec = pickle.loads(pickle.dumps(Esm2Codec()))
    assert codec.encode("MK").tolist()[1:-1] == Esm2Codec().encode("MK").tolist()[1:-1]


# --- GPU ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("compiled", "fused_gelu"), [(False, False), (True, False), (True, True)],
                         ids=["eager", "compiled", "compiled-fused-gelu"])
def test_gpu_fp16_packed_vs_fp32_padded(
    embedder: ESM2Embedder, fair_esm_model: torch.nn.Module, proteins: list[str], compiled: bool, fused_gelu: bool
) -> None:
    device = torch.device("cuda")
    half = copy.deepcopy(embedder).to(device=device, dtype=torch.float16)
    backend = half.select_attention(device)
    half.use_compile(compiled)
    half.fused_gelu = fused_gelu
    tokens, positions, cu, max_len = pack(half.codec, proteins)
    hidden = half.forward_packed(tokens.to(device), positions.to(device), cu.to(device), max_len, -1)
    pooled = pool_packed(hidden, cu.to(device), "mean", 1, 1).cpu()
    reps, lengths = fair_esm_padded(fair_esm_model, proteins, 2)
    pooled_ref = pool_packed(unpack_reference(reps, lengths), cu, "mean", 1, 1)
    cosine = F.cosine_similarity(pooled, pooled_ref, dim=-1)
    print(
        f"\nbackend {backend}{' fused GELU' if fused_gelu else ''}: fp16 packed vs fp32 padded over {len(proteins)} proteins: "
        f"cosine mean {cosine.mean().item():.6f} min {cosine.min().item():.6f}, "
        f"max abs diff {(pooled - pooled_ref).abs().max().item():.3e}"
    )
    assert backend in ("flash_attn", "torch_varlen")
    assert half.compiling == compiled  # no silent fallback to eager
    assert cosine.mean().item() >= 0.999
    assert cosine.min().item() >= 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_linear_tanh_gelu_is_the_tanh_gelu_of_the_product() -> None:
    """The cuBLASLt epilogue's GELU is the tanh approximation, applied before rounding to FP16: where the two
    GELUs differ most (inputs -2 to -4, outputs ~-0.01, whose FP16 rounding is ~1e-5) it follows tanh."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8192, 256, generator=generator, device="cuda").half()  # [N, K]
    weight = (torch.randn(1024, 256, generator=generator, device="cuda") / 16).half()  # [M, K]: outputs ~N(0, 1)
    bias = torch.randn(1024, generator=generator, device="cuda").half()  # [M]
    exact = F.linear(x.double(), weight.double(), bias.double())  # [N, M]
    fused = linear_tanh_gelu(x, weight, bias).double()  # [N, M]
    compiled = torch.compile(linear_tanh_gelu)(x, weight, bias).double()
    tail = (exact < -2) & (exact > -4)  # the inputs where tanh and erf GELU differ by up to 4.7e-4
    tanh_error = (fused - F.gelu(exact, approximate="tanh"))[tail].abs().max().item()
    erf_error = (fused - F.gelu(exact))[tail].abs().max().item()
    print(f"\nfused GELU on inputs -4..-2 vs float64: tanh GELU {tanh_error:.2e}, erf GELU {erf_error:.2e}")
    assert torch.equal(fused, compiled)  # inductor calls the op, it does not decompose it
    assert tanh_error < 1e-4 < 3e-4 < erf_error


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("math", "compiled", "max_rel", "max_one_minus_cos"),
    [("tf32x3", False, 1e-5, 1e-9), ("fp16x3", False, 1e-5, 1e-9), ("fp16x3", True, 1e-5, 1e-9),
     ("bf16x3", True, 1e-3, 1e-7)],
)
def test_gpu_shadow_math_matches_ieee_fp32(
    embedder: ESM2Embedder, proteins: list[str], math: str, compiled: bool, max_rel: float, max_one_minus_cos: float
) -> None:
    """The shadow's tensor-core FP32 emulations give IEEE-FP32 embeddings (bf16x3: nearly), far closer to
    IEEE than the FP16 path they check."""
    device = torch.device("cuda")
    ieee, emulated, half = shadow_math_models(embedder, math, compiled, device)
    tokens, positions, cu, max_len = pack(embedder.codec, proteins, device)
    a = pool_packed(ieee.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean", 1, 1)
    b = pool_packed(emulated.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean", 1, 1)
    c = pool_packed(half.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean", 1, 1)
    rel = ((a - b).abs().max() / a.abs().max()).item()
    cosine = F.cosine_similarity(a.double(), b.double(), dim=-1)
    fp16_gap = (1 - F.cosine_similarity(a.double(), c.double(), dim=-1)).max().item()
    print(f"\n{math}{' compiled' if compiled else ''} vs IEEE FP32: max rel diff {rel:.2e}, 1 - cosine max "
          f"{(1 - cosine).max().item():.2e} (FP16 path: {fp16_gap:.2e})")
    assert emulated.compiling == compiled  # no silent fallback to eager
    assert rel < max_rel and (1 - cosine).max().item() < max_one_minus_cos
    assert (1 - cosine).max().item() < fp16_gap / 100
