"""ESM C weights from the formats people have, into `runner.models.esmc.EsmcEmbedder`; no `esm` package needed.

Two layouts hold the same weights under different names (`WEIGHT_NAMES` maps both, in one table):
- "original": EvolutionaryScale's `esm` package state dict, e.g. `data/weights/esmc_300m_2024_12_v0.pth` of the
  hub repo EvolutionaryScale/esmc-300m-2024-12 (`embed.weight`, `transformer.blocks.0.attn.layernorm_qkv.1.weight`,
  ...; q|k|v and gate|up already fused). It carries no config: the shape is read from the tensors.
- "transformers": a transformers `EsmcModel`/`EsmcForMaskedLM` directory (`config.json` with `model_type: esmc`,
  `model.safetensors` or `pytorch_model.bin`, the tokenizer), e.g. the hub's biohub/ESMC-300M
  (`embed_tokens.weight`, `layers.0.self_attn.q_proj.weight`, ...).

Formats are told apart by content (the config's `model_type`, the state dict's names), never by file names.
Every file is read with `torch.load(weights_only=True)` or safetensors, so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runner.errors import CheckpointError, first_line
from runner.models.base import ModelInfo
from runner.models.checkpoints import name_list, sha256_file
from runner.models.esmc import (
    ESMC_ARCHITECTURES,
    ESMC_VOCAB,
    HEAD_DIM,
    EsmcArchitecture,
    EsmcCodec,
    EsmcEmbedder,
)

logger = logging.getLogger(__name__)  # a child of "runner": actor-side, see runner.driver.console

# One row per weight: runner's name (EsmcEmbedder's state dict), the original `esm` name and the transformers
# name(s). Block rows are relative to the block prefixes below. Several transformers names are concatenated
# along dim 0 into runner's one tensor (q|k|v, gate|up: the original stores them fused in that order).
WEIGHT_NAMES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("embed.weight", "embed.weight", ("embed_tokens.weight",)),
    ("final_norm.weight", "transformer.norm.weight", ("norm.weight",)),
)
BLOCK_WEIGHT_NAMES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("attn_norm.weight", "attn.layernorm_qkv.0.weight", ("input_layernorm.weight",)),
    ("attn_norm.bias", "attn.layernorm_qkv.0.bias", ("input_layernorm.bias",)),
    ("qkv.weight", "attn.layernorm_qkv.1.weight",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    ("q_norm.weight", "attn.q_ln.weight", ("self_attn.q_norm.weight",)),
    ("k_norm.weight", "attn.k_ln.weight", ("self_attn.k_norm.weight",)),
    ("out.weight", "attn.out_proj.weight", ("self_attn.o_proj.weight",)),
    ("ffn_norm.weight", "ffn.0.weight", ("post_attention_layernorm.weight",)),
    ("ffn_norm.bias", "ffn.0.bias", ("post_attention_layernorm.bias",)),
    ("gate_up.weight", "ffn.1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    ("down.weight", "ffn.3.weight", ("mlp.down_proj.weight",)),
)
BLOCK_PREFIX = {"runner": "layers.{i}.", "original": "transformer.blocks.{i}.", "transformers": "layers.{i}."}
# Entries that are not part of the encoder, dropped on purpose: the masked-LM heads (original `sequence_head`,
# transformers `lm_head`) and the rotary buffers some exports include (recomputed here in float32).
_IGNORED = re.compile(r"^(sequence_head\.|lm_head\.)|(^|\.)(inv_freq|original_inv_freq)$")
# transformers' EsmcForMaskedLM / EsmcForSequenceClassification keep the encoder under this prefix.
_TRANSFORMERS_PREFIX = "esmc."

_CONFIG_FILE = "config.json"
_TOKENIZER_FILE = "tokenizer.json"
_SAFETENSORS_FILE = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN_FILE = "pytorch_model.bin"
_STATE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class EsmcSource:
    """Where an ESM C model's weights are, in which layout, and its shape."""

    layout: str  # "original" (a .pth state dict) or "transformers" (a model directory)
    weights: tuple[Path, ...]  # the file(s) holding the tensors
    arch: EsmcArchitecture
    directory: Path | None = None  # the transformers directory (None for a state-dict file)


