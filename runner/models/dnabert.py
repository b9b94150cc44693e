"""DNABERT-S and DNABERT-2 (MosaicBERT with ALiBi) as a first-class model: no `trust_remote_code`.

The released checkpoints ship their own modelling code (`bert_layers.py`, MosaicBERT); this file
re-implements that architecture so the weights load into a plain `nn.Module` with a packed forward:

- embeddings: word + token-type (always type 0) embeddings, then LayerNorm. No position embeddings:
  position enters only through the ALiBi attention bias, bias[h, i, j] = -slope[h] * |i - j|.
- each layer, post-LN: fused `Wqkv` projection, softmax(q k^T / sqrt(hd) + alibi) v, `dense`,
  LayerNorm(x + attn); then the gated-GELU MLP: `gated_layers` (no bias) makes [gate | value],
  `wo(gelu(gate) * value)`, LayerNorm(x + mlp). GELU is the exact (erf) form, whatever `hidden_act` says,
  because MosaicBERT hard-codes it.

The module names below are the released state-dict names, so a checkpoint loads with one
`load_state_dict` after a known prefix is stripped and known heads are dropped (see `_checkpoint_state`).
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from runner.errors import CheckpointError, first_line
from runner.models.base import (
    ASCII_UPPER,
    EmbeddingModel,
    ModelInfo,
    SequenceCodec,
    clean_ascii_column,
    resolve_layers,
    valid_column,
)
from runner.models.checkpoints import refusal_reason

DNABERT_MODELS: tuple[str, ...] = ("zhihan1996/DNABERT-S", "zhihan1996/DNABERT-2-117M")

# The released config of both hub models (DNABERT-S is DNABERT-2 further trained, same shape); used by
# `dnabert_info` so that listing a model never needs the network.
RELEASED_CONFIG: dict[str, Any] = {
    "vocab_size": 4096,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "alibi_starting_size": 512,
}

# Tokens per window the model sees. DNABERT-2 was pre-trained on 128/512-token windows and both
# released configs say max_position_embeddings = alibi_starting_size = 512; ALiBi would extrapolate
# further, but nothing beyond 512 is what the release promises, so longer encodings are cut here.
DEFAULT_TOKEN_LIMIT = 512

# Nucleotides per window. Windows are cut by residues *before* BPE, so this must keep the token count
# under DEFAULT_TOKEN_LIMIT for ordinary DNA: the released 4096-token BPE averages about 4-5 nt per token
# on genomic DNA (the DNABERT-2 paper reports ~5x shorter inputs than nucleotides), so 2048 nt is about
# 410-510 tokens. Low-complexity stretches tokenize shorter; `DnabertCodec.encode` then cuts the tokens
# to the limit (keeping [SEP]) so a forward never exceeds it.
DEFAULT_MAX_RESIDUES = 2048

_CONFIG_FILE = "config.json"
_TOKENIZER_FILE = "tokenizer.json"
_SAFETENSORS_FILE = "model.safetensors"
_BIN_FILE = "pytorch_model.bin"
_TEXT_FILES = [_CONFIG_FILE, _TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"]

# Checkpoint entries that are not part of the encoder and are dropped on purpose: the MLM head of
# DNABERT-2 (BertForMaskedLM), the pooler of DNABERT-S (BertModel), and buffers some exports include.
_IGNORED_PREFIXES = ("cls.", "pooler.")
_IGNORED_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")

_DNA_ALPHABET = frozenset("ACGTN")
_DNA_UPPER = ASCII_UPPER.copy()  # byte -> byte of `clean`: upper-cased, then U read as T
_DNA_UPPER[[ord("u"), ord("U")]] = ord("T")


# --------------------------------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------------------------------


class DnabertCodec(SequenceCodec):
    """DNA text -> BPE token ids with [CLS] ... [SEP], using the checkpoint's own `tokenizer.json`.

    Pooling: the DNABERT-S authors embed a sequence as the mean of the last hidden state over *every*
    token the tokenizer returns, [CLS] and [SEP] included (MAGICS-LAB/DNABERT_S `evaluate/utils.py`,
    `calculate_llm_embedding`: sum(hidden * attention_mask) / sum(attention_mask); the DNABERT-2 README
    example does `torch.mean(hidden_states[0], dim=0)`). So `default_pooling` is "mean_all".

    The codec keeps the tokenizer as its JSON text and builds the `tokenizers.Tokenizer` lazily, so it
    pickles small and rebuilds the same tokenizer in every worker.
    """

    kind = "dna"
    special_start = 1  # [CLS]
    special_end = 1  # [SEP]
    default_pooling = "mean_all"

    def __init__(
        self,
        tokenizer_json: str,
        max_residues: int = DEFAULT_MAX_RESIDUES,
        max_tokens: int = DEFAULT_TOKEN_LIMIT,
    ) -> None:
        """`tokenizer_json`: the text of a `tokenizer.json`; `max_tokens`: most ids `encode` returns."""
        if max_tokens < 3:
            raise CheckpointError(f"DNABERT token limit must be at least 3 ([CLS] x [SEP]), got {max_tokens}")
        self.tokenizer_json = tokenizer_json
        self.max_residues = int(max_residues)
        self.max_tokens = int(max_tokens)
        self._tokenizer: Any = None
        tok = self.tokenizer
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        if cls_id is None or sep_id is None:
            raise CheckpointError("tokenizer.json has no [CLS] or [SEP] token; is this a DNABERT tokenizer?")
        self.cls_id: int = int(cls_id)
        self.sep_id: int = int(sep_id)
        self.vocab_size: int = int(tok.get_vocab_size(with_added_tokens=True))

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> DnabertCodec:
        """A codec from a `tokenizer.json` file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise CheckpointError(f"cannot read DNABERT tokenizer {path}: {exc}") from exc
        return cls(text, **kwargs)

    @property
    def tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer`, built on first use (also after unpickling)."""
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            try:
                tok = Tokenizer.from_str(self.tokenizer_json)
            except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
                raise CheckpointError(f"tokenizer.json is not a valid tokenizers file: {exc}") from exc
            # A tokenizer.json may carry padding/truncation settings; windows are cut by us, never by it.
            tok.no_padding()
            tok.no_truncation()
            self._tokenizer = tok
        return self._tokenizer

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tokenizer"] = None  # rebuilt from tokenizer_json on first use
        return state

    def clean(self, raw: str) -> str:
        """Whitespace removed, uppercased, RNA U read as T."""
        return "".join(raw.split()).upper().replace("U", "T")

    def invalid_characters(self, seq: str) -> str:
        """Characters outside ACGTN, sorted and distinct."""
        return "".join(sorted(set(seq) - _DNA_ALPHABET))

    def clean_column(self, raw: pa.StringArray) -> pa.StringArray:
        """`clean` over a column in numpy: the same strings (U and u become T after upper-casing)."""
        return clean_ascii_column(raw, self.clean, _DNA_UPPER, drop_last=None)

    def valid_column(self, cleaned: pa.StringArray) -> np.ndarray:
        return valid_column(cleaned, _DNA_ALPHABET, self.invalid_characters)

    def encode(self, seq: str) -> np.ndarray:
        """int32 ids [CLS] + BPE(seq) + [SEP], at most `max_tokens` long (tail BPE tokens dropped)."""
        ids = list(self.tokenizer.encode(seq, add_special_tokens=True).ids)
        # The released tokenizer's TemplateProcessing adds [CLS]/[SEP]; add them only where it did not.
        if not ids or ids[0] != self.cls_id:
            ids.insert(0, self.cls_id)
        if len(ids) < 2 or ids[-1] != self.sep_id:
            ids.append(self.sep_id)
        if len(ids) > self.max_tokens:
            ids = ids[: self.max_tokens - 1] + [self.sep_id]
        return np.asarray(ids, dtype=np.int32)


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class _LayerNorm(nn.LayerNorm):
    """LayerNorm that can run in float32 inside a half-precision model (`fp32_layernorm`)."""

    fp32 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 and x.dtype != torch.float32:
            w = self.weight.float()  # [D]
            b = self.bias.float()  # [D]
            return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)  # [T, D]
        return super().forward(x)


class _Embeddings(nn.Module):
    def __init__(self, vocab: int, dim: int, type_vocab: int, eps: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.token_type_embeddings = nn.Embedding(type_vocab, dim)
        self.LayerNorm = _LayerNorm(dim, eps=eps)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.Wqkv = nn.Linear(dim, 3 * dim)  # output laid out [q | k | v], each heads-major


class _SelfOutput(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.LayerNorm = _LayerNorm(dim, eps=eps)


class _Attention(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.self = _SelfAttention(dim)
        self.output = _SelfOutput(dim, eps)


class _GatedMLP(nn.Module):
    def __init__(self, dim: int, inner: int, eps: float) -> None:
        super().__init__()
        self.inner = inner
        self.gated_layers = nn.Linear(dim, 2 * inner, bias=False)  # output laid out [gate | value]
        self.wo = nn.Linear(inner, dim)
        self.layernorm = _LayerNorm(dim, eps=eps)


class _Layer(nn.Module):
    def __init__(self, dim: int, inner: int, eps: float) -> None:
        super().__init__()
        self.attention = _Attention(dim, eps)
        self.mlp = _GatedMLP(dim, inner, eps)


class _Encoder(nn.Module):
    def __init__(self, layers: int, dim: int, inner: int, eps: float) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_Layer(dim, inner, eps) for _ in range(layers)])


def _config_int(config: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = config.get(key, default)
    if value is None:
        raise CheckpointError(f"DNABERT config.json lacks {key!r}")
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"DNABERT config.json: {key!r} is not an integer ({value!r})") from exc


def token_limit(config: Mapping[str, Any]) -> int:
    """Most tokens per window: `max_position_embeddings`, else `alibi_starting_size`, else 512."""
    for key in ("max_position_embeddings", "alibi_starting_size"):
        if config.get(key) is not None:
            return _config_int(config, key)
    return DEFAULT_TOKEN_LIMIT


class DnabertEmbedder(EmbeddingModel):
    """MosaicBERT encoder (DNABERT-2 / DNABERT-S) with a packed, padding-free forward.

    Build it from a config dict (the keys of the released `config.json`); `load_dnabert` does that and
    then loads the weights. `codec` may be None for benchmarks that feed token ids directly.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        codec: DnabertCodec | None = None,
        name: str = "",
        checkpoint: str = "",
        checkpoint_sha256: str = "",
    ) -> None:
        super().__init__()
        self.config = dict(config)
        self.dim = _config_int(config, "hidden_size")
        self.num_layers = _config_int(config, "num_hidden_layers")
        self.num_heads = _config_int(config, "num_attention_heads")
        self.inner = _config_int(config, "intermediate_size")
        vocab = _config_int(config, "vocab_size")
        type_vocab = _config_int(config, "type_vocab_size", 2)
        eps = float(config.get("layer_norm_eps", 1e-12))
        if self.dim % self.num_heads:
            raise CheckpointError(
                f"hidden_size {self.dim} is not a multiple of num_attention_heads {self.num_heads}"
            )
        self.head_dim = self.dim // self.num_heads
        self.embeddings = _Embeddings(vocab, self.dim, type_vocab, eps)
        self.encoder = _Encoder(self.num_layers, self.dim, self.inner, eps)
        self.codec = codec  # type: ignore[assignment]  # None only for benchmarks without a tokenizer
        self.attention_backend = "exact"
        self.linear = F.linear  # every projection goes through this (see EmbeddingModel.emulate_fp32)
        self._slopes: dict[torch.device, torch.Tensor] = {}  # float32 ALiBi slopes per device
        self._fp32_ln = False
        self.info = ModelInfo(
            name=name,
            family="dnabert",
            checkpoint=checkpoint,
            checkpoint_sha256=checkpoint_sha256,
            embed_dim=self.dim,
            num_layers=self.num_layers,
            parameters=sum(p.numel() for p in self.parameters()),
        )

    @property
    def fp32_layernorm(self) -> bool:
        """Run every LayerNorm in float32 (inputs cast up, outputs cast back) in a half model."""
        return self._fp32_ln

    @fp32_layernorm.setter
    def fp32_layernorm(self, on: bool) -> None:
        self._fp32_ln = bool(on)
        for m in self.modules():
            if isinstance(m, _LayerNorm):
                m.fp32 = bool(on)

    def select_attention(self, device: torch.device) -> str:
        """The fastest ALiBi-capable varlen kernel on `device` ("flash_attn", "flex" or "exact")."""
        from runner.kernels.attention import select_backend

        dtype = next(self.parameters()).dtype
        self.attention_backend = select_backend(device, alibi=True, dtype=dtype, head_dim=self.head_dim)
        return self.attention_backend

    def alibi_slopes(self, device: torch.device) -> torch.Tensor:
        """float32 [H] slopes, cached per device; kept out of the state dict so `.to(fp16)` leaves them."""
        slopes = self._slopes.get(device)
        if slopes is None:
            from runner.kernels.attention import alibi_slopes

            slopes = alibi_slopes(self.num_heads).to(device=device, dtype=torch.float32)  # [H]
            self._slopes[device] = slopes
        return slopes

    def forward_layers(
        self,
        tokens: torch.Tensor,  # int64 [T]
        positions: torch.Tensor,  # int64 [T]; unused: ALiBi distances come from cu_seqlens
        cu_seqlens: torch.Tensor,  # int32 [B+1]
        max_seqlen: int,
        layers: Sequence[int],
    ) -> list[torch.Tensor]:
        """Hidden states after each of `layers` (0 = the embeddings after their LayerNorm, as Hugging Face's
        hidden_states[0]; num_layers or -1 = the last layer): [T, D] each, from one forward."""
        from runner.kernels.attention import plan_attention, varlen_attention

        targets = resolve_layers(layers, self.num_layers, self.info.name or self.info.family)
        stop = max(targets)
        emb = self.embeddings
        # Every token is segment A (type 0), so the type embedding is one row broadcast over all tokens.
        x = emb.word_embeddings(tokens) + emb.token_type_embeddings.weight[0]  # [T, D]
        x = emb.LayerNorm(x)  # [T, D]
        hidden = {0: x}  # layer -> [T, D]
        n_tok = x.shape[0]
        slopes = self.alibi_slopes(x.device)  # [H]
        scale = 1.0 / math.sqrt(self.head_dim)
        plan = plan_attention(cu_seqlens, n_tok, self.attention_backend, x.device)  # once for all layers
        for number, blk in enumerate(self.encoder.layer[:stop], start=1):
            att = blk.attention
            wqkv = att.self.Wqkv
            qkv = self.linear(x, wqkv.weight, wqkv.bias).view(n_tok, 3, self.num_heads, self.head_dim)  # [T, 3, H, hd]
            q, k, v = qkv.unbind(1)  # 3 x [T, H, hd]
            ctx = varlen_attention(
                q, k, v, cu_seqlens, max_seqlen, scale, self.attention_backend, alibi_slopes=slopes, plan=plan
            )  # [T, H, hd]
            dense = att.output.dense
            x = att.output.LayerNorm(self.linear(ctx.reshape(n_tok, self.dim), dense.weight, dense.bias) + x)  # [T, D]
            mlp = blk.mlp
            h = self.linear(x, mlp.gated_layers.weight, None)  # [T, 2I]
            gate, value = h[:, : mlp.inner], h[:, mlp.inner :]  # [T, I] each
            x = mlp.layernorm(self.linear(F.gelu(gate) * value, mlp.wo.weight, mlp.wo.bias) + x)  # [T, D]
            if number in targets:
                hidden[number] = x  # a reference to the residual stream as it passes: nothing recomputed
        return [hidden[t] for t in targets]


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _is_hub_name(spec: str) -> bool:
    return spec in DNABERT_MODELS


def _download(spec: str, patterns: list[str]) -> Path:
    """Hub snapshot restricted to `patterns`; the local cache is tried when the network fails."""
    from huggingface_hub import snapshot_download

    errors = []
    for offline in (False, True):
        try:
            return Path(snapshot_download(spec, allow_patterns=patterns, local_files_only=offline))
        except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, cache miss)
            errors.append(f"{type(exc).__name__}: {exc}")
    raise CheckpointError(
        f"cannot download {spec} from the Hugging Face hub ({errors[0].splitlines()[0]}); "
        f"download it elsewhere (config.json, tokenizer.json, model.safetensors or pytorch_model.bin) "
        f"and pass the local directory as --model"
    )


def _resolve_dir(spec: str, weights: bool) -> Path:
    """Local directory holding the checkpoint files (downloading text files, and weights if asked)."""
    if not _is_hub_name(spec):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise CheckpointError(
                f"{spec} is neither a DNABERT hub name ({', '.join(DNABERT_MODELS)}) nor a directory"
            )
        return path
    if not weights:
        return _download(spec, _TEXT_FILES)
    # Prefer safetensors; fall back to the .bin that the original uploads carry.
    path = _download(spec, [*_TEXT_FILES, _SAFETENSORS_FILE])
    if not (path / _SAFETENSORS_FILE).is_file():
        path = _download(spec, [*_TEXT_FILES, _BIN_FILE])
    return path


def read_config(directory: Path) -> dict[str, Any]:
    """The parsed `config.json` of a checkpoint directory."""
    try:
        return json.loads((directory / _CONFIG_FILE).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"cannot read {directory / _CONFIG_FILE}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{directory / _CONFIG_FILE} is not valid JSON: {exc}") from exc


def _weight_file(directory: Path) -> Path:
    for name in (_SAFETENSORS_FILE, _BIN_FILE):
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(
        f"{directory} has neither {_SAFETENSORS_FILE} nor {_BIN_FILE}: copy the weights into it"
    )


def _read_weights(path: Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The weight file's tensors; with `shapes_only`, meta tensors of their shapes (safetensors: from the
    header; .bin: memory-mapped, so no weight data is read). Only the safe loader is ever used."""
    try:
        if path.suffix == ".safetensors":
            if shapes_only:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}  # noqa: SIM118
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=shapes_only)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is refused by the safe loader ({refusal_reason(exc)}; only tensors are loaded): re-save "
            f"the weights as {_SAFETENSORS_FILE} or as a plain state dict"
        ) from None
    except Exception as exc:  # safetensors / zip / torch errors have no common base class
        raise CheckpointError(f"cannot read weights {path} ({type(exc).__name__}: {first_line(exc)}): the file is "
                              f"truncated or of another format; re-download it") from None
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict")
    return dict(state)


def _sha256(path: Path) -> str:
    """The weights' hash, remembered across runs while the file is unchanged (runner.driver.cache)."""
    from runner.driver.cache import cached_sha256

    return cached_sha256(path)[0]


def _checkpoint_state(
    raw: Mapping[str, torch.Tensor], model: nn.Module, source: Path
) -> dict[str, torch.Tensor]:
    """Map released names onto `model`: strip "bert." (DNABERT-2 BertForMaskedLM; DNABERT-S is a bare
    BertModel without it), drop the known heads/buffers, and fail on anything else that does not fit."""
    prefixed = any(k.startswith("bert.") for k in raw)
    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in raw.items():
        name = key[len("bert.") :] if prefixed and key.startswith("bert.") else key
        if name.startswith(_IGNORED_PREFIXES) or name in _IGNORED_KEYS:
            continue
        state[name] = value
    expected = model.state_dict()
    unexpected = sorted(k for k in state if k not in expected)
    missing = sorted(k for k in expected if k not in state)
    wrong = sorted(
        f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if wrong:
        problems.append("wrong shape: " + ", ".join(wrong))
    if problems:
        raise CheckpointError(
            f"{source} does not match the DNABERT (MosaicBERT) architecture; " + "; ".join(problems)
        )
    return state


def dnabert_codec(spec: str) -> DnabertCodec:
    """The codec of a hub name or local directory (downloads only the small text files)."""
    directory = _resolve_dir(spec, weights=False)
    config = read_config(directory)
    return DnabertCodec.from_file(directory / _TOKENIZER_FILE, max_tokens=token_limit(config))


def load_dnabert(spec: str) -> DnabertEmbedder:
    """FP32 model on the CPU, in eval mode, weights from a hub name or a local checkpoint directory."""
    directory = _resolve_dir(spec, weights=True)
    config = read_config(directory)
    codec = DnabertCodec.from_file(directory / _TOKENIZER_FILE, max_tokens=token_limit(config))
    weights = _weight_file(directory)
    model = DnabertEmbedder(
        config, codec=codec, name=spec, checkpoint=str(directory), checkpoint_sha256=_sha256(weights)
    )
    if codec.vocab_size > model.embeddings.word_embeddings.num_embeddings:
        raise CheckpointError(
            f"tokenizer.json has {codec.vocab_size} tokens but the model embeds only "
            f"{model.embeddings.word_embeddings.num_embeddings}"
        )
    state = _checkpoint_state(_read_weights(weights), model, weights)
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.eval()


def _parameter_count(config: Mapping[str, Any]) -> int:
    """Encoder weights implied by a config (embeddings + layers; no pooler or MLM head)."""
    d = _config_int(config, "hidden_size")
    inner = _config_int(config, "intermediate_size")
    vocab = _config_int(config, "vocab_size")
    types = _config_int(config, "type_vocab_size", 2)
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (2 * inner * d) + (inner * d + d) + 2 * d
    return vocab * d + types * d + 2 * d + _config_int(config, "num_hidden_layers") * per_layer


def dnabert_info(spec: str, compute_sha256: bool = False) -> ModelInfo:
    """What the manifest records, without loading weights: from config.json of a local directory or
    of an already cached hub snapshot, else from the released config (checkpoint "" until downloaded).
    `compute_sha256` fetches the weights if needed and hashes them (once, on the driver)."""
    checkpoint = ""
    sha256 = ""
    if compute_sha256:
        directory = _resolve_dir(spec, weights=True)
        config = read_config(directory)
        checkpoint = str(directory)
        sha256 = _sha256(_weight_file(directory))
    elif _is_hub_name(spec):
        config: dict[str, Any] = dict(RELEASED_CONFIG)
        try:
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(spec, allow_patterns=[_CONFIG_FILE], local_files_only=True))
            config = read_config(cached)
            checkpoint = str(cached)
        except Exception:  # not cached yet (or no hub client): the released shape is known
            pass
    else:
        directory = _resolve_dir(spec, weights=False)
        config = read_config(directory)
        checkpoint = str(directory)
    return ModelInfo(
        name=spec,
        family="dnabert",
        checkpoint=checkpoint,
        checkpoint_sha256=sha256,
        embed_dim=_config_int(config, "hidden_size"),
        num_layers=_config_int(config, "num_hidden_layers"),
        parameters=_parameter_count(config),
    )


def dnabert_preflight(spec: str) -> ModelInfo:
    """The cheap check before start-up (no Ray, no weights read): a local directory's config.json and
    tokenizer.json, and every weight's name and shape (safetensors header, or a memory-mapped .bin) against
    the MosaicBERT that config describes. A hub name not downloaded yet is checked when it is."""
    if _is_hub_name(spec):
        return dnabert_info(spec)
    directory = _resolve_dir(spec, weights=False)
    for name in (_CONFIG_FILE, _TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(
                f"{directory} has no {name}: a DNABERT directory needs {_CONFIG_FILE}, {_TOKENIZER_FILE} and "
                f"{_SAFETENSORS_FILE} (or {_BIN_FILE}); copy the missing file from the model's hub page"
            )
    config = read_config(directory)
    codec = DnabertCodec.from_file(directory / _TOKENIZER_FILE, max_tokens=token_limit(config))
    weights = _weight_file(directory)
    with torch.device("meta"):
        model = DnabertEmbedder(config, codec=codec, name=spec, checkpoint=str(directory))
    if codec.vocab_size > model.embeddings.word_embeddings.num_embeddings:
        raise CheckpointError(
            f"tokenizer.json has {codec.vocab_size} tokens but the model embeds only "
            f"{model.embeddings.word_embeddings.num_embeddings}"
        )
    _checkpoint_state(_read_weights(weights, shapes_only=True), model, weights)
    return model.info
