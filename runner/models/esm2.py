"""ESM-2 (fair-esm) behind the `runner` model interface, with a packed (varlen) forward.

The weights live in fair-esm's own `esm.model.esm2.ESM2` module, loaded from fair-esm's checkpoint files;
`ESM2Embedder.forward_packed` re-runs the same computation over a 1-D stream of concatenated sequences
(rotary positions restart at each sequence, attention never crosses sequences), so its hidden states
match `ESM2.forward(tokens_padded, repr_layers=[L])` token for token, without any padding.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from runner.attention import plan_attention, select_backend, varlen_attention
from runner.errors import CheckpointError, RunnerError
from runner.models.base import EmbeddingModel, ModelInfo, SequenceCodec
from runner.models.checkpoints import (
    download_esm2,
    hub_checkpoint_dir,
    load_fair_esm_checkpoint,
    regression_path,
    sha256_file,
)
from runner.models.fp16x3 import SplitLinear, SplitWeight

logger = logging.getLogger("runner")

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
# - rot_emb.inv_freq: a deterministic buffer (recomputed here in fp32);
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


class Esm2Codec(SequenceCodec):
    """Protein text -> ESM-2 token ids: <cls> residues <eos>, indices of fair-esm's ESM-1b alphabet."""

    kind = "protein"
    max_residues = 1022  # 1024 positions minus <cls> and <eos>, as fair-esm's extraction scripts use
    special_start = 1  # <cls>
    special_end = 1  # <eos>
    default_pooling = "mean"

    def __init__(self) -> None:
        alphabet = _alphabet()
        self.cls_idx = int(alphabet.cls_idx)
        self.eos_idx = int(alphabet.eos_idx)
        self.padding_idx = int(alphabet.padding_idx)
        self._valid = frozenset(ESM2_RESIDUES)
        lut = np.full(256, -1, dtype=np.int32)  # byte -> token id, -1 for bytes the model cannot embed
        for ch in ESM2_RESIDUES:
            lut[ord(ch)] = alphabet.get_idx(ch)
        self._lut = lut

    def clean(self, raw: str) -> str:
        """Whitespace removed, uppercased, one trailing stop codon '*' dropped."""
        seq = "".join(raw.split()).upper()
        return seq[:-1] if seq.endswith("*") else seq

    def invalid_characters(self, seq: str) -> str:
        """Sorted distinct characters outside ESM2_RESIDUES ('' when the sequence is embeddable)."""
        return "".join(sorted(set(seq) - self._valid))

    def encode(self, seq: str) -> np.ndarray:
        """int32 [n + 2]: <cls>, one token per residue, <eos>."""
        bad = self.invalid_characters(seq)
        if bad:
            raise RunnerError(f"sequence contains characters ESM-2 cannot embed: {bad}")
        residues = self._lut[np.frombuffer(seq.encode("ascii"), dtype=np.uint8)]  # [n]
        out = np.empty(len(seq) + 2, dtype=np.int32)  # [n + 2]
        out[0] = self.cls_idx
        out[1:-1] = residues
        out[-1] = self.eos_idx
        return out


