"""ESM-2 (fair-esm) behind the `runner` model interface, with a packed (varlen) forward.

The weights live in fair-esm's own `esm.model.esm2.ESM2` module, loaded from fair-esm's checkpoint files;
`ESM2Embedder.forward_packed` re-runs the same computation over a 1-D stream of concatenated sequences
(rotary positions restart at each sequence, attention never crosses sequences), so its hidden states
match `ESM2.forward(tokens_padded, repr_layers=[L])` token for token, without any padding.

Hugging Face transformers ESM-2 checkpoints (`facebook/esm2_*`, local `model_type: esm` directories) are renamed
onto the same fair-esm module by `runner.models.esm2_hf` and run through this very class.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from runner.driver.cache import cached_sha256
from runner.errors import CheckpointError, RunnerError
from runner.kernels.fp16x3 import SplitWeight
from runner.models.base import ModelInfo, ResidueCodec, uninitialised_weights
from runner.models.checkpoints import (
    download_esm2,
    hub_checkpoint_dir,
    load_fair_esm_checkpoint,
    name_list,
    regression_path,
)
from runner.models.esm2_layers import EAGER_PARTS, LayerMath, LayerWeights, layer_norm
from runner.models.layer_loop import LayerLoopEmbedder
from runner.models.rotary import default_inv_freq

logger = logging.getLogger(__name__)  # a child of "runner": actor-side, see runner.driver.console

# fair-esm's released ESM-2 models: name -> (layers, embedding dim, attention heads).
ESM2_MODELS: dict[str, tuple[int, int, int]] = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}

# Residue letters the ESM-1b alphabet tokenizes as ordinary tokens (20 standard + X B U Z O). Its '.' and
# '-' (gap) tokens are left out on purpose: they are alignment symbols, not residues of a sequence.
ESM2_RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO"

# fair-esm's token-dropout constant: 15% of tokens masked in training, 80% of those as <mask>.
_MASK_RATIO_TRAIN = 0.15 * 0.8

# State-dict entries the packed forward never reads, so a checkpoint may lack them:
# - contact_head.regression.*: shipped in the separate "-contact-regression.pt" file (contacts only);
# - rot_emb.inv_freq: the rotary frequencies; used where stored, fair-esm's formula (in fp32) otherwise;
# - lm_head.*: the masked-LM head (logits only).
_OPTIONAL_WEIGHTS = re.compile(
    r"^(contact_head\.regression\.|lm_head\.|layers\.\d+\.self_attn\.rot_emb\.inv_freq$)"
)
# fairseq bookkeeping entries some checkpoints carry; not weights of the module.
_IGNORED_EXTRA = re.compile(r"(^|\.)(version|_float_tensor)$")


def _alphabet() -> Any:
    """fair-esm's ESM-1b alphabet, which ESM-2 uses (imported lazily: CPU stages rarely need it)."""
    import esm

    return esm.data.Alphabet.from_architecture("ESM-1b")


class Esm2Codec(ResidueCodec):
    """Protein text -> ESM-2 token ids: <cls> residues <eos>, indices of fair-esm's ESM-1b alphabet."""

    max_residues = 1022  # 1024 positions minus <cls> and <eos>, as fair-esm's extraction scripts use
    model_name = "ESM-2"

    def __init__(self) -> None:
        alphabet = _alphabet()
        self.cls_idx = int(alphabet.cls_idx)
        self.eos_idx = int(alphabet.eos_idx)
        self.padding_idx = int(alphabet.padding_idx)
        super().__init__(ESM2_RESIDUES, alphabet.get_idx, self.cls_idx, self.eos_idx)


