"""ESM C (EvolutionaryScale, now Biohub) behind the `runner` model interface, with a packed (varlen) forward.

The architecture, as transformers' `EsmcModel` and EvolutionaryScale's `esm.models.esmc.ESMC` compute it:
- token embedding (vocabulary of 64 rows, 33 of them used), no position embedding, no token dropout;
- per block, pre-LayerNorm (with bias) -> one bias-free projection to q|k|v -> LayerNorm (no bias) over the
  full width of q and of k -> rotary positions (rotate-half, base 10000) on 64-wide heads -> attention ->
  bias-free output projection, added as `x + out / s`; then pre-LayerNorm (with bias) -> one bias-free
  projection to gate|up -> SwiGLU silu(gate) * up -> bias-free down projection, added as `x + down / s`,
  with the residual scaling s = sqrt(layers / 36);
- a final LayerNorm without bias: transformers' `last_hidden_state`.

Layer L here is transformers' `hidden_states[L]`: 0 the embeddings, 1..n-1 the blocks' outputs, n the output
after the final LayerNorm. The weights come from a transformers directory or an original `.pth` state dict
(runner.models.esmc_checkpoints); this module holds the tokenizer, the weights and the packed forward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from runner.kernels.fp16x3 import SplitWeight
from runner.models.base import ModelInfo, ResidueCodec
from runner.models.layer_loop import LayerLoopEmbedder, LayerParts
from runner.models.rotary import default_inv_freq, rotate

logger = logging.getLogger(__name__)  # a child of "runner": actor-side, see runner.driver.console

# ESM C's sequence vocabulary (EvolutionaryScale's `SEQUENCE_VOCAB`, transformers' EsmcTokenizer): token id =
# index. The checkpoints' embedding has 64 rows; ids 33-63 are never produced.
ESMC_VOCAB: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>",
    "L", "A", "G", "V", "S", "E", "R", "T", "I", "D", "P", "K", "Q", "N", "F", "Y", "M", "H", "W", "C",
    "X", "B", "U", "Z", "O", ".", "-", "|", "<mask>",
)
BOS_ID, PAD_ID, EOS_ID, MASK_ID = 0, 1, 2, 32

# Characters a sequence may hold: the 25 residue letters and `|`, the chain break of multi-chain inputs (one
# token like a residue, as ESM C's own tokenizer makes it). The alignment symbols '.' and '-' are left out on
# purpose: they are not residues of a sequence.
ESMC_RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO|"

HEAD_DIM = 64  # every ESM C checkpoint has 64-wide heads (300M: 15 heads of 960, 600M: 18 of 1152, 6B: 40 of 2560)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which both reference implementations use everywhere


@dataclass(frozen=True)
class EsmcArchitecture:
    """The shape of an ESM C model: all a checkpoint must agree with."""

    layers: int  # transformer blocks
    dim: int  # model width (d_model / hidden_size)
    heads: int  # attention heads, dim // heads wide
    ffn_dim: int  # SwiGLU width: the gate and the up projection each make this many channels
    vocab: int = 64  # rows of the token embedding
    rope_theta: float = 10000.0  # rotary base
    max_positions: int = 2048  # longest window in tokens the model was trained on (BOS and EOS included)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def residual_scale(self) -> float:
        """ESM3/ESM C's residual scaling: each branch is divided by sqrt(layers / 36) before it is added."""
        return math.sqrt(self.layers / 36)

    def problems(self) -> list[str]:
        """What makes this shape impossible (empty when it is fine)."""
        found = []
        if min(self.layers, self.dim, self.heads, self.ffn_dim, self.vocab) <= 0:
            found.append("every size must be positive")
        elif self.dim % self.heads or self.head_dim % 2:
            found.append(f"width {self.dim} does not split into {self.heads} heads of an even width")
        if self.vocab < len(ESMC_VOCAB):
            found.append(f"the embedding has {self.vocab} rows, fewer than ESM C's {len(ESMC_VOCAB)} tokens")
        return found

    def parameters(self) -> int:
        """Weights of the encoder (embedding, blocks, final norm; no language-model head)."""
        d, f = self.dim, self.ffn_dim
        block = 2 * d + 3 * d * d + 2 * d + d * d + 2 * d + 2 * f * d + f * d
        return self.vocab * d + self.layers * block + d


# The released models: EvolutionaryScale's `esm.pretrained` builds them with these sizes, and the SwiGLU width
# is 8/3 * dim rounded up to a multiple of 256 (`swiglu_correction_fn`).
ESMC_ARCHITECTURES: dict[str, EsmcArchitecture] = {
    "esmc_300m": EsmcArchitecture(layers=30, dim=960, heads=15, ffn_dim=2560),
    "esmc_600m": EsmcArchitecture(layers=36, dim=1152, heads=18, ffn_dim=3072),
}