class ESM2Embedder(EmbeddingModel):
    """fair-esm ESM-2 weights plus a packed forward over concatenated sequences."""

    fp32_layernorm: bool = False  # run every LayerNorm in float32 (then cast back) for fp16 robustness

    def __init__(self, esm_model: torch.nn.Module, info: ModelInfo) -> None:
        super().__init__()
        self.esm = esm_model  # esm.model.esm2.ESM2 holding the weights
        self.info = info
        self.codec = Esm2Codec()
        self.attention_backend = "exact"
        self.linear = F.linear  # every projection goes through this (see EmbeddingModel.emulate_fp32)
        self.compiled: LayerParts | None = None  # torch.compile'd halves of esm2_layer, or None (eager)
        # Per layer, its weights with the projections pre-split for FP16x3/BF16x3 (see emulate_fp32), or None.
        self.split_weights: list[LayerWeights] | None = None
        self.num_layers = int(esm_model.num_layers)
        self.num_heads = int(esm_model.attention_heads)
        self.head_dim = int(esm_model.embed_dim) // self.num_heads

    def select_attention(self, device: torch.device) -> str:
        """Fastest non-ALiBi kernel for `device` and the current weight dtype (call after moving the model)."""
        dtype = self.esm.embed_tokens.weight.dtype
        self.attention_backend = select_backend(torch.device(device), alibi=False, dtype=dtype, head_dim=self.head_dim)
        return self.attention_backend

    @property
    def compiling(self) -> bool:
        return self.compiled is not None

    def emulate_fp32(self, math: str) -> None:
        """As EmbeddingModel.emulate_fp32; for the split maths the projection weights are split once here,
        so the (compiled) layers receive plain tensors instead of looking splits up per call."""
        super().emulate_fp32(math)
        if not isinstance(self.linear, SplitLinear):
            self.split_weights = None
            return

        prepare = self.linear.split  # not its cached `prepare`: the fused q/k/v weight is a temporary
        self.split_weights = []
        for layer_module in self.esm.layers:
            w = LayerWeights.of(layer_module)
            self.split_weights.append(w._replace(
                out_weight=prepare(w.out_weight), fc1_weight=prepare(w.fc1_weight), fc2_weight=prepare(w.fc2_weight),
                qkv_weight=prepare(torch.cat((w.q_weight, w.k_weight, w.v_weight))),  # [3D, D]
                qkv_bias=torch.cat((w.q_bias, w.k_bias, w.v_bias)),  # [3D]
            ))

    def use_compile(self, on: bool, backend: str | Callable[..., Any] = "inductor") -> bool:
        """Run each layer's two halves (around attention) through `torch.compile`: LayerNorm, rotary, GELU and
        the residual adds become fused kernels around the matmuls (one compile for all layers and all batch
        shapes, see `compile_over_tokens`). Falls back to eager, with a warning, if compiling fails.
        `backend`: torch.compile's backend (tests pass one that records the graphs)."""
        if on:
            self.compiled = tuple(compile_over_tokens(part, backend) for part in EAGER_PARTS)  # type: ignore[assignment]
        else:
            self.compiled = None
        return on

    @torch.no_grad()
    def forward_packed(
        self,
        tokens: torch.Tensor,  # int64 [T] token ids of all sequences, concatenated
        positions: torch.Tensor,  # int64 [T] position of each token inside its own sequence
        cu_seqlens: torch.Tensor,  # int32 [B+1] offsets of each sequence in `tokens`
        max_seqlen: int,  # longest sequence in the batch, in tokens
        layer: int,  # representation layer: 0 = embeddings, num_layers or -1 = last
    ) -> torch.Tensor:
        """Hidden states of `layer` for every token, [T, D] in the weights' dtype (fair-esm's numerics)."""
        target = self.resolve_layer(layer)
        esm_model = self.esm
        tokens = tokens.long()

        x = esm_model.embed_scale * esm_model.embed_tokens(tokens)  # [T, D]
        if esm_model.token_dropout:
            # fair-esm zeroes <mask> embeddings and rescales by (1 - 0.12) / (1 - observed mask ratio of the
            # sequence, over all its tokens). Without <mask> tokens this is a plain * 0.88.
            is_mask = tokens == esm_model.mask_idx  # [T]
            x = x.masked_fill(is_mask[:, None], 0.0)  # [T, D]
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=tokens.device, dtype=torch.long)  # [B]
            seq_of_token = torch.repeat_interleave(
                torch.arange(lengths.numel(), device=tokens.device), lengths
            )  # [T]
            masked = torch.zeros(lengths.numel(), device=tokens.device, dtype=x.dtype)  # [B]
            masked.index_add_(0, seq_of_token, is_mask.to(x.dtype))
            observed = masked / lengths.to(x.dtype)  # [B]
            x = x * (1 - _MASK_RATIO_TRAIN) / (1 - observed)[seq_of_token][:, None]  # [T, D]
        if target == 0:
            return x

        cos, sin = rotary_tables(positions.to(tokens.device), self.head_dim)  # [T, 1, hd] each
        cu = cu_seqlens.to(device=tokens.device, dtype=torch.int32)  # [B+1]
        plan = plan_attention(cu, x.shape[0], self.attention_backend, x.device)  # once for all layers
        for index, layer_module in enumerate(esm_model.layers[:target]):
            weights = self.split_weights[index] if self.split_weights else LayerWeights.of(layer_module)
            x = self._run_layer(weights, x, cos, sin, cu, max_seqlen, plan)  # [T, D]
        if target == self.num_layers:
            # fair-esm reports the last layer after the final LayerNorm.
            norm = esm_model.emb_layer_norm_after
            x = layer_norm(x, norm.weight, norm.bias, norm.eps, self.fp32_layernorm)  # [T, D]
        return x

    def _run_layer(
        self,
        weights: LayerWeights,  # of one fair-esm TransformerLayer
        x: torch.Tensor,  # [T, D]
        cos: torch.Tensor,  # float32 [T, 1, hd]
        sin: torch.Tensor,  # float32 [T, 1, hd]
        cu: torch.Tensor,  # int32 [B+1]
        max_seqlen: int,
        plan: Any,  # runner.attention.plan_attention's per-batch state
    ) -> torch.Tensor:
        """One transformer layer, through the compiled parts when `compile` is on (eager otherwise)."""
        args = (x, weights, cos, sin, cu, max_seqlen, self.num_heads,
                self.attention_backend, self.fp32_layernorm, self.linear, plan)
        if self.compiled is None:
            return esm2_layer(*args)
        try:
            return esm2_layer(*args, parts=self.compiled)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # inductor and dynamo raise many types; eager decides whether it is ours
            out = esm2_layer(*args)  # a real error of the inputs raises here too, and propagates
            logger.warning("torch.compile failed for the ESM-2 layer (%s: %s): running eager from now on",
                           type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            self.compiled = None
            return out


class LayerWeights(NamedTuple):
    """The tensors of one fair-esm TransformerLayer, so the layer math is a plain function of tensors.

    Under FP16x3/BF16x3 (the shadow) the out/fc1/fc2 weights are `runner.models.fp16x3.SplitWeight`s and
    q/k/v come fused as one `qkv_weight`.
    """

    attn_norm_weight: torch.Tensor  # [D]
    attn_norm_bias: torch.Tensor  # [D]
    attn_norm_eps: float
    q_weight: torch.Tensor  # [D, D]
    q_bias: torch.Tensor  # [D]
    k_weight: torch.Tensor  # [D, D]
    k_bias: torch.Tensor  # [D]
    v_weight: torch.Tensor  # [D, D]
    v_bias: torch.Tensor  # [D]
    out_weight: torch.Tensor  # [D, D]
    out_bias: torch.Tensor  # [D]
    scaling: float  # head_dim ** -0.5, fair-esm's query scaling
    mlp_norm_weight: torch.Tensor  # [D]
    mlp_norm_bias: torch.Tensor  # [D]
    mlp_norm_eps: float
    fc1_weight: torch.Tensor  # [4D, D]
    fc1_bias: torch.Tensor  # [4D]
    fc2_weight: torch.Tensor  # [D, 4D]
    fc2_bias: torch.Tensor  # [D]
    # q, k and v projections as one [3D, D] product (the shadow's split weights): one split of the input
    # and one GEMM instead of three. None: the three projections above.
    qkv_weight: SplitWeight | None = None  # of [3D, D]
    qkv_bias: torch.Tensor | None = None  # [3D]

    @classmethod
    def of(cls, layer: Any) -> LayerWeights:
        attn, ln1, ln2 = layer.self_attn, layer.self_attn_layer_norm, layer.final_layer_norm
        return cls(
            ln1.weight, ln1.bias, float(ln1.eps),
            attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias,
            attn.v_proj.weight, attn.v_proj.bias, attn.out_proj.weight, attn.out_proj.bias, float(attn.scaling),
            ln2.weight, ln2.bias, float(ln2.eps),
            layer.fc1.weight, layer.fc1.bias, layer.fc2.weight, layer.fc2.bias,
        )


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, fp32: bool) -> torch.Tensor:
    """LayerNorm over the last dim; in float32 when `fp32` (the variance of fp16 activations can overflow)."""
    if not fp32 or x.dtype == torch.float32:
        return F.layer_norm(x, weight.shape, weight, bias, eps)
    return F.layer_norm(x.float(), weight.shape, weight.float(), bias.float(), eps).to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of fair-esm's rotary embedding at each token's own position: float32 [T, 1, hd]."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim  # [hd/2]
    inv_freq = 1.0 / (10000**exponents)  # [hd/2]
    freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [T, hd/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [T, hd]: fair-esm duplicates, not interleaves
    return angles.cos()[:, None, :], angles.sin()[:, None, :]  # [T, 1, hd] each


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) computed in float32, returned in x's dtype.

    Eager this is several passes over [T, H, hd] in float32; compiled it is one fused kernel.
    """
    xf = x.float()  # [T, H, hd]
    x1, x2 = xf.chunk(2, dim=-1)  # [T, H, hd/2] each
    rotated = torch.cat((-x2, x1), dim=-1)  # [T, H, hd]
    return (xf * cos + rotated * sin).to(x.dtype)  # [T, H, hd]


def attention_inputs(
    x: torch.Tensor,  # [T, D] residual stream
    w: LayerWeights,
    cos: torch.Tensor,  # float32 [T, 1, hd]
    sin: torch.Tensor,  # float32 [T, 1, hd]
    heads: int,
    fp32_layernorm: bool,
    linear: Callable[..., torch.Tensor],  # F.linear, or FP32-accurate emulation for the shadow
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-LN, q/k/v projections and rotary positions of one layer: q, k, v [T, H, hd]."""
    h = layer_norm(x, w.attn_norm_weight, w.attn_norm_bias, w.attn_norm_eps, fp32_layernorm)  # [T, D]
    if w.qkv_weight is not None:
        qkv = linear(h, w.qkv_weight, w.qkv_bias).unflatten(-1, (3, heads, -1))  # [T, 3, H, hd]
        q, k, v = qkv.unbind(1)  # [T, H, hd] each
    else:
        q = linear(h, w.q_weight, w.q_bias).unflatten(-1, (heads, -1))  # [T, H, hd]
        k = linear(h, w.k_weight, w.k_bias).unflatten(-1, (heads, -1))  # [T, H, hd]
        v = linear(h, w.v_weight, w.v_bias).unflatten(-1, (heads, -1))  # [T, H, hd]
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def attention_output_and_mlp(
    x: torch.Tensor,  # [T, D] residual stream
    o: torch.Tensor,  # [T, H, hd] attention output
    w: LayerWeights,
    fp32_layernorm: bool,
    linear: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Output projection and residual, then the pre-LN GELU MLP and residual: the next x [T, D]."""
    x = x + linear(o.flatten(1), w.out_weight, w.out_bias)  # [T, D]
    h = layer_norm(x, w.mlp_norm_weight, w.mlp_norm_bias, w.mlp_norm_eps, fp32_layernorm)  # [T, D]
    h = linear(F.gelu(linear(h, w.fc1_weight, w.fc1_bias)), w.fc2_weight, w.fc2_bias)  # [T, D]; erf GELU
    return x + h  # [T, D]


# The two halves of a layer around its attention kernel, as plain functions (torch.compile'd on GPUs).
# The attention call stays outside: its int max_seqlen would otherwise specialise the graph per batch.
LayerParts = tuple[Callable[..., Any], Callable[..., Any]]
EAGER_PARTS: LayerParts = (attention_inputs, attention_output_and_mlp)


def compile_over_tokens(part: Callable[..., Any], backend: str | Callable[..., Any] = "inductor") -> Callable[..., Any]:
    """`part` compiled with only the token dimension symbolic: dim 0 of its tensor arguments (x, cos, sin, o).

    `dynamic=True` would make every size symbolic, the weights' included (they are arguments): inductor's
    fused kernels then divide indices by a runtime head width and loop over rows of unknown length. Marking
    the token dimension on every call keeps one compile for every batch size with all other sizes static.
    """
    compiled = torch.compile(part, backend=backend)

    def call(*args: Any) -> Any:
        for arg in args:
            if isinstance(arg, torch.Tensor):
                torch._dynamo.maybe_mark_dynamic(arg, 0)
        return compiled(*args)

    return call


def esm2_layer(
    x: torch.Tensor,  # [T, D] residual stream
    w: LayerWeights,
    cos: torch.Tensor,  # float32 [T, 1, hd]
    sin: torch.Tensor,  # float32 [T, 1, hd]
    cu: torch.Tensor,  # int32 [B+1]
    max_seqlen: int,
    heads: int,
    backend: str,  # attention kernel (runner.attention.BACKENDS)
    fp32_layernorm: bool,
    linear: Callable[..., torch.Tensor],  # F.linear, or FP32-accurate emulation for the shadow
    plan: Any = None,  # runner.attention.plan_attention's per-batch state (None: built by the kernel)
    parts: LayerParts = EAGER_PARTS,
) -> torch.Tensor:
    """One fair-esm TransformerLayer (pre-LN attention with rotary, pre-LN GELU MLP) over packed tokens."""
    first, rest = parts
    q, k, v = first(x, w, cos, sin, heads, fp32_layernorm, linear)  # [T, H, hd] each
    # fair-esm multiplies q by `scaling` before the rotation; rotation is linear, so scaling inside the
    # kernel (in fp32) is the same computation with one rounding fewer.
    o = varlen_attention(q, k, v, cu, max_seqlen, w.scaling, backend, plan=plan)  # [T, H, hd]
    return rest(x, o, w, fp32_layernorm, linear)  # [T, D]


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


def _name_list(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _build_esm2(layers: int, dim: int, heads: int, token_dropout: bool) -> torch.nn.Module:
    """fair-esm's ESM2 module on the meta device: no memory and no random init until weights are assigned."""
    from esm.model.esm2 import ESM2

    with torch.device("meta"):
        return ESM2(
            num_layers=layers,
            embed_dim=dim,
            attention_heads=heads,
            alphabet=_alphabet(),
            token_dropout=token_dropout,
        )


def _count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() counts the tied LM-head weight once


def _assign_weights(model: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """Put checkpoint tensors into the meta-built module; CheckpointError naming anything missing or odd."""
    expected = model.state_dict()  # meta tensors: names and shapes
    not_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise CheckpointError(f"{path} state dict holds non-tensor entries: {_name_list(not_tensors)}")
    missing = sorted(k for k in expected if k not in state and not _OPTIONAL_WEIGHTS.match(k))
    if missing:
        raise CheckpointError(
            f"{path} lacks {len(missing)} weight(s) of the ESM-2 architecture in its cfg: {_name_list(missing)}; "
            f"the file is incomplete or not an ESM-2 checkpoint"
        )
    unexpected = sorted(k for k in state if k not in expected and not _IGNORED_EXTRA.search(k))
    if unexpected:
        raise CheckpointError(
            f"{path} holds {len(unexpected)} weight(s) ESM-2 has no place for: {_name_list(unexpected)}; "
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
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False, assign=True)
    # assign=True replaces parameters one by one, which unties the LM head from the embedding; re-tie it.
    model.lm_head.weight = model.embed_tokens.weight
    _materialise_absent(model)


def _materialise_absent(model: torch.nn.Module) -> None:
    """Give the optional entries a checkpoint lacked real values (they are never read for embeddings)."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not tensor.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr == "inv_freq":
            dim = tensor.shape[0] * 2
            owner._buffers[attr] = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
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
    """ESM2Embedder for a fair-esm model name (downloaded into torch hub's cache if needed) or a .pt path."""
    path = _resolve_spec(spec, download=True)
    if path is None:  # unreachable: download=True always yields a path
        raise CheckpointError(f"could not locate the checkpoint of {spec}")
    return load_esm2_file(path, name=spec)


def esm2_codec(spec: str) -> Esm2Codec:
    """The codec of an ESM-2 model (no weights read); checks that the name or file exists."""
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
        checkpoint_sha256=sha256_file(path) if exists and compute_sha256 else "",
        embed_dim=dim,
        num_layers=layers,
        parameters=parameters,
    )