class ESM2Embedder(LayerLoopEmbedder):
    """fair-esm ESM-2 weights plus a packed forward over concatenated sequences (runner.models.layer_loop runs it
    over esm2_layers' parts). Layer L is fair-esm's `representations[L]`: the last layer after the final
    LayerNorm, the others before it."""

    eager_parts = EAGER_PARTS
    layers_name = "the ESM-2 layers"

    def __init__(self, esm_model: torch.nn.Module, info: ModelInfo) -> None:
        super().__init__()
        self.esm = esm_model  # esm.model.esm2.ESM2 holding the weights
        self.info = info
        self.codec = Esm2Codec()
        self.num_layers = int(esm_model.num_layers)
        self.num_heads = int(esm_model.attention_heads)
        self.head_dim = int(esm_model.embed_dim) // self.num_heads
        # The rotary frequencies the checkpoint stores (transformers' conversion insists on them: released
        # files may hold them rounded as in training), in float32 outside the module's buffers so that moving
        # the model to fp16 cannot round them again. Per device, copied on first use.
        self.rotary_inv_freq = _stored_inv_freq(esm_model, self.head_dim)  # float32 [hd/2]
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.esm.embed_tokens.weight

    @property
    def fused_gelu_in_use(self) -> bool:
        """fc1 and GELU as one cuBLASLt GEMM with a tanh-approximate GELU epilogue: saves a pass over the [T, 4D]
        activations (650M: 6 % of a forward on an H200), not fair-esm's erf GELU (|difference| <= 4.7e-4)."""
        weight = self.embedding_weight
        return self.fused_gelu and weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16)

    def build_layer_weights(self, split: Callable[[torch.Tensor], SplitWeight] | None) -> list[LayerWeights]:
        """Per layer, q/k/v fused into one projection (the module's q/k/v become views of it)."""
        return [LayerWeights.of(layer, split) for layer in self.esm.layers]

    def weights_location(self) -> int:
        """Where layer 0's q weight lives (after the fusion, a view of the fused q/k/v weight)."""
        return self.esm.layers[0].self_attn.q_proj.weight.data_ptr() if self.num_layers else 0

    def token_embeddings(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """fair-esm's scaled token embedding with its token-dropout rescaling: [T, D]."""
        esm_model = self.esm
        x = esm_model.embed_scale * esm_model.embed_tokens(tokens)  # [T, D]
        if esm_model.token_dropout:
            # fair-esm zeroes <mask> embeddings and rescales by (1 - 0.12) / (1 - observed mask ratio of the
            # sequence, over all its tokens). Without <mask> tokens this is a plain * 0.88.
            is_mask = tokens == esm_model.mask_idx  # [T]
            x = x.masked_fill(is_mask[:, None], 0.0)  # [T, D]
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=tokens.device, dtype=torch.long)  # [B]
            # output_size given: without it repeat_interleave waits for the GPU to learn the size (a host sync).
            seq_of_token = torch.repeat_interleave(
                torch.arange(lengths.numel(), device=tokens.device), lengths, output_size=tokens.shape[0]
            )  # [T]
            masked = torch.zeros(lengths.numel(), device=tokens.device, dtype=x.dtype)  # [B]
            masked.index_add_(0, seq_of_token, is_mask.to(x.dtype))
            observed = masked / lengths.to(x.dtype)  # [B]
            x = x * (1 - _MASK_RATIO_TRAIN) / (1 - observed)[seq_of_token][:, None]  # [T, D]
        return x

    def rotary_frequencies(self, device: torch.device) -> torch.Tensor:
        """`rotary_inv_freq` on `device` (float32 [hd/2]), copied there once."""
        inv_freq = self._inv_freq_on.get(device)
        if inv_freq is None:
            inv_freq = self._inv_freq_on[device] = self.rotary_inv_freq.to(device)
        return inv_freq

    def layer_math(self) -> LayerMath:
        return LayerMath(self.num_heads, self.fp32_layernorm, self.linear, self.fused_gelu_in_use)

    def last_layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.esm.emb_layer_norm_after
        return layer_norm(x, norm.weight, norm.bias, norm.eps, self.fp32_layernorm)  # [T, D]