class EsmcCodec(ResidueCodec):
    """Protein text -> ESM C token ids: <cls> residues <eos>, with `|` as the chain-break token (one token like a
    residue, so chunked windows still line up residue by residue). The default pooling, the mean over the
    residues with <cls> and <eos> left out, is what the ESM C maintainers advise for a sequence vector."""

    model_name = "ESM C"

    def __init__(self, max_positions: int = 2048) -> None:
        self.max_residues = max_positions - 2  # the training context minus <cls> and <eos>
        super().__init__(ESMC_RESIDUES, ESMC_VOCAB.index, BOS_ID, EOS_ID)


# ---------------------------------------------------------------------------------------------------
# The modules that hold the weights (names are runner's own: runner.models.esmc_checkpoints maps both
# released layouts onto them in one table)


class EsmcBlock(nn.Module):
    """The weights of one ESM C block, q/k/v and gate/up each fused into one projection as in the original."""

    def __init__(self, arch: EsmcArchitecture) -> None:
        super().__init__()
        d, f = arch.dim, arch.ffn_dim
        self.attn_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)  # pre-attention LayerNorm, with bias
        self.qkv = nn.Linear(d, 3 * d, bias=False)  # q | k | v
        self.q_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS, bias=False)  # over the full width, before the heads split
        self.k_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.ffn_norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)  # pre-MLP LayerNorm, with bias
        self.gate_up = nn.Linear(d, 2 * f, bias=False)  # gate | up
        self.down = nn.Linear(f, d, bias=False)


class LayerWeights(NamedTuple):
    """The tensors of one block, so the block's math is a plain function of tensors (compilable).

    Under the shadow's FP16x3/BF16x3 maths the projection weights are `runner.kernels.fp16x3.SplitWeight`s.
    """

    attn_norm_weight: torch.Tensor  # [D]
    attn_norm_bias: torch.Tensor  # [D]
    qkv_weight: torch.Tensor | SplitWeight  # [3D, D]
    q_norm_weight: torch.Tensor  # [D]
    k_norm_weight: torch.Tensor  # [D]
    out_weight: torch.Tensor | SplitWeight  # [D, D]
    ffn_norm_weight: torch.Tensor  # [D]
    ffn_norm_bias: torch.Tensor  # [D]
    gate_up_weight: torch.Tensor | SplitWeight  # [2F, D]
    down_weight: torch.Tensor | SplitWeight  # [D, F]
    scaling: float  # head_dim ** -0.5, the query scaling (applied inside the attention kernel)

    @classmethod
    def of(cls, block: EsmcBlock, head_dim: int,
           split: Callable[[torch.Tensor], SplitWeight] | None = None) -> LayerWeights:
        """The weights of `block`; with `split`, every projection passed through it (the shadow's split maths)."""
        prepare = split or (lambda weight: weight)
        return cls(
            block.attn_norm.weight, block.attn_norm.bias, prepare(block.qkv.weight),
            block.q_norm.weight, block.k_norm.weight, prepare(block.out.weight),
            block.ffn_norm.weight, block.ffn_norm.bias, prepare(block.gate_up.weight), prepare(block.down.weight),
            head_dim**-0.5,
        )


class LayerMath(NamedTuple):
    """How every block computes, shared by all blocks of a forward (constants to torch.compile)."""

    heads: int  # attention heads
    residual_scale: float  # each residual branch is divided by this (sqrt(layers / 36))
    fp32_layernorm: bool  # LayerNorm in float32 inside a half-precision model
    linear: Callable[..., torch.Tensor]  # F.linear, or FP32-accurate emulation for the shadow


# ---------------------------------------------------------------------------------------------------
# The block math over packed tokens, cut around the attention kernel as runner.models.layer_loop runs it:
# compiled, the residual add of a block and the LayerNorms of the next become fused kernels.


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fp32: bool) -> torch.Tensor:
    """LayerNorm over the last dim; in float32 when `fp32` (the variance of fp16 activations can overflow)."""
    if not fp32 or x.dtype == torch.float32:
        return F.layer_norm(x, weight.shape, weight, bias, LAYER_NORM_EPS)
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), weight.shape, weight.float(), b, LAYER_NORM_EPS).to(x.dtype)


