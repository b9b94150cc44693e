"""ESM-2 from Hugging Face transformers checkpoints (`EsmModel`, `EsmForMaskedLM`), run by runner's packed ESM-2.

A transformers ESM-2 is fair-esm's ESM-2 under other weight names, so its weights are renamed onto fair-esm's
`ESM2` module (one table: `MODEL_WEIGHTS` and `LAYER_WEIGHTS`) and the model is the same `ESM2Embedder` as
for fair-esm files: the same packed forward, kernels and speed, shadow and NaN checks included.

What is read:
- a hub name `facebook/esm2_*` (downloaded once into the Hugging Face cache by huggingface_hub, as
  transformers does), or a local directory holding `config.json` (`model_type: esm`), the weights
  (`model.safetensors` or `pytorch_model.bin`, either possibly sharded with an index) and the tokenizer's
  `vocab.txt`. `.bin` files are read with `torch.load(weights_only=True)`.
- the rotary `inv_freq` where the checkpoint stores it (per layer in older saves, once per model in newer
  ones), as transformers' own loader insists: released files may hold it rounded as in training.
- not read, on purpose: the untrained pooler of `EsmModel`, the unused absolute position table and
  `position_ids` some saves carry, and the masked-LM head.

Layers mean what they mean in transformers: `hidden_states[i]` of `EsmModel` is layer i here (0 = the
embeddings, after token dropout's scaling; the last one after `emb_layer_norm_after`, which transformers
substitutes for the last layer's raw output), which is also fair-esm's `repr_layers` convention.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch

from runner.errors import CheckpointError, first_line
from runner.models.base import ModelInfo
from runner.models.checkpoints import name_list
from runner.models.esm2 import (
    ESM2_MODELS,
    Esm2Codec,
    ESM2Embedder,
    _alphabet,
    _assign_weights,
    _build_esm2,
    _count_parameters,
)
from runner.models.rotary import default_inv_freq

logger = logging.getLogger(__name__)  # a child of "runner": actor-side, see runner.driver.console

# Hub names of the released transformers ESM-2 models -> the fair-esm name of the same weights.
HF_ESM2_MODELS: dict[str, str] = {f"facebook/{name}": name for name in ESM2_MODELS}

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.txt"
_TEXT_FILES = [CONFIG_FILE, VOCAB_FILE, "tokenizer_config.json", "special_tokens_map.json"]
# Weight layouts in order of preference: (single file, index of shards, shard pattern for downloads).
_WEIGHT_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json", "model-*.safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*.bin"),
)

# The mapping, transformers name -> fair-esm ESM2 module name (each a module with .weight and .bias).
# Outside the layers (after an optional "esm." prefix, which EsmForMaskedLM has and EsmModel has not):
MODEL_WEIGHTS: dict[str, str] = {
    "embeddings.word_embeddings": "embed_tokens",  # weight only
    "encoder.emb_layer_norm_after": "emb_layer_norm_after",
    "contact_head.regression": "contact_head.regression",  # contacts only; optional
}
# Inside layer i: "encoder.layer.{i}.<key>" -> "layers.{i}.<value>".
LAYER_WEIGHTS: dict[str, str] = {
    "attention.LayerNorm": "self_attn_layer_norm",  # pre-attention LayerNorm
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "LayerNorm": "final_layer_norm",  # pre-MLP LayerNorm
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
}
# Rotary frequencies: once per model (transformers >= 5) or once per layer (older saves; transformers 5.x
# writes them back under a literal "*" layer).
_INV_FREQ = re.compile(r"^(encoder\.layer\.(\d+|\*)\.attention\.self\.)?rotary_embeddings\.inv_freq$")
# Read but never used for embeddings: EsmModel's untrained pooler, the masked-LM head, the absolute position
# table (unused with rotary positions) and the position_ids buffer some saves carry.
_IGNORED = re.compile(r"^(pooler\.|lm_head\.|embeddings\.position_embeddings\.|embeddings\.position_ids$)")
_OPTIONAL = ("contact_head.regression.weight", "contact_head.regression.bias")


class HfEsm2Config(NamedTuple):
    """The parts of a transformers EsmConfig that decide the network."""

    layers: int  # num_hidden_layers
    dim: int  # hidden_size
    heads: int  # num_attention_heads
    token_dropout: bool  # fair-esm's <mask> zeroing and 0.88 rescaling of the embeddings
    eps: float  # layer_norm_eps of every LayerNorm
    rope_theta: float  # rotary base, used only where the checkpoint stores no inv_freq


def is_hf_esm2_spec(spec: str) -> bool:
    """A hub name of a transformers ESM-2, or a directory (its config.json decides whether it is one)."""
    return spec in HF_ESM2_MODELS or Path(spec).expanduser().is_dir()


# ---------------------------------------------------------------------------------------------------
# Files


def _download(repo: str, patterns: list[str]) -> Path:
    """The hub snapshot of `repo` restricted to `patterns`, from the cache when the network fails."""
    from huggingface_hub import snapshot_download

    errors = []
    for offline in (False, True):
        try:
            return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=offline))
        except Exception as exc:  # huggingface_hub raises many types (HTTP, offline mode, cache miss)
            errors.append(f"{type(exc).__name__}: {first_line(exc)}")
    raise CheckpointError(
        f"cannot download {repo} from the Hugging Face hub ({errors[0]}); download it where there is internet "
        f"(huggingface-cli download {repo}) and set HF_HUB_CACHE, or pass the local directory as --model"
    )


def _cached_dir(repo: str) -> Path | None:
    """The cached snapshot of hub model `repo` if its config.json is in the cache (no network), else None."""
    from huggingface_hub import snapshot_download

    try:
        directory = Path(snapshot_download(repo, allow_patterns=[CONFIG_FILE], local_files_only=True))
    except Exception:  # not cached (huggingface_hub raises several types for that)
        return None
    return directory if (directory / CONFIG_FILE).is_file() else None


def resolve_dir(spec: str, weights: bool) -> Path:
    """The local directory of a hub name (downloading the text files, and the weights if asked) or of a path."""
    if spec in HF_ESM2_MODELS:
        directory = _download(spec, _TEXT_FILES)
        if weights:
            for single, index, shards in _WEIGHT_LAYOUTS:  # safetensors when the repository has them
                directory = _download(spec, [*_TEXT_FILES, single, index, shards])
                if (directory / single).is_file() or (directory / index).is_file():
                    break
    else:
        directory = Path(spec).expanduser()
        if not directory.is_dir():
            raise CheckpointError(f"{spec} is not a directory: give a transformers ESM-2 directory or hub name")
    if not (directory / CONFIG_FILE).is_file():
        raise CheckpointError(
            f"{directory} has no {CONFIG_FILE}: a transformers model directory needs config.json, the weights "
            f"(model.safetensors or pytorch_model.bin) and vocab.txt"
        )
    return directory


def read_config_json(directory: Path) -> dict[str, Any]:
    """The parsed config.json of a directory (CheckpointError if unreadable)."""
    path = directory / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {first_line(exc)}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {first_line(exc)}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, not a transformers config")
    return config


def read_hf_config(directory: Path) -> HfEsm2Config:
    """The architecture in config.json, checked to be an ESM-2 runner computes exactly (CheckpointError if not)."""
    config = read_config_json(directory)
    path = directory / CONFIG_FILE
    if config.get("model_type") != "esm":
        raise CheckpointError(f"{path} says model_type {config.get('model_type')!r}, not 'esm': not an ESM-2")
    differences = {
        "position_embedding_type": (config.get("position_embedding_type"), "rotary"),  # absolute = ESM-1b
        "emb_layer_norm_before": (bool(config.get("emb_layer_norm_before")), False),  # True = ESM-1b
        "is_folding_model": (bool(config.get("is_folding_model")), False),  # ESMFold
        "is_decoder": (bool(config.get("is_decoder")), False),
    }
    wrong = {key: found for key, (found, wanted) in differences.items() if found != wanted}
    if wrong:
        raise CheckpointError(
            f"{path} describes an ESM model runner does not compute as ESM-2 ({wrong}); only ESM-2 "
            f"(rotary positions, no embedding LayerNorm, encoder only) is supported"
        )
    try:
        layers, dim, heads, inner = (
            int(config[k]) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} lacks a valid {first_line(exc)}: is it a complete EsmConfig?") from None
    if min(layers, dim, heads) <= 0 or dim % heads or (dim // heads) % 2 or inner != 4 * dim:
        raise CheckpointError(
            f"{path} describes an architecture ESM-2 cannot have (layers={layers}, hidden_size={dim}, "
            f"heads={heads}, intermediate_size={inner}; ESM-2 has intermediate_size = 4 x hidden_size)"
        )
    return HfEsm2Config(
        layers=layers,
        dim=dim,
        heads=heads,
        token_dropout=bool(config.get("token_dropout", True)),
        eps=float(config.get("layer_norm_eps", 1e-5)),
        rope_theta=float(config.get("rope_theta", 10000.0)),
    )


def read_vocab(directory: Path) -> list[str]:
    """The tokens of vocab.txt, one per line, in id order."""
    path = directory / VOCAB_FILE
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except OSError:
        raise CheckpointError(
            f"{directory} has no readable {VOCAB_FILE}: the tokenizer's vocabulary is needed to map token ids "
            f"onto fair-esm's alphabet (save the tokenizer with the model, or copy vocab.txt from the hub model)"
        ) from None


def vocab_order(vocab: list[str]) -> list[int] | None:
    """For each token of fair-esm's alphabet, its id in `vocab` (None when the orders already agree).

    CheckpointError if the vocabularies hold different tokens: the model then speaks another alphabet.
    """
    alphabet = list(_alphabet().all_toks)
    if vocab == alphabet:
        return None
    index = {token: i for i, token in enumerate(vocab)}
    if len(index) != len(vocab) or set(vocab) != set(alphabet):
        missing = [t for t in alphabet if t not in index]
        extra = sorted(set(vocab) - set(alphabet))
        raise CheckpointError(
            f"vocab.txt is not ESM-2's alphabet ({len(vocab)} tokens; missing {missing[:8]}, extra {extra[:8]}"
            f"{', repeated tokens' if len(index) != len(vocab) else ''})"
        )
    return [index[token] for token in alphabet]


def weight_files(directory: Path) -> list[Path]:
    """The weight file(s) of a directory: safetensors first, then .bin; each single or sharded with an index."""
    for single, index, _ in _WEIGHT_LAYOUTS:
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            try:
                weight_map = json.loads((directory / index).read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{directory / index} is not a readable shard index ({first_line(exc)})") from None
            missing = [s for s in shards if not (directory / s).is_file()]
            if missing:
                raise CheckpointError(f"{directory} lacks the shard(s) {missing[:5]} listed in {index}")
            return [directory / s for s in shards]
    raise CheckpointError(
        f"{directory} has no weights: expected model.safetensors or pytorch_model.bin (or a sharded index of them)"
    )


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """All tensors of the weight file(s): safetensors directly, .bin through torch.load(weights_only=True)."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.name.endswith(".safetensors"):
                from safetensors.torch import load_file

                part = load_file(str(path), device="cpu")
            else:
                # mmap needs torch's zip format (torch >= 1.6); older pickles are read whole.
                part = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as exc:  # safetensors and pickle errors share no base class
            raise CheckpointError(
                f"cannot read weights {path} ({type(exc).__name__}: {first_line(exc)}): the file is truncated, "
                f"of another format, or holds more than tensors"
            ) from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointError(f"{path} does not hold a state dict of tensors")
        state.update(part)
    return state