# ---------------------------------------------------------------------------------------------------
# Reading files


def _torch_state(path: Path, mmap: bool = True) -> dict[str, Any]:
    """A torch-saved state dict, read safely (tensors and plain containers only); memory-mapped when the file is
    in torch's zip format, so reading the names of a large file costs little."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds Python objects other than tensors ({first_line(e)}): an ESM C checkpoint is a plain "
            f"state dict; re-save it with torch.save(model.state_dict(), path)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, IndexError, KeyError, TypeError,
            AttributeError) as e:  # what torch's loaders raise on truncated or foreign bytes
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({first_line(e)}): re-download it") from None
    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping) and "embed.weight" not in data:
        data = data["model"]  # a training checkpoint {"model": state dict, ...}
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a state dict of ESM C weights")
    return dict(data)


def _safetensors_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types on foreign or truncated bytes
        raise CheckpointError(f"{path} is not a readable safetensors file ({first_line(e)}): re-download it") from None


def _read_state(paths: tuple[Path, ...]) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for path in paths:
        state.update(_safetensors_state(path) if path.suffix == ".safetensors" else _torch_state(path))
    return state


def _state_names(path: Path) -> list[str]:
    """The entry names of a state-dict file, cheaply (safetensors header, or a memory-mapped torch file)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(_torch_state(path))


def state_layout(names: list[str] | set[str]) -> str | None:
    """"original" or "transformers" from the names of a state dict; None when it is not ESM C's."""
    keys = {n[len(_TRANSFORMERS_PREFIX):] if n.startswith(_TRANSFORMERS_PREFIX) else n for n in names}
    if "embed.weight" in keys and any(k.startswith("transformer.blocks.") for k in keys):
        return "original"
    if "embed_tokens.weight" in keys and any(k.endswith("self_attn.q_norm.weight") for k in keys):
        return "transformers"
    return None


# ---------------------------------------------------------------------------------------------------
# Finding the weights and the shape


def read_config(directory: Path) -> dict[str, Any]:
    """The parsed config.json of a model directory ({} when it has none)."""
    path = directory / _CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path} ({first_line(e)}): re-download it") from None
    return config if isinstance(config, dict) else {}


def is_esmc_directory(directory: Path) -> bool:
    """A transformers ESM C directory: its config.json says `model_type: esmc`."""
    return read_config(directory).get("model_type") == "esmc"


def _directory_weights(directory: Path) -> tuple[Path, ...]:
    """The weight file(s) of a transformers directory: safetensors (one file or shards) before the .bin."""
    if (directory / _SAFETENSORS_FILE).is_file():
        return (directory / _SAFETENSORS_FILE,)
    index = directory / _SAFETENSORS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"cannot read {index} ({first_line(e)}): re-download the model") from None
        return tuple(directory / shard for shard in shards)
    if (directory / _BIN_FILE).is_file():
        return (directory / _BIN_FILE,)
    raise CheckpointError(
        f"{directory} has neither {_SAFETENSORS_FILE}, {_SAFETENSORS_INDEX} nor {_BIN_FILE}: the download is "
        f"incomplete; fetch the model's weights into it"
    )


def _original_files(directory: Path) -> list[Path]:
    """State-dict files that hold ESM C's original layout, directly in `directory` or under its data/weights/ (where
    an EvolutionaryScale hub snapshot keeps them); deeper trees are not searched."""
    found = [*directory.glob("*"), *directory.glob("data/weights/*")]
    candidates = [p for p in sorted(found) if p.suffix in _STATE_SUFFIXES and p.is_file()]
    return [p for p in candidates if state_layout(_state_names(p)) == "original"]