def attention_inputs(
    x: torch.Tensor,  # [T, D] residual stream
    w: LayerWeights,
    cos: torch.Tensor,  # float32 [T, 1, hd]
    sin: torch.Tensor,  # float32 [T, 1, hd]
    math: LayerMath,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-LN, q/k/v projection, q/k LayerNorms and rotary positions of one block: q, k, v [T, H, hd]."""
    h = layer_norm(x, w.attn_norm_weight, w.attn_norm_bias, math.fp32_layernorm)  # [T, D]
    q, k, v = math.linear(h, w.qkv_weight, None).chunk(3, dim=-1)  # [T, D] each
    q = layer_norm(q, w.q_norm_weight, None, math.fp32_layernorm).unflatten(-1, (math.heads, -1))  # [T, H, hd]
    k = layer_norm(k, w.k_norm_weight, None, math.fp32_layernorm).unflatten(-1, (math.heads, -1))  # [T, H, hd]
    return rotate(q, cos, sin), rotate(k, cos, sin), v.unflatten(-1, (math.heads, -1))


def attention_output_and_mlp(
    x: torch.Tensor,  # [T, D] residual stream
    o: torch.Tensor,  # [T, H, hd] attention output
    w: LayerWeights,
    math: LayerMath,
) -> torch.Tensor:
    """Output projection and scaled residual, then the pre-LN SwiGLU MLP and scaled residual: the next x [T, D]."""
    x = x + math.linear(o.flatten(1), w.out_weight, None) / math.residual_scale  # [T, D]
    h = layer_norm(x, w.ffn_norm_weight, w.ffn_norm_bias, math.fp32_layernorm)  # [T, D]
    gate, up = math.linear(h, w.gate_up_weight, None).chunk(2, dim=-1)  # [T, F] each
    return x + math.linear(F.silu(gate) * up, w.down_weight, None) / math.residual_scale  # [T, D]


def next_layer_inputs(
    x: torch.Tensor,  # [T, D] residual stream
    o: torch.Tensor,  # [T, H, hd] attention output of block i
    w: LayerWeights,  # block i
    w_next: LayerWeights,  # block i + 1
    cos: torch.Tensor,  # float32 [T, 1, hd]
    sin: torch.Tensor,  # float32 [T, 1, hd]
    math: LayerMath,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rest of block i, then the attention inputs of block i + 1: x [T, D] and q, k, v [T, H, hd]."""
    x = attention_output_and_mlp(x, o, w, math)  # [T, D]
    return x, *attention_inputs(x, w_next, cos, sin, math)


# The compilable pieces between attention kernels, for runner.models.layer_loop.run_layers. Each model keeps its
# own next_layer_inputs although the two read alike: torch.compile caches per code object, so one shared function
# would put both models' compiled graphs under one recompile limit.
EAGER_PARTS: LayerParts = (attention_inputs, next_layer_inputs, attention_output_and_mlp)


class EsmcEmbedder(LayerLoopEmbedder):
    """ESM C weights plus a packed forward over concatenated sequences (runner.models.layer_loop runs it over this
    module's parts). Layer L is transformers' `hidden_states[L]`."""

    eager_parts = EAGER_PARTS
    layers_name = "the ESM C blocks"

    def __init__(self, arch: EsmcArchitecture, info: ModelInfo) -> None:
        super().__init__()
        self.arch = arch
        self.info = info
        self.codec = EsmcCodec(arch.max_positions)
        self.embed = nn.Embedding(arch.vocab, arch.dim)
        self.layers = nn.ModuleList(EsmcBlock(arch) for _ in range(arch.layers))
        self.final_norm = nn.LayerNorm(arch.dim, eps=LAYER_NORM_EPS, bias=False)
        self.num_layers = arch.layers
        self.num_heads = arch.heads
        self.head_dim = arch.head_dim

    @property
    def embedding_weight(self) -> torch.Tensor:
        return self.embed.weight

    def build_layer_weights(self, split: Callable[[torch.Tensor], SplitWeight] | None) -> list[LayerWeights]:
        return [LayerWeights.of(block, self.head_dim, split) for block in self.layers]

    def weights_location(self) -> int:
        """Where block 0's qkv weight lives."""
        return self.layers[0].qkv.weight.data_ptr() if self.num_layers else 0

    def token_embeddings(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """The token embedding alone (no position embedding, no token dropout): [T, D]."""
        return self.embed(tokens)  # [T, D]

    def rotary_frequencies(self, device: torch.device) -> torch.Tensor:
        """fair-esm's formula at the model's rotary base: float32 [hd/2]."""
        return default_inv_freq(self.head_dim, self.arch.rope_theta, device)  # [hd/2]

    def layer_math(self) -> LayerMath:
        return LayerMath(self.num_heads, self.arch.residual_scale, self.fp32_layernorm, self.linear)

    def last_layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        """transformers' `last_hidden_state`: the final LayerNorm, without bias."""
        return layer_norm(x, self.final_norm.weight, None, self.fp32_layernorm)  # [T, D]
