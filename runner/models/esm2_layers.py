"""The math of fair-esm's ESM-2 transformer layers over packed tokens, as plain functions of tensors.

`ESM2Embedder` (runner.models.esm2) holds the weights and runs these parts through runner.models.layer_loop.
The layers are cut around their attention kernel, not at layer boundaries: `next_layer_inputs` runs one layer's
output projection and MLP and the next layer's LayerNorm, q/k/v projection and rotary embedding, so compiled,
the residual add of a layer and the LayerNorm of the next become one fused kernel, and there is one compiled
call per layer, not two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from runner.kernels.fp16x3 import SplitWeight
from runner.models.layer_loop import LayerParts
from runner.models.rotary import rotate


class LayerWeights(NamedTuple):
    """The tensors of one fair-esm TransformerLayer, so the layer math is a plain function of tensors.

    Under FP16x3/BF16x3 (the shadow) the projection weights are `runner.kernels.fp16x3.SplitWeight`s.
    """

    attn_norm_weight: torch.Tensor  # [D]
    attn_norm_bias: torch.Tensor  # [D]
    attn_norm_eps: float
    # q, k and v projections as one product: one GEMM with 3x the output width instead of three (cuBLAS runs
    # the wide one nearer its peak), and one split of the input under the shadow's split maths.
    qkv_weight: torch.Tensor | SplitWeight  # [3D, D]
    qkv_bias: torch.Tensor  # [3D]
    out_weight: torch.Tensor | SplitWeight  # [D, D]
    out_bias: torch.Tensor  # [D]
    # head_dim ** -0.5, fair-esm's query scaling. fair-esm multiplies q by it before the rotation; rotation is
    # linear, so scaling inside the attention kernel (in fp32) is the same computation with one rounding fewer.
    scaling: float
    mlp_norm_weight: torch.Tensor  # [D]
    mlp_norm_bias: torch.Tensor  # [D]
    mlp_norm_eps: float
    fc1_weight: torch.Tensor | SplitWeight  # [4D, D]
    fc1_bias: torch.Tensor  # [4D]
    fc2_weight: torch.Tensor | SplitWeight  # [D, 4D]
    fc2_bias: torch.Tensor  # [D]

    @classmethod
    def of(cls, layer: Any, split: Callable[[torch.Tensor], SplitWeight] | None = None) -> LayerWeights:
        """The weights of fair-esm TransformerLayer `layer`, q/k/v fused (see `fuse_qkv`); with `split`, every
        projection weight passed through it (the shadow's split maths)."""
        attn, ln1, ln2 = layer.self_attn, layer.self_attn_layer_norm, layer.final_layer_norm
        qkv_weight, qkv_bias = fuse_qkv(attn)
        prepare = split or (lambda weight: weight)
        return cls(
            ln1.weight, ln1.bias, float(ln1.eps),
            prepare(qkv_weight), qkv_bias, prepare(attn.out_proj.weight), attn.out_proj.bias, float(attn.scaling),
            ln2.weight, ln2.bias, float(ln2.eps),
            prepare(layer.fc1.weight), layer.fc1.bias, prepare(layer.fc2.weight), layer.fc2.bias,
        )


def fuse_qkv(attn: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """fair-esm MultiheadAttention `attn`'s q, k and v projections as one weight [3D, D] and bias [3D].

    The module's own q/k/v parameters become views of the fused tensors, so the fusion costs no memory (3B:
    1.4 GB of FP16 otherwise) and the module still computes fair-esm's forward. Built outside inference mode:
    parameters must stay ordinary tensors, whatever mode the first forward ran in.
    """
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    with torch.inference_mode(False), torch.no_grad():
        weight = torch.cat([p.weight for p in projections])  # [3D, D]
        bias = torch.cat([p.bias for p in projections])  # [3D]
        for p, w, b in zip(projections, weight.chunk(3), bias.chunk(3), strict=True):
            p.weight = torch.nn.Parameter(w, requires_grad=False)  # [D, D] view
            p.bias = torch.nn.Parameter(b, requires_grad=False)  # [D] view
    return weight, bias


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, fp32: bool) -> torch.Tensor:
    """LayerNorm over the last dim; in float32 when `fp32` (the variance of fp16 activations can overflow)."""
    if not fp32 or x.dtype == torch.float32:
        return F.layer_norm(x, weight.shape, weight, bias, eps)
    return F.layer_norm(x.float(), weight.shape, weight.float(), bias.float(), eps).to(x.dtype)


@torch.library.custom_op("runner::linear_tanh_gelu", mutates_args=())
def linear_tanh_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(x @ weight.T + bias) with GELU's tanh approximation, from one cuBLASLt GEMM whose epilogue applies
    bias and GELU to the FP32 accumulator (CUDA; elsewhere the same two steps). A custom op because inductor
    would otherwise decompose it into a GEMM and a separate GELU pass, the pass it exists to save."""
    if x.is_cuda:  # on CPU _addmm_activation's GELU is the erf one: this op means tanh everywhere
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)  # [T, out]
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")  # [T, out]


@linear_tanh_gelu.register_fake
def _linear_tanh_gelu_shape(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]))  # [T, out]


class LayerMath(NamedTuple):
    """How every layer computes, shared by all layers of a forward (constants to torch.compile)."""

    heads: int  # attention heads
    fp32_layernorm: bool  # LayerNorm in float32 inside a half-precision model
    linear: Callable[..., torch.Tensor]  # F.linear, or FP32-accurate emulation for the shadow
    # fc1 + GELU as one cuBLASLt GEMM with a tanh-approximate GELU epilogue (`linear_tanh_gelu`) instead of
    # fair-esm's erf GELU as a separate pass: ESM2Embedder.fused_gelu_in_use decides (half precision on CUDA).
    fused_gelu: bool = False


def attention_inputs(
    x: torch.Tensor,  # [T, D] residual stream
    w: LayerWeights,
    cos: torch.Tensor,  # float32 [T, 1, hd]
    sin: torch.Tensor,  # float32 [T, 1, hd]
    math: LayerMath,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pre-LN, q/k/v projection and rotary positions of one layer: q, k, v [T, H, hd]."""
    h = layer_norm(x, w.attn_norm_weight, w.attn_norm_bias, w.attn_norm_eps, math.fp32_layernorm)  # [T, D]
    qkv = math.linear(h, w.qkv_weight, w.qkv_bias).unflatten(-1, (3, math.heads, -1))  # [T, 3, H, hd]
    q, k, v = qkv.unbind(1)  # [T, H, hd] each
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def attention_output_and_mlp(
    x: torch.Tensor,  # [T, D] residual stream
    o: torch.Tensor,  # [T, H, hd] attention output
    w: LayerWeights,
    math: LayerMath,
) -> torch.Tensor:
    """Output projection and residual, then the pre-LN GELU MLP and residual: the next x [T, D]."""
    x = x + math.linear(o.flatten(1), w.out_weight, w.out_bias)  # [T, D]
    h = layer_norm(x, w.mlp_norm_weight, w.mlp_norm_bias, w.mlp_norm_eps, math.fp32_layernorm)  # [T, D]
    if math.fused_gelu:
        a = linear_tanh_gelu(h, w.fc1_weight, w.fc1_bias)  # [T, 4D]
    else:
        a = F.gelu(math.linear(h, w.fc1_weight, w.fc1_bias))  # [T, 4D]; fair-esm's erf GELU
    return x + math.linear(a, w.fc2_weight, w.fc2_bias)  # [T, D]


def next_layer_inputs(
    x: torch.Tensor,  # [T, D] residual stream
    o: torch.Tensor,  # [T, H, hd] attention output of layer i
    w: LayerWeights,  # layer i
    w_next: LayerWeights,  # layer i + 1
    cos: torch.Tensor,  # float32 [T, 1, hd]
    sin: torch.Tensor,  # float32 [T, 1, hd]
    math: LayerMath,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rest of layer i, then the attention inputs of layer i + 1: x [T, D] and q, k, v [T, H, hd]."""
    x = attention_output_and_mlp(x, o, w, math)  # [T, D]
    return x, *attention_inputs(x, w_next, cos, sin, math)


# The compilable pieces between attention kernels, for runner.models.layer_loop.run_layers. Each model keeps its
# own next_layer_inputs although the two read alike: torch.compile caches per code object, so one shared function
# would put both models' compiled graphs under one recompile limit.
EAGER_PARTS: LayerParts = (attention_inputs, next_layer_inputs, attention_output_and_mlp)