def config_architecture(config: Mapping[str, Any], where: Path) -> EsmcArchitecture:
    """The shape a transformers ESM C config describes; CheckpointError for what this forward does not compute."""
    def number(key: str) -> int:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{where} has no integer {key!r}: is it an ESM C config.json?")
        return value

    arch = EsmcArchitecture(
        layers=number("num_hidden_layers"), dim=number("hidden_size"), heads=number("num_attention_heads"),
        ffn_dim=number("intermediate_size"), vocab=number("vocab_size"),
        rope_theta=float(_rope_theta(config)), max_positions=int(config.get("max_position_embeddings") or 2048),
    )
    unsupported = []
    if config.get("num_key_value_heads") not in (None, arch.heads):
        unsupported.append("grouped-query attention (num_key_value_heads)")
    if config.get("head_dim") not in (None, arch.head_dim):
        unsupported.append(f"head_dim {config.get('head_dim')} other than hidden_size / heads")
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {config.get('hidden_act')!r} (ESM C's SwiGLU uses silu)")
    if config.get("attention_bias") or config.get("mlp_bias"):
        unsupported.append("projection biases (attention_bias / mlp_bias)")
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    if isinstance(rope, Mapping) and rope.get("rope_type", rope.get("type", "default")) != "default":
        unsupported.append(f"rope_type {rope.get('rope_type', rope.get('type'))!r}")
    problems = arch.problems() + [f"{u} is not supported" for u in unsupported]
    if problems:
        raise CheckpointError(f"{where}: {'; '.join(problems)}")
    return arch


def _rope_theta(config: Mapping[str, Any]) -> float:
    rope = config.get("rope_parameters")
    if isinstance(rope, Mapping) and rope.get("rope_theta") is not None:
        return float(rope["rope_theta"])
    return float(config.get("rope_theta") or 10000.0)


def state_architecture(state: Mapping[str, Any], where: Path) -> EsmcArchitecture:
    """The shape of an original-layout state dict, read from its tensors (the file carries no config). Heads are
    64 wide in every ESM C model, so the width gives their number."""
    embed = state.get("embed.weight")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.blocks\.(\d+)\.", k))}
    down = state.get("transformer.blocks.0.ffn.3.weight")
    if not isinstance(embed, torch.Tensor) or embed.ndim != 2 or not blocks or not isinstance(down, torch.Tensor):
        raise CheckpointError(
            f"{where} lacks embed.weight or transformer.blocks.0.ffn.3.weight: it is not a complete ESM C state dict"
        )
    vocab, dim = (int(s) for s in embed.shape)
    if dim % HEAD_DIM:
        raise CheckpointError(f"{where}: width {dim} is not a multiple of ESM C's {HEAD_DIM}-wide heads")
    arch = EsmcArchitecture(layers=max(blocks) + 1, dim=dim, heads=dim // HEAD_DIM, ffn_dim=int(down.shape[-1]),
                            vocab=vocab)
    if arch.problems():
        raise CheckpointError(f"{where}: {'; '.join(arch.problems())}")
    return arch


def check_tokenizer(directory: Path) -> None:
    """A transformers directory's tokenizer.json must give every token the id ESM C's embedding expects."""
    path = directory / _TOKENIZER_FILE
    if not path.is_file():
        return  # EsmcTokenizer builds the same fixed vocabulary in code when the file is absent
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions on malformed files
        raise CheckpointError(f"cannot read {path} ({first_line(e)}): re-download the model") from None
    wrong = [f"{tok!r} is {tokenizer.token_to_id(tok)}, not {i}" for i, tok in enumerate(ESMC_VOCAB)
             if tokenizer.token_to_id(tok) != i]
    if wrong:
        raise CheckpointError(
            f"{path} is not ESM C's tokenizer ({len(wrong)} token ids differ, e.g. {wrong[0]}): runner tokenizes "
            f"with ESM C's fixed vocabulary, so these weights would see the wrong ids"
        )


def local_source(path: Path) -> EsmcSource:
    """The ESM C weights at a local path: a transformers directory, a directory holding one original state dict
    (a hub snapshot), or a state-dict file of either layout."""
    if path.is_dir():
        if is_esmc_directory(path):
            check_tokenizer(path)
            return EsmcSource("transformers", _directory_weights(path), config_architecture(read_config(path), path),
                              directory=path)
        found = _original_files(path)
        if len(found) != 1:
            raise CheckpointError(
                f"{path} is not an ESM C model directory (no config.json with model_type esmc, and "
                f"{len(found) or 'no'} original ESM C state dicts inside): give the directory of a transformers "
                f"EsmcModel or the path of one .pth file"
            )
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"ESM C checkpoint {path} not found: check the path")
    layout = state_layout(_state_names(path))
    if layout is None:
        raise CheckpointError(
            f"{path} does not hold ESM C weights (no embed.weight + transformer.blocks.* nor embed_tokens.weight + "
            f"layers.*.self_attn.q_norm.weight)"
        )
    if layout == "transformers":
        raise CheckpointError(
            f"{path} holds transformers-layout ESM C weights, which need their config.json: give the directory "
            f"that holds both"
        )
    return EsmcSource("original", (path,), state_architecture(_torch_state(path), path))