def _stored_inv_freq(esm_model: torch.nn.Module, head_dim: int) -> torch.Tensor:
    """float32 [hd/2]: the rotary `inv_freq` every layer of the checkpoint holds (one table: the forward applies
    the same rotation in all layers), or fair-esm's formula where the module has none. CheckpointError if the
    layers disagree, since then no single rotation reproduces the model."""
    tables = [layer.self_attn.rot_emb.inv_freq.detach().float().cpu() for layer in esm_model.layers]
    if not tables:
        return default_inv_freq(head_dim)
    first = tables[0]
    if first.shape != (head_dim // 2,):
        raise CheckpointError(f"rotary inv_freq has shape {tuple(first.shape)}, expected ({head_dim // 2},)")
    differing = [i for i, t in enumerate(tables) if not torch.equal(t, first)]
    if differing:
        raise CheckpointError(
            f"the checkpoint's rotary inv_freq differs between layer 0 and layer(s) {differing[:5]}: runner applies "
            f"one rotary table to all layers, so it cannot reproduce this model"
        )
    return first.clone()


# ---------------------------------------------------------------------------------------------------
# Loading


def _known_names() -> str:
    return ", ".join(ESM2_MODELS)


def _resolve_spec(spec: str, download: bool) -> Path | None:
    """Local checkpoint file of a model name or .pt path (None for a name not downloaded when download=False)."""
    if spec in ESM2_MODELS:
        if download:
            return download_esm2(spec)
        cached = hub_checkpoint_dir() / f"{spec}.pt"
        return cached if cached.is_file() else None
    if spec.endswith(".pt"):
        return Path(spec).expanduser()
    raise RunnerError(
        f"model {spec} is not an ESM-2 model: use one of {_known_names()} or a path to a fair-esm .pt file"
    )


def _cfg_value(cfg: Any, key: str) -> Any:
    return cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)