def read_weight_shapes(files: list[Path]) -> dict[str, torch.Tensor]:
    """The weights' names and shapes without their data, for the pre-flight check: meta tensors from the
    safetensors headers (rotary inv_freq tables, tiny, are read: their values are compared), and a memory-mapped
    .bin (torch reads its pickle, not the tensors)."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if not path.name.endswith(".safetensors"):
            state.update(read_weights([path]))  # memory-mapped
            continue
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 - a safe_open handle is not a mapping
                    state[key] = f.get_tensor(key) if _INV_FREQ.match(_hf_name(key)) else torch.empty(
                        f.get_slice(key).get_shape(), device="meta")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(
                f"cannot read weights {path} ({type(exc).__name__}: {first_line(exc)}): the file is truncated or "
                f"of another format"
            ) from None
    return state


def sha256_files(files: list[Path]) -> str:
    """The checkpoint's hex SHA-256: the weight file's own for one file; for shards, the SHA-256 of the lines
    "<shard name> <shard sha256>" in order. Each file's hash is remembered across runs (runner.driver.cache)."""
    from runner.driver.cache import cached_sha256

    if len(files) == 1:
        return cached_sha256(files[0])[0]
    lines = "".join(f"{path.name} {cached_sha256(path)[0]}\n" for path in files)
    return hashlib.sha256(lines.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# The mapping


def hf_to_fair_esm_names(layers: int) -> dict[str, str]:
    """Every transformers weight name of a `layers`-layer ESM-2 (without "esm.") -> its fair-esm name."""
    names: dict[str, str] = {"embeddings.word_embeddings.weight": "embed_tokens.weight"}
    for hf, fair in MODEL_WEIGHTS.items():
        if fair != "embed_tokens":
            names.update({f"{hf}.weight": f"{fair}.weight", f"{hf}.bias": f"{fair}.bias"})
    for i in range(layers):
        for hf, fair in LAYER_WEIGHTS.items():
            for kind in ("weight", "bias"):
                names[f"encoder.layer.{i}.{hf}.{kind}"] = f"layers.{i}.{fair}.{kind}"
    return names


def _hf_name(key: str) -> str:
    """A saved key as the mapping names it: without "esm.", LayerNorm gamma/beta read as weight/bias."""
    name = key.removeprefix("esm.")
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def fair_esm_state(
    hf_state: dict[str, torch.Tensor], config: HfEsm2Config, vocab: list[str], source: Path | str
) -> dict[str, torch.Tensor]:
    """The weights of a transformers ESM-2 under fair-esm's ESM2 module names (the rotary inv_freq in each layer,
    the embedding rows in fair-esm's token order). One CheckpointError lists whatever is missing, unexpected
    or of the wrong shape."""
    names = hf_to_fair_esm_names(config.layers)
    expected = _build_esm2(config.layers, config.dim, config.heads, config.token_dropout).state_dict()  # names, shapes
    state: dict[str, torch.Tensor] = {}
    inv_freqs: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in hf_state.items():
        name = _hf_name(key)
        if name in names:
            state[names[name]] = value
        elif _INV_FREQ.match(name):
            inv_freqs[key] = value
        elif not _IGNORED.match(name):
            unexpected.append(key)
    missing = sorted(hf for hf, fair in names.items() if fair not in state and fair not in _OPTIONAL)
    wrong_shape = sorted(
        f"{hf} {tuple(state[fair].shape)} (ESM-2 of this config: {tuple(expected[fair].shape)})"
        for hf, fair in names.items()
        if fair in state and tuple(state[fair].shape) != tuple(expected[fair].shape)
    )
    head_dim = config.dim // config.heads
    wrong_shape += [f"{k} {tuple(v.shape)} (rotary: ({head_dim // 2},))" for k, v in inv_freqs.items()
                    if tuple(v.shape) != (head_dim // 2,)]
    problems = [f"{label}: {name_list(found)}" for label, found in
                (("missing", missing), ("unexpected", sorted(unexpected)), ("wrong shape", wrong_shape)) if found]
    if problems:
        raise CheckpointError(
            f"{source} does not match the ESM-2 of its config.json ({config.layers} layers, hidden_size "
            f"{config.dim}): " + "; ".join(problems)
        )
    inv_freq = _one_inv_freq(inv_freqs, config, source)  # [hd/2]
    for i in range(config.layers):
        state[f"layers.{i}.self_attn.rot_emb.inv_freq"] = inv_freq
    order = vocab_order(vocab)
    if len(vocab) != state["embed_tokens.weight"].shape[0]:
        raise CheckpointError(
            f"vocab.txt has {len(vocab)} tokens but the embedding has {state['embed_tokens.weight'].shape[0]} rows"
        )
    if order is not None:  # rows re-ordered so fair-esm's token ids index them
        state["embed_tokens.weight"] = state["embed_tokens.weight"][order]  # [V, D]
    return state


def _one_inv_freq(found: dict[str, torch.Tensor], config: HfEsm2Config, source: Path | str) -> torch.Tensor:
    """The stored rotary inv_freq (all copies must agree), else the formula with the config's rope_theta."""
    if not found:
        return default_inv_freq(config.dim // config.heads, config.rope_theta)
    tables = list(found.items())
    first_key, first = tables[0]
    differing = [key for key, table in tables[1:] if not torch.equal(table, first)]
    if differing:
        raise CheckpointError(
            f"{source}: the stored rotary inv_freq of {differing[0]} differs from {first_key}; runner applies one "
            f"rotary table to all layers, so it cannot reproduce this model"
        )
    return first.float()


# ---------------------------------------------------------------------------------------------------
# Loading


def load_hf_esm2(spec: str) -> ESM2Embedder:
    """ESM2Embedder from a transformers ESM-2 hub name or directory (CPU, float32, eval mode)."""
    directory = resolve_dir(spec, weights=True)
    config = read_hf_config(directory)
    vocab = read_vocab(directory)
    files = weight_files(directory)
    state = fair_esm_state(read_weights(files), config, vocab, directory)
    model = _build_esm2(config.layers, config.dim, config.heads, config.token_dropout)
    for module in model.modules():  # fair-esm builds its LayerNorms with torch's default eps
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = config.eps
    parameters = _count_parameters(model)
    _assign_weights(model, state, directory)
    model = model.float().eval().requires_grad_(False)
    info = ModelInfo(
        name=spec,
        family="esm2",
        checkpoint=str(directory.resolve()),
        checkpoint_sha256="",
        embed_dim=config.dim,
        num_layers=config.layers,
        parameters=parameters,
    )
    logger.info("loaded transformers ESM-2 %s from %s: %d layers, dim %d, %d heads", spec, directory,
                config.layers, config.dim, config.heads)
    return ESM2Embedder(model, info)


def hf_esm2_preflight(spec: str) -> ModelInfo:
    """The cheap check before start-up: a directory's config.json, vocab.txt and every weight's name and shape
    against the ESM-2 its config describes (no weight data read). A hub name not downloaded yet is checked
    when it is."""
    if spec in HF_ESM2_MODELS and _cached_dir(spec) is None:
        return hf_esm2_info(spec)
    directory = resolve_dir(spec, weights=False)
    config = read_hf_config(directory)
    vocab = read_vocab(directory)
    fair_esm_state(read_weight_shapes(weight_files(directory)), config, vocab, directory)
    return hf_esm2_info(spec)


def hf_esm2_codec(spec: str) -> Esm2Codec:
    """The codec (fair-esm's alphabet: the weights are mapped onto it). For a directory its config and
    vocabulary are checked now, on the driver, rather than in every actor."""
    if spec not in HF_ESM2_MODELS:
        directory = resolve_dir(spec, weights=False)
        read_hf_config(directory)
        vocab_order(read_vocab(directory))
    return Esm2Codec()


def hf_esm2_info(spec: str, compute_sha256: bool = False) -> ModelInfo:
    """What the manifest records, without loading weights. A hub name uses its cached config, or its published
    architecture if not downloaded yet (checkpoint ""); `compute_sha256` downloads the weights if needed and
    hashes them."""
    directory: Path | None = None
    if compute_sha256 or spec not in HF_ESM2_MODELS:
        directory = resolve_dir(spec, weights=compute_sha256)
    else:
        directory = _cached_dir(spec)
    if directory is not None:
        config = read_hf_config(directory)
        layers, dim, heads, token_dropout = config.layers, config.dim, config.heads, config.token_dropout
    else:
        layers, dim, heads = ESM2_MODELS[HF_ESM2_MODELS[spec]]
        token_dropout = True
    return ModelInfo(
        name=spec,
        family="esm2",
        checkpoint=str(directory.resolve()) if directory is not None else "",
        checkpoint_sha256=sha256_files(weight_files(directory)) if compute_sha256 and directory else "",
        embed_dim=dim,
        num_layers=layers,
        parameters=_count_parameters(_build_esm2(layers, dim, heads, token_dropout)),
    )