# ---------------------------------------------------------------------------------------------------
# Mapping names and building the model


def runner_state(raw: Mapping[str, Any], layout: str, arch: EsmcArchitecture, where: str) -> dict[str, torch.Tensor]:
    """`raw` (a state dict in `layout`) under runner's names, checked against `arch`: one CheckpointError lists
    every missing, unexpected and wrongly shaped weight (in the file's own names)."""
    raw = {k[len(_TRANSFORMERS_PREFIX):] if layout == "transformers" and k.startswith(_TRANSFORMERS_PREFIX) else k: v
           for k, v in raw.items()}
    expected = {name: tuple(t.shape) for name, t in _meta_model(arch).state_dict().items()}
    column = 1 if layout == "original" else 2
    rows: list[tuple[str, tuple[str, ...]]] = []  # (runner name, source names)
    for row in WEIGHT_NAMES:
        rows.append((row[0], (row[1],) if column == 1 else row[2]))
    for i in range(arch.layers):
        ours, theirs = BLOCK_PREFIX["runner"].format(i=i), BLOCK_PREFIX[layout].format(i=i)
        for row in BLOCK_WEIGHT_NAMES:
            sources = (row[1],) if column == 1 else row[2]
            rows.append((ours + row[0], tuple(theirs + s for s in sources)))
    used = {s for _, sources in rows for s in sources}
    missing = [s for _, sources in rows for s in sources if s not in raw]
    unexpected = sorted(k for k in raw if k not in used and not _IGNORED.search(k))
    not_tensors = sorted(k for k in used if k in raw and not isinstance(raw[k], torch.Tensor))
    state: dict[str, torch.Tensor] = {}
    wrong: list[str] = []
    for name, sources in rows:
        if any(s not in raw or s in not_tensors for s in sources):
            continue
        parts = [raw[s] for s in sources]
        if len({tuple(p.shape[1:]) for p in parts}) != 1:
            wrong.append(f"{'/'.join(sources)} {[tuple(p.shape) for p in parts]}")
            continue
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        if tuple(tensor.shape) != expected[name]:
            wrong.append(f"{'+'.join(sources)} {tuple(tensor.shape)} (expected {expected[name]})")
            continue
        state[name] = tensor
    problems = [f"{len(items)} {what}: {name_list(items, limit=8)}" for what, items in
                (("missing", missing), ("unexpected", unexpected), ("not tensors", not_tensors),
                 ("wrongly shaped", wrong)) if items]
    if problems:
        raise CheckpointError(
            f"{where} does not fit ESM C ({arch.layers} layers, width {arch.dim}, {layout} layout): "
            + "; ".join(problems)
        )
    return state


def _meta_model(arch: EsmcArchitecture, info: ModelInfo | None = None) -> EsmcEmbedder:
    """An EsmcEmbedder on the meta device: names and shapes, no memory and no random init."""
    info = info or ModelInfo(name="", family="esmc", checkpoint="", checkpoint_sha256="", embed_dim=arch.dim,
                             num_layers=arch.layers, parameters=arch.parameters())
    with torch.device("meta"):
        return EsmcEmbedder(arch, info)


