"""ESM C: packed forward vs transformers' EsmcModel, both checkpoint layouts and their errors, hub names, the codec."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from conftest import pack, shadow_math_models

from runner.errors import CheckpointError, RunnerError
from runner.kernels.fp16x3 import SplitWeight
from runner.models import esmc_checkpoints
from runner.models.esmc import ESMC_ARCHITECTURES, EsmcCodec, EsmcEmbedder
from runner.models.esmc_checkpoints import esmc_info, load_esmc
from runner.models.registry import load_codec, model_family
from runner.stages.pooling import pool_packed


def transformers_hidden(directory: Path, seqs: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """transformers' own tokenizer and padded EsmcModel forward in FP32: per layer the [T, D] hidden states of
    the real tokens, packed like ours (hidden_states[L]; the last is last_hidden_state), and the token ids."""
    from transformers import AutoTokenizer, EsmcModel

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = EsmcModel.from_pretrained(directory, attn_implementation="sdpa").float().eval()
    batch = tokenizer(seqs, return_tensors="pt", padding=True)  # right-padded: positions 0.. per sequence
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    keep = batch["attention_mask"].bool()  # [B, L]
    assert torch.equal(out.hidden_states[-1], out.last_hidden_state)
    return [h[keep] for h in out.hidden_states], batch["input_ids"][keep]


@pytest.fixture(scope="module")
def proteins(some_proteins: list[tuple[str, str]]) -> list[str]:
    return [seq for _, seq in some_proteins]


@pytest.fixture(scope="module")
def embedder(tiny_esmc: tuple[Path, Path]) -> EsmcEmbedder:
    return load_esmc(str(tiny_esmc[0]))


@pytest.fixture(scope="module")
def reference(tiny_esmc: tuple[Path, Path], proteins: list[str]) -> tuple[list[torch.Tensor], torch.Tensor]:
    return transformers_hidden(tiny_esmc[0], proteins)


# --- numerics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [0, 1, 2, -1])
def test_packed_matches_transformers_fp32(
    embedder: EsmcEmbedder, reference: tuple[list[torch.Tensor], torch.Tensor], proteins: list[str], layer: int
) -> None:
    """Every layer of the packed forward, per token and mean-pooled over residues, against transformers' padded
    FP32 EsmcModel on the 15 real proteins (71-935 residues), tokenized by transformers' own EsmcTokenizer."""
    hidden_states, reference_ids = reference
    tokens, positions, cu, max_len = pack(embedder.codec, proteins)
    assert torch.equal(tokens, reference_ids)  # the codec makes transformers' token ids
    ours = embedder.forward_packed(tokens, positions, cu, max_len, layer)  # [T, D]
    theirs = hidden_states[layer]  # [T, D]
    per_token = (ours - theirs).abs().max().item()
    cosine = F.cosine_similarity(pool_packed(ours, cu, "mean", 1, 1), pool_packed(theirs, cu, "mean", 1, 1), dim=-1)
    print(f"\nlayer {layer}: per-token max abs diff {per_token:.2e} (values up to {theirs.abs().max().item():.1f}), "
          f"mean-pooled cosine min {cosine.min().item():.8f}")
    assert per_token < 1e-4
    assert cosine.min().item() >= 0.9999


def test_several_layers_from_one_forward(embedder: EsmcEmbedder, proteins: list[str]) -> None:
    """forward_layers keeps the residual stream of the layers asked for as it passes: the same tensors as one
    forward per layer, in the order asked."""
    tokens, positions, cu, max_len = pack(embedder.codec, proteins[:4])
    together = embedder.forward_layers(tokens, positions, cu, max_len, [1, 0, -1])
    alone = [embedder.forward_packed(tokens, positions, cu, max_len, layer) for layer in (1, 0, 2)]
    assert all(torch.equal(a, b) for a, b in zip(together, alone, strict=True))


def test_original_pth_gives_the_same_vectors(tiny_esmc: tuple[Path, Path], embedder: EsmcEmbedder,
                                             proteins: list[str]) -> None:
    """The same weights in EvolutionaryScale's layout (written by the script's own renaming) load to the same model."""
    original = load_esmc(str(tiny_esmc[1]))
    assert original.arch == embedder.arch
    tokens, positions, cu, max_len = pack(embedder.codec, proteins[:5])
    for layer in (1, -1):
        assert torch.equal(original.forward_packed(tokens, positions, cu, max_len, layer),
                           embedder.forward_packed(tokens, positions, cu, max_len, layer))