def read_esm2_architecture(data: dict[str, Any], path: Path) -> tuple[int, int, int, bool]:
    """(layers, embed_dim, heads, token_dropout) from a checkpoint's cfg["model"], checked for sanity."""
    cfg = data.get("cfg")
    if cfg is None and "args" in data:
        raise CheckpointError(
            f"{path} is an ESM-1/ESM-1b/MSA-style checkpoint ('args', no 'cfg'): only ESM-2 checkpoints are supported"
        )
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model_cfg, (argparse.Namespace, dict)):
        raise CheckpointError(
            f"{path} has no cfg['model'] architecture section: give an official esm2_*.pt file"
        )
    fields = ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads", "token_dropout")
    missing = [f for f in fields if _cfg_value(model_cfg, f) is None]
    if missing:
        raise CheckpointError(
            f"{path} cfg['model'] lacks {', '.join(missing)}: give an official esm2_*.pt file"
        )
    layers, dim, heads = (_cfg_value(model_cfg, f) for f in fields[:3])
    if (
        not all(isinstance(v, int) and v > 0 for v in (layers, dim, heads))
        or dim % heads
        or (dim // heads) % 2
    ):
        raise CheckpointError(
            f"{path} cfg['model'] describes an impossible architecture (layers={layers}, dim={dim}, heads={heads})"
        )
    return int(layers), int(dim), int(heads), bool(_cfg_value(model_cfg, "token_dropout"))


def _upgrade_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """fairseq key names -> fair-esm module names: strip a leading "encoder.sentence_encoder." or "encoder."."""
    prefix = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
    return {prefix.sub("", name): value for name, value in state.items()}


def _build_esm2(layers: int, dim: int, heads: int, token_dropout: bool) -> torch.nn.Module:
    """fair-esm's ESM2 module with uninitialised weights (runner.models.base.uninitialised_weights): no random
    init and no memory until its weights are assigned; its names and shapes serve the pre-flight check."""
    from esm.model.esm2 import ESM2

    with uninitialised_weights():
        return ESM2(
            num_layers=layers,
            embed_dim=dim,
            attention_heads=heads,
            alphabet=_alphabet(),
            token_dropout=token_dropout,
        )


def _count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() counts the tied LM-head weight once


def check_esm2_weights(expected: dict[str, Any], state: dict[str, Any], path: Path) -> None:
    """CheckpointError naming missing, unexpected or wrong-shaped weights. Only names and shapes are read, so
    the state may be memory-mapped tensors (the pre-flight check reads no weight data)."""
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{path} state dict holds non-tensor entries: {name_list(not_tensors)}")
    missing = sorted(k for k in expected if k not in state and not _OPTIONAL_WEIGHTS.match(k))
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} weight(s) of the ESM-2 architecture in its cfg: {name_list(missing)}; "
            f"the file is incomplete or not an ESM-2 checkpoint"
        )
    unexpected = sorted(k for k in state if k not in expected and not _IGNORED_EXTRA.search(k))
    if unexpected:
        raise CheckpointError(
            f"{path} holds {len(unexpected)} weight(s) ESM-2 has no place for: {name_list(unexpected)}; "
            f"is it a fine-tuned or non-ESM-2 model?"
        )
    wrong_shape = sorted(
        k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if wrong_shape:
        first = wrong_shape[0]
        raise CheckpointError(
            f"{path}: {len(wrong_shape)} weight(s) do not match the architecture in its cfg, e.g. {first} is "
            f"{tuple(state[first].shape)} but should be {tuple(expected[first].shape)}: the cfg and weights disagree"
        )


def _assign_weights(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """Put checkpoint tensors into the module built by _build_esm2 (uninitialised); CheckpointError naming
    anything missing or odd."""
    expected = model.state_dict()  # names and shapes (the values are uninitialised)
    check_esm2_weights(expected, state, path)
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    # assign=True replaces parameters one by one, which unties the LM head from the embedding; re-tie it.
    model.lm_head.weight = model.embed_tokens.weight
    _materialise_absent(model, [k for k in expected if k not in state and k != "lm_head.weight"])


def _materialise_absent(model: torch.nn.Module, names: list[str]) -> None:
    """Give the optional entries a checkpoint lacked (`names`) real values (they are never read for embeddings)."""
    for name in names:
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        tensor = owner._parameters[attr] if attr in owner._parameters else owner._buffers[attr]
        if attr == "inv_freq":
            owner._buffers[attr] = default_inv_freq(tensor.shape[0] * 2)  # [hd/2]
        else:
            # Missing contact-regression or LM-head weights: zeros keep the module usable (logits/contacts
            # are meaningless, as fair-esm warns in the same situation).
            owner._parameters[attr] = torch.nn.Parameter(torch.zeros(tensor.shape), requires_grad=False)


def load_esm2_file(path: str | Path, name: str | None = None) -> ESM2Embedder:
    """ESM2Embedder from a fair-esm checkpoint file (CPU, float32, eval mode).

    The architecture comes from the checkpoint's cfg, never from the file name. A `<stem>-contact-regression.pt`
    file beside it is merged in when present and readable; it only matters for contact prediction.
    """
    p = Path(path).expanduser()
    data = load_fair_esm_checkpoint(p, mmap=True)
    layers, dim, heads, token_dropout = read_esm2_architecture(data, p)
    state = dict(data["model"])
    regression = regression_path(p)
    if regression.is_file():
        try:
            state.update(load_fair_esm_checkpoint(regression)["model"])
        except CheckpointError as e:
            logger.warning("ignoring contact-regression file (not needed for embeddings): %s", e)
    model = _build_esm2(layers, dim, heads, token_dropout)
    parameters = _count_parameters(model)
    _assign_weights(model, _upgrade_state_dict(state), p)
    model = model.float().eval().requires_grad_(False)
    info = ModelInfo(
        name=name or str(path),
        family="esm2",
        checkpoint=str(p.resolve()),
        checkpoint_sha256="",
        embed_dim=dim,
        num_layers=layers,
        parameters=parameters,
    )
    logger.info(
        "loaded ESM-2 %s: %d layers, dim %d, %d heads, %d parameters",
        info.name,
        layers,
        dim,
        heads,
        parameters,
    )
    return ESM2Embedder(model, info)


def load_esm2(spec: str) -> ESM2Embedder:
    """ESM2Embedder for a fair-esm model name (downloaded into torch hub's cache if needed) or a .pt path, or a
    transformers ESM-2 (hub name or directory: runner.models.esm2_hf)."""
    from runner.models.esm2_hf import is_hf_esm2_spec, load_hf_esm2

    if is_hf_esm2_spec(spec):
        return load_hf_esm2(spec)
    path = _resolve_spec(spec, download=True)
    if path is None:  # unreachable: download=True always yields a path
        raise CheckpointError(f"could not locate the checkpoint of {spec}")
    return load_esm2_file(path, name=spec)


def esm2_codec(spec: str) -> Esm2Codec:
    """The codec of an ESM-2 model (no weights read); checks that the name or file exists."""
    from runner.models.esm2_hf import hf_esm2_codec, is_hf_esm2_spec

    if is_hf_esm2_spec(spec):
        return hf_esm2_codec(spec)
    path = _resolve_spec(spec, download=False)
    if path is not None and spec not in ESM2_MODELS and not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} not found: check the path, or give a known model name such as esm2_t33_650M_UR50D"
        )
    return Esm2Codec()