def load_source(source: EsmcSource, name: str, checkpoint_sha256: str = "") -> EsmcEmbedder:
    """EsmcEmbedder holding `source`'s weights: CPU, float32, eval mode."""
    where = str(source.directory or source.weights[0])
    state = runner_state(_read_state(source.weights), source.layout, source.arch, where)
    info = ModelInfo(name=name, family="esmc", checkpoint=str(Path(where).resolve()),
                     checkpoint_sha256=checkpoint_sha256, embed_dim=source.arch.dim,
                     num_layers=source.arch.layers, parameters=source.arch.parameters())
    model = _meta_model(source.arch, info)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    logger.info("loaded ESM C %s (%s layout): %d layers, width %d, %d heads, %d parameters", name, source.layout,
                source.arch.layers, source.arch.dim, source.arch.heads, info.parameters)
    return model.eval().requires_grad_(False)


def source_sha256(source: EsmcSource) -> str:
    """SHA-256 of the weight file (of the sorted shards' hashes when the weights are sharded)."""
    if len(source.weights) == 1:
        return sha256_file(source.weights[0])
    import hashlib

    return hashlib.sha256("".join(sha256_file(p) for p in source.weights).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Hub names


@dataclass(frozen=True)
class HubModel:
    """A released ESM C model on the Hugging Face hub."""

    repo: str  # hub repository
    files: tuple[str, ...]  # the files to fetch (snapshot_download's allow_patterns)
    arch: str  # key of ESMC_ARCHITECTURES: the published shape, known without downloading


_TRANSFORMERS_FILES = (_CONFIG_FILE, _TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json",
                       _SAFETENSORS_FILE, _SAFETENSORS_INDEX, "model-*.safetensors")
# The short names are the EvolutionaryScale `esm` package's (`ESMC.from_pretrained("esmc_300m")`): its 2024-12
# weights, an original-layout .pth in the EvolutionaryScale repositories (esm.pretrained's paths). Biohub's
# repositories hold the transformers layout of the same architectures.
HUB_MODELS: dict[str, HubModel] = {
    "esmc_300m": HubModel("EvolutionaryScale/esmc-300m-2024-12", ("data/weights/esmc_300m_2024_12_v0.pth",),
                          "esmc_300m"),
    "esmc_600m": HubModel("EvolutionaryScale/esmc-600m-2024-12", ("data/weights/esmc_600m_2024_12_v0.pth",),
                          "esmc_600m"),
    "biohub/ESMC-300M": HubModel("biohub/ESMC-300M", _TRANSFORMERS_FILES, "esmc_300m"),
    "biohub/ESMC-600M": HubModel("biohub/ESMC-600M", _TRANSFORMERS_FILES, "esmc_600m"),
}
HUB_MODELS["EvolutionaryScale/esmc-300m-2024-12"] = HUB_MODELS["esmc_300m"]
HUB_MODELS["EvolutionaryScale/esmc-600m-2024-12"] = HUB_MODELS["esmc_600m"]


def _snapshot(spec: str, hub: HubModel, offline_only: bool) -> Path:
    """The hub snapshot directory of `hub` (downloaded once into the HF cache, as the hub client does); with
    `offline_only` the cache alone is tried (CheckpointError when the files are not there)."""
    from huggingface_hub import snapshot_download

    errors: list[str] = []
    for offline in (True,) if offline_only else (False, True):
        try:
            return Path(snapshot_download(hub.repo, allow_patterns=list(hub.files), local_files_only=offline))
        except Exception as exc:  # huggingface_hub raises many types (HTTP, gated, offline, cache miss)
            errors.append(f"{type(exc).__name__}: {first_line(exc)}")
    raise CheckpointError(
        f"cannot download {spec} ({hub.repo}) from the Hugging Face hub ({errors[0]}): with internet, check the "
        f"name, and for a gated repository accept its terms on https://huggingface.co/{hub.repo} and log in (hf auth "
        f"login, or HF_TOKEN); without, download it elsewhere and pass the local directory or .pth file as --model"
    )


def resolve(spec: str, download: bool) -> EsmcSource | None:
    """Where the weights of `spec` are (a hub name, a directory or a file). A hub name not yet in the cache gives
    None when `download` is False."""
    hub = HUB_MODELS.get(spec)
    if hub is None:
        return local_source(Path(spec).expanduser())
    try:
        directory = _snapshot(spec, hub, offline_only=not download)
    except CheckpointError:
        if download:
            raise
        return None
    source = local_source(directory)
    if source.arch != ESMC_ARCHITECTURES[hub.arch] and source.layout == "original":
        # The .pth carries no config: its tensors gave the shape. A known name must be the published one.
        raise CheckpointError(f"{source.weights[0]} does not have the published shape of {spec}: re-download it")
    return source


def is_esmc(spec: str) -> bool:
    """Whether `spec` names ESM C weights: a hub name, a transformers directory whose config says `model_type:
    esmc`, a directory holding one original ESM C state dict, or a state-dict file of ESM C (read by content)."""
    if spec in HUB_MODELS:
        return True
    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            if read_config(path):  # a config with content decides (an EvolutionaryScale snapshot's is "{}")
                return is_esmc_directory(path)
            return len(_original_files(path)) == 1
        if path.is_file() and path.suffix in _STATE_SUFFIXES:
            return state_layout(_state_names(path)) is not None
    except (CheckpointError, OSError):
        return False  # unreadable: the family's own loader reports why
    return False


def esmc_codec(spec: str) -> EsmcCodec:
    """The codec of an ESM C model (weights not read; a hub name's files not downloaded)."""
    if spec in HUB_MODELS:
        return EsmcCodec(ESMC_ARCHITECTURES[HUB_MODELS[spec].arch].max_positions)
    source = resolve(spec, download=False)
    assert source is not None  # a local spec always resolves (or raises)
    return EsmcCodec(source.arch.max_positions)


def load_esmc(spec: str) -> EsmcEmbedder:
    """EsmcEmbedder for a hub name (downloaded into the HF cache if needed), a directory or a .pth file: CPU,
    float32, eval mode."""
    source = resolve(spec, download=True)
    assert source is not None  # download=True never gives None
    return load_source(source, name=spec)


def esmc_info(spec: str, compute_sha256: bool = False) -> ModelInfo:
    """What the manifest records about an ESM C model, without loading its weights. Hub names not downloaded
    yet have their published shape (checkpoint ""); `compute_sha256` downloads if needed and hashes the weights
    (once per job, on the driver, which leaves them cached for actors on its node)."""
    source = resolve(spec, download=compute_sha256)
    arch = source.arch if source is not None else ESMC_ARCHITECTURES[HUB_MODELS[spec].arch]
    checkpoint = "" if source is None else str((source.directory or source.weights[0]).resolve())
    return ModelInfo(
        name=spec,
        family="esmc",
        checkpoint=checkpoint,
        checkpoint_sha256=source_sha256(source) if source is not None and compute_sha256 else "",
        embed_dim=arch.dim,
        num_layers=arch.layers,
        parameters=arch.parameters(),
    )


def esmc_preflight(spec: str) -> ModelInfo:
    """The cheap check before start-up (runner.models.registry.preflight): every weight's name and shape against
    the ESM C its config (or state) describes, from safetensors headers or a memory-mapped torch file, no weight
    data read. A hub name not downloaded yet is checked when it is."""
    source = resolve(spec, download=False)
    if source is not None:
        shapes: dict[str, Any] = {}
        for path in source.weights:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    shapes.update({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()})  # noqa: SIM118
            else:
                shapes.update(_torch_state(path))  # memory-mapped
        runner_state(shapes, source.layout, source.arch, str(source.directory or source.weights[0]))
    return esmc_info(spec)