def test_chain_break_is_one_token_and_attention_stays_in_the_sequence(embedder: EsmcEmbedder) -> None:
    """`|` encodes as transformers' chain-break id 31 and runs as a token of its sequence; packing a second
    sequence beside it changes nothing (no attention across sequences)."""
    from transformers import EsmcTokenizer

    seq = "MKTAYIAKQR|QISFVKSHFSRQ"
    assert embedder.codec.encode(seq).tolist() == EsmcTokenizer()(seq)["input_ids"]
    alone = pack(embedder.codec, [seq])
    paired = pack(embedder.codec, [seq, "MSKGEELFTG"])
    one = embedder.forward_packed(*alone, -1)
    two = embedder.forward_packed(*paired, -1)[: one.shape[0]]
    assert (one - two).abs().max().item() < 1e-5


def test_half_precision_and_fp32_layernorm(embedder: EsmcEmbedder, proteins: list[str]) -> None:
    """bf16 (what CPUs have of half precision) stays close to FP32; fp32_layernorm changes the bf16 numerics."""
    tokens, positions, cu, max_len = pack(embedder.codec, proteins[:4])
    fp32 = pool_packed(embedder.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean", 1, 1)
    half = copy.deepcopy(embedder).to(torch.bfloat16)
    plain = pool_packed(half.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean", 1, 1)
    half.fp32_layernorm = True
    fp32_ln = pool_packed(half.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean", 1, 1)
    assert F.cosine_similarity(plain, fp32, dim=-1).min().item() > 0.99
    assert F.cosine_similarity(fp32_ln, fp32, dim=-1).min().item() > 0.99
    assert not torch.equal(plain, fp32_ln)


@pytest.mark.parametrize(("math", "max_one_minus_cos"), [("fp16x3", 1e-10), ("bf16x3", 1e-7)])
def test_split_math_forward_matches_fp32(
    embedder: EsmcEmbedder, proteins: list[str], math: str, max_one_minus_cos: float
) -> None:
    """The shadow's split projections (pre-split weights per block) through the whole ESM C forward: FP32-class
    for fp16x3 (on CPU the half GEMM's arithmetic runs in float32, see tests/test_fp16x3.py)."""
    emulated = copy.deepcopy(embedder)
    emulated.emulate_fp32(math)
    weights = emulated.layer_weights()
    assert all(isinstance(w.qkv_weight, SplitWeight) and isinstance(w.down_weight, SplitWeight) for w in weights)
    tokens, positions, cu, max_len = pack(embedder.codec, proteins[:6])
    reference = pool_packed(embedder.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean", 1, 1)
    split = pool_packed(emulated.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean", 1, 1)
    rounded = pool_packed(copy.deepcopy(embedder).half().float().forward_packed(tokens, positions, cu, max_len, -1),
                          cu, "mean", 1, 1)  # weights rounded to fp16 once: FP16-class error

    def one_minus_cos(a: torch.Tensor) -> float:
        return (1 - F.cosine_similarity(a.double(), reference.double(), dim=-1)).max().item()

    assert not torch.equal(split, reference)  # the split path really ran
    assert one_minus_cos(split) < max_one_minus_cos
    assert one_minus_cos(split) < one_minus_cos(rounded) / 100
    emulated.emulate_fp32("ieee")
    assert isinstance(emulated.layer_weights()[0].qkv_weight, torch.Tensor)  # plain weights again


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_compiled_blocks_match_eager(embedder: EsmcEmbedder, proteins: list[str]) -> None:
    """The torch.compile path computes the same blocks, for two batch shapes, without falling back to eager."""
    compiled = copy.deepcopy(embedder)
    assert compiled.use_compile(True)
    for batch in (proteins[:4], proteins[4:6]):
        tokens, positions, cu, max_len = pack(embedder.codec, batch)
        eager = embedder.forward_packed(tokens, positions, cu, max_len, -1)
        fused = compiled.forward_packed(tokens, positions, cu, max_len, -1)
        assert (fused - eager).abs().max().item() < 1e-4
    assert compiled.compiling


def test_layer_out_of_range_and_attention_on_cpu(embedder: EsmcEmbedder) -> None:
    tokens, positions, cu, max_len = pack(embedder.codec, ["MKV"])
    with pytest.raises(RunnerError, match="0 .*to 2"):
        embedder.forward_packed(tokens, positions, cu, max_len, 3)
    assert embedder.select_attention(torch.device("cpu")) == "exact"


# --- the codec ---------------------------------------------------------------------------------------


def test_codec_clean_validate_encode(proteins: list[str]) -> None:
    from transformers import EsmcTokenizer

    codec = EsmcCodec()
    assert codec.max_residues == 2046 and codec.default_pooling == "mean"
    assert codec.clean(" mkt ay\n*") == "MKTAY"
    assert codec.invalid_characters("MKT-A.J|") == "-.J"  # alignment symbols are not residues; | is a chain break
    with pytest.raises(RunnerError, match="ESM C cannot embed: J"):
        codec.encode("MKJ")
    tokenizer = EsmcTokenizer()
    for seq in [*proteins, "XBUZO"]:
        assert codec.encode(seq).tolist() == tokenizer(seq)["input_ids"]


# --- loading and its errors --------------------------------------------------------------------------


def test_registry_and_info(tiny_esmc: tuple[Path, Path], tiny_esm2_path: Path, tiny_dnabert_dir: Path) -> None:
    directory, pth = tiny_esmc
    assert model_family(str(directory)) == model_family(str(pth)) == "esmc"
    assert model_family(str(tiny_esm2_path)) == "esm2" and model_family(str(tiny_dnabert_dir)) == "dnabert"
    assert isinstance(load_codec(str(directory)), EsmcCodec)
    info = esmc_info(str(pth), compute_sha256=True)
    assert (info.family, info.num_layers, info.embed_dim, info.checkpoint) == ("esmc", 2, 128, str(pth.resolve()))
    assert info.parameters == sum(p.numel() for p in load_esmc(str(pth)).parameters())
    assert len(info.checkpoint_sha256) == 64 and esmc_info(str(directory)).checkpoint_sha256 == ""


def test_base_model_directory_and_hub_snapshot_layout(tmp_path: Path, tiny_esmc_script: ModuleType,
                                                      tiny_esmc: tuple[Path, Path], embedder: EsmcEmbedder) -> None:
    """A bare EsmcModel directory (no "esmc." prefix, no head) and an EvolutionaryScale-like snapshot (config.json
    "{}", the .pth under data/weights/) are found by content and load the same weights."""
    base, _ = tiny_esmc_script.make_esmc(tmp_path / "base", base_model=True)
    snapshot = tmp_path / "snapshot"
    (snapshot / "data" / "weights").mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    shutil.copy(tiny_esmc[1], snapshot / "data" / "weights" / "esmc_tiny_v0.pth")
    tokens, positions, cu, max_len = pack(embedder.codec, ["MKTAYIAKQRQISFVKSHF"])
    expected = embedder.forward_packed(tokens, positions, cu, max_len, -1)
    assert model_family(str(snapshot)) == "esmc"
    assert torch.equal(load_esmc(str(snapshot)).forward_packed(tokens, positions, cu, max_len, -1), expected)
    assert model_family(str(base)) == "esmc"
    assert load_esmc(str(base)).forward_packed(tokens, positions, cu, max_len, -1).shape == expected.shape


def test_missing_unexpected_and_misshapen_weights_in_one_error(tmp_path: Path, tiny_esmc: tuple[Path, Path]) -> None:
    state = torch.load(tiny_esmc[1], weights_only=True)
    del state["transformer.blocks.1.attn.q_ln.weight"]
    state["transformer.blocks.0.attn.extra.weight"] = torch.zeros(3)
    state["transformer.blocks.1.attn.out_proj.weight"] = state["transformer.blocks.1.attn.out_proj.weight"][:, :-1]
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(CheckpointError) as caught:
        load_esmc(str(broken))
    message = str(caught.value)
    assert "\n" not in message
    for needed in ("1 missing: transformer.blocks.1.attn.q_ln.weight",
                   "1 unexpected: transformer.blocks.0.attn.extra.weight",
                   "1 wrongly shaped: transformer.blocks.1.attn.out_proj.weight (128, 127) (expected (128, 128))"):
        assert needed in message, message


def test_transformers_directory_errors(tmp_path: Path, tiny_esmc: tuple[Path, Path]) -> None:
    from safetensors.torch import load_file, save_file

    directory = tmp_path / "dir"
    shutil.copytree(tiny_esmc[0], directory)
    weights = load_file(directory / "model.safetensors")
    del weights["esmc.layers.1.self_attn.k_proj.weight"]
    save_file(weights, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing: layers\.1\.self_attn\.k_proj\.weight"):
        load_esmc(str(directory))
    vocab = json.loads((directory / "tokenizer.json").read_text())
    vocab["model"]["vocab"]["A"], vocab["model"]["vocab"]["L"] = 4, 5  # two residues swapped
    (directory / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(CheckpointError, match="not ESM C's tokenizer"):
        load_codec(str(directory))
    config = json.loads((tiny_esmc[0] / "config.json").read_text())
    (directory / "tokenizer.json").unlink()
    (directory / "config.json").write_text(json.dumps({**config, "hidden_act": "gelu"}))
    with pytest.raises(CheckpointError, match="hidden_act 'gelu'"):
        load_esmc(str(directory))


def test_not_esm_c_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2)}, other)
    assert not esmc_checkpoints.is_esmc(str(junk)) and not esmc_checkpoints.is_esmc(str(other))
    with pytest.raises(CheckpointError, match="does not hold ESM C weights"):
        load_esmc(str(other))
    with pytest.raises(CheckpointError, match="not found"):
        load_esmc(str(tmp_path / "missing.pth"))


# --- hub names ---------------------------------------------------------------------------------------


def test_hub_names_download_what_they_name(tmp_path: Path, tiny_esmc: tuple[Path, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each name fetches its own repository's files through huggingface_hub (faked here: no internet); the short
    names are EvolutionaryScale's 2024-12 .pth, whose tensors must have the published shape."""
    import huggingface_hub

    calls: list[tuple[str, tuple[str, ...], bool]] = []
    snapshot = tmp_path / "snapshot"
    (snapshot / "data" / "weights").mkdir(parents=True)
    shutil.copy(tiny_esmc[1], snapshot / "data" / "weights" / "esmc_300m_2024_12_v0.pth")

    def fake_snapshot_download(repo: str, allow_patterns: list[str], local_files_only: bool) -> str:
        calls.append((repo, tuple(allow_patterns), local_files_only))
        return str(tiny_esmc[0] if repo.startswith("biohub/") else snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_esmc("biohub/ESMC-300M")
    assert model.info.name == "biohub/ESMC-300M" and model.info.checkpoint == str(tiny_esmc[0].resolve())
    assert calls[-1][0] == "biohub/ESMC-300M" and "model.safetensors" in calls[-1][1] and not calls[-1][2]
    with pytest.raises(CheckpointError, match="published shape of esmc_300m"):
        load_esmc("esmc_300m")
    assert calls[-1][:2] == ("EvolutionaryScale/esmc-300m-2024-12", ("data/weights/esmc_300m_2024_12_v0.pth",))


def test_hub_names_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not downloaded and no network: the manifest still knows the published shape; loading says what to do."""
    import huggingface_hub

    def unreachable(repo: str, allow_patterns: list[str], local_files_only: bool) -> str:
        raise OSError(f"cannot reach the hub for {repo}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    for name, arch in (("esmc_600m", "esmc_600m"), ("biohub/ESMC-300M", "esmc_300m")):
        info = esmc_info(name)
        assert model_family(name) == "esmc" and info.checkpoint == ""
        assert (info.num_layers, info.embed_dim) == (ESMC_ARCHITECTURES[arch].layers, ESMC_ARCHITECTURES[arch].dim)
    assert esmc_info("esmc_300m").parameters == 332_011_200  # embedding + 30 blocks + final norm, no LM head
    with pytest.raises(CheckpointError, match="hf auth login.*--model"):
        load_esmc("EvolutionaryScale/esmc-600m-2024-12")


# --- GPU (pytest -m gpu on the GPU machine) ----------------------------------------------------------


def random_esmc_pair(arch_name: str, tiny_esmc_script: ModuleType) -> tuple[torch.nn.Module, EsmcEmbedder]:
    """transformers' EsmcModel with random weights of a released shape (the tiny script's scales), FP32 on the GPU,
    and runner's EsmcEmbedder holding the same tensors, mapped through the name table (transformers layout)."""
    from transformers import EsmcConfig, EsmcModel

    arch = ESMC_ARCHITECTURES[arch_name]
    config = EsmcConfig(vocab_size=64, hidden_size=arch.dim, intermediate_size=arch.ffn_dim,
                        num_hidden_layers=arch.layers, num_attention_heads=arch.heads)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        reference = EsmcModel(config).eval()
    reference.load_state_dict(tiny_esmc_script._random_state(reference, torch.Generator().manual_seed(0)))
    state = esmc_checkpoints.runner_state(reference.state_dict(), "transformers", arch, "memory")
    info = esmc_checkpoints._meta_model(arch).info
    model = esmc_checkpoints._meta_model(arch, info)
    model.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True, assign=True)
    return reference, model.eval().requires_grad_(False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", ["tiny", "esmc_300m", "esmc_600m"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gpu_fp16_packed_vs_transformers_fp32(
    shape: str, compiled: bool, embedder: EsmcEmbedder, reference: tuple[list[torch.Tensor], torch.Tensor],
    tiny_esmc: tuple[Path, Path], tiny_esmc_script: ModuleType, proteins: list[str]
) -> None:
    """runner's packed FP16 forward (varlen attention, compiled or eager) against transformers' EsmcModel FP32
    (padded, SDPA) on the 15 real proteins: the tiny checkpoint, and random weights of the 300M / 600M shapes."""
    device = torch.device("cuda")
    tokens, positions, cu, max_len = pack(embedder.codec, proteins)
    if shape == "tiny":
        half = copy.deepcopy(embedder)
        expected = reference[0][-1]  # [T, D] FP32 on the CPU
    else:
        fp32, half = random_esmc_pair(shape, tiny_esmc_script)
        hidden = []
        with torch.no_grad():  # one sequence at a time: no padding in the reference
            for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
                hidden.append(fp32(tokens[start:end][None].to(device)).last_hidden_state[0].cpu())
        expected = torch.cat(hidden)  # [T, D]
        del fp32
    half = half.to(device, torch.float16)
    backend = half.select_attention(device)
    half.use_compile(compiled)
    out = half.forward_packed(tokens.to(device), positions.to(device), cu.to(device), max_len, -1).float().cpu()
    pooled, pooled_ref = pool_packed(out, cu, "mean", 1, 1), pool_packed(expected, cu, "mean", 1, 1)
    cosine = F.cosine_similarity(pooled, pooled_ref, dim=-1)
    token_cos = F.cosine_similarity(out, expected, dim=-1)
    print(f"\n{shape} {backend}{' compiled' if compiled else ''}: fp16 packed vs transformers fp32 over "
          f"{len(proteins)} proteins: mean-pooled cosine mean {cosine.mean().item():.6f} min {cosine.min().item():.6f}; "
          f"per token cosine min {token_cos.min().item():.5f}, max abs diff {(out - expected).abs().max().item():.3e} "
          f"(values up to {expected.abs().max().item():.1f})")
    assert backend in ("flash_attn", "torch_varlen")
    assert half.compiling == compiled  # no silent fallback to eager
    assert torch.isfinite(out).all()
    assert cosine.mean().item() >= 0.999 and cosine.min().item() >= 0.99


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("math", "compiled"), [("fp16x3", False), ("fp16x3", True), ("tf32x3", False)])
def test_gpu_shadow_math_matches_ieee_fp32(embedder: EsmcEmbedder, proteins: list[str], math: str,
                                           compiled: bool) -> None:
    """The shadow's FP32 emulations (split projections, and the fp16x3 attention kernel where it applies) give
    IEEE-FP32 ESM C embeddings, far closer to IEEE than the FP16 path they check."""
    device = torch.device("cuda")
    tokens, positions, cu, max_len = pack(embedder.codec, proteins, device)

    def pooled(model: EsmcEmbedder) -> torch.Tensor:
        return pool_packed(model.forward_packed(tokens, positions, cu, max_len, -1), cu, "mean", 1, 1).double()

    ieee, emulated, half = shadow_math_models(embedder, math, compiled, device)
    a, b, c = pooled(ieee), pooled(emulated), pooled(half)
    gap = (1 - F.cosine_similarity(a, b, dim=-1)).max().item()
    fp16_gap = (1 - F.cosine_similarity(a, c, dim=-1)).max().item()
    print(f"\n{math}{' compiled' if compiled else ''} ({emulated.attention_backend} attention) vs IEEE FP32: "
          f"1 - cosine max {gap:.2e} (FP16 path: {fp16_gap:.2e})")
    assert emulated.compiling == compiled
    assert gap < 1e-9 and gap < fp16_gap / 100