def esm2_info(spec: str, compute_sha256: bool = False) -> ModelInfo:
    """What the manifest records about an ESM-2 model, without loading its weights.

    Known names use the published architecture (checkpoint "" when not downloaded yet); files are read
    memory-mapped for their cfg only. `compute_sha256` downloads a known name's file if needed and hashes
    it (seconds per GB: do it once, on the driver, which also leaves the file cached for actors on its node).
    """
    from runner.models.esm2_hf import hf_esm2_info, is_hf_esm2_spec

    if is_hf_esm2_spec(spec):
        return hf_esm2_info(spec, compute_sha256=compute_sha256)
    path = _resolve_spec(spec, download=compute_sha256)
    if spec in ESM2_MODELS:
        layers, dim, heads = ESM2_MODELS[spec]
        token_dropout = True
    elif path is None:  # unreachable: _resolve_spec returns a path for every non-name spec
        raise CheckpointError(f"could not locate the checkpoint of {spec}")
    else:
        data = load_fair_esm_checkpoint(path, mmap=True)
        layers, dim, heads, token_dropout = read_esm2_architecture(data, path)
    parameters = _count_parameters(_build_esm2(layers, dim, heads, token_dropout))
    exists = path is not None and path.is_file()
    return ModelInfo(
        name=spec,
        family="esm2",
        checkpoint=str(path.resolve()) if exists else "",
        checkpoint_sha256=cached_sha256(path)[0] if exists and compute_sha256 else "",
        embed_dim=dim,
        num_layers=layers,
        parameters=parameters,
    )


def esm2_preflight(spec: str) -> ModelInfo:
    """The cheap check before start-up (no Ray, no weights read): for a .pt file, its cfg and every weight's
    name and shape (memory-mapped: torch reads the pickle, not the tensor data) against the ESM-2 that cfg
    describes; for a known name, the published architecture (its weights are checked when downloaded).
    A transformers ESM-2 (hub name or directory) is checked by runner.models.esm2_hf."""
    from runner.models.esm2_hf import hf_esm2_preflight, is_hf_esm2_spec

    if is_hf_esm2_spec(spec):
        return hf_esm2_preflight(spec)
    if spec in ESM2_MODELS:
        return esm2_info(spec)
    path = Path(spec).expanduser()
    data = load_fair_esm_checkpoint(path, mmap=True)
    layers, dim, heads, token_dropout = read_esm2_architecture(data, path)
    model = _build_esm2(layers, dim, heads, token_dropout)
    check_esm2_weights(model.state_dict(), _upgrade_state_dict(dict(data["model"])), path)
    return ModelInfo(
        name=spec,
        family="esm2",
        checkpoint=str(path.resolve()),
        checkpoint_sha256="",
        embed_dim=dim,
        num_layers=layers,
        parameters=_count_parameters(model),
    )
