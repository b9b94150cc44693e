"""The loop over a packed forward's transformer layers, shared by ESM-2 (runner.models.esm2_layers) and ESM C
(runner.models.esmc), and `LayerLoopEmbedder`, the forward around it that both models run.

Each model cuts its layers around the attention kernel, not at layer boundaries, into three parts that are plain
functions of tensors: `first(x, w, cos, sin, math) -> q, k, v` (the first layer's inputs), `middle(x, o, w, w_next,
cos, sin, math) -> x, q, k, v` (the rest of one layer, then the inputs of the next) and `last(x, o, w, math) -> x`.
Compiled, the residual add of a layer and the LayerNorm of the next become one fused kernel, and there is one
compiled call per layer. Attention stays outside the parts: its int max_seqlen would otherwise specialise the
graphs per batch.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from runner.kernels.attention import plan_attention, select_backend, varlen_attention
from runner.kernels.fp16x3 import SplitLinear, SplitWeight
from runner.models.base import EmbeddingModel, resolve_layers
from runner.models.rotary import rotary_tables

logger = logging.getLogger(__name__)  # a child of "runner": actor-side, see runner.driver.console

LayerParts = tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]  # first, middle, last


class ScaledLayer(Protocol):
    """What the loop reads of a layer's weights itself (the parts read the rest)."""

    scaling: float  # the query scaling, head_dim ** -0.5, applied inside the attention kernel


def run_layers(
    x: torch.Tensor,  # [T, D] embeddings
    layers: Sequence[ScaledLayer],  # the layers' weights, in order (at least one)
    cos: torch.Tensor,  # float32 [T, 1, hd]
    sin: torch.Tensor,  # float32 [T, 1, hd]
    cu: torch.Tensor,  # int32 [B+1]
    max_seqlen: int,
    backend: str,  # attention kernel (runner.kernels.attention.BACKENDS)
    plan: Any,  # runner.kernels.attention.plan_attention's per-batch state
    math: Any,  # the model's constants for every layer (its LayerMath)
    parts: LayerParts,  # the model's parts, eager or compiled
    keep: Collection[int] = (),  # layer numbers (1 = the first layer run) whose outputs to return too
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The layers over packed tokens: the last layer's output x [T, D] and, for each layer number in `keep`, that
    layer's output [T, D] (the residual stream as it passes: a reference kept, nothing computed again)."""
    if not layers:
        raise ValueError("run_layers needs at least one layer (layer 0 is the embeddings: no layer runs)")
    first, middle, last = parts

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: ScaledLayer) -> torch.Tensor:
        return varlen_attention(q, k, v, cu, max_seqlen, w.scaling, backend, plan=plan)  # [T, H, hd]

    kept: dict[int, torch.Tensor] = {}
    q, k, v = first(x, layers[0], cos, sin, math)  # [T, H, hd] each
    for number, (w, w_next) in enumerate(zip(layers[:-1], layers[1:], strict=True), start=1):
        x, q, k, v = middle(x, attention(q, k, v, w), w, w_next, cos, sin, math)  # x: layer `number`'s output
        if number in keep:
            kept[number] = x
    return last(x, attention(q, k, v, layers[-1]), layers[-1], math), kept  # [T, D]


def compile_over_tokens(part: Callable[..., Any], backend: str | Callable[..., Any] = "inductor") -> Callable[..., Any]:
    """`part` compiled with only the token dimension symbolic: dim 0 of its tensor arguments (x, o, cos, sin).

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


class CompiledLayers(Protocol):
    """A model whose layers may run compiled: `compiled` holds its compiled parts, None once it runs eager."""

    compiled: LayerParts | None


def run_compiled_or_eager(
    model: CompiledLayers,
    run: Callable[..., tuple[torch.Tensor, dict[int, torch.Tensor]]],  # run_layers, or a model's own loop
    args: tuple[Any, ...],  # run's arguments up to `parts`
    eager: LayerParts,  # the model's eager parts
    keep: Collection[int],
    what: str,  # names the layers in the warning ("the ESM-2 layers")
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """`run` through the model's compiled parts when it has them, else eager. If compiling or the compiled call
    fails, the same call runs eager: an error of the inputs raises there too and propagates; otherwise the model
    falls back to eager for good, with one warning (inductor and dynamo raise many types). Out of memory is no
    compile failure and is raised as it is."""
    if model.compiled is None:
        return run(*args, parts=eager, keep=keep)
    try:
        return run(*args, parts=model.compiled, keep=keep)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        out = run(*args, parts=eager, keep=keep)
        logger.warning("torch.compile failed for %s (%s: %s): running eager from now on",
                       what, type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        model.compiled = None
        return out


class LayerLoopEmbedder(EmbeddingModel):
    """An EmbeddingModel whose packed forward runs `run_layers` over its own layer parts (ESM-2, ESM C).

    This class holds the forward both models run (embeddings, rotary tables, one attention plan, the layers
    compiled or eager, the final LayerNorm after the last layer), the per-layer weights cache, compiling and the
    choice of attention kernel. A model gives its eager parts and the steps that differ: `embedding_weight`,
    `token_embeddings`, `rotary_frequencies`, `layer_math`, `last_layer_norm`, `build_layer_weights` and
    `weights_location`.
    """

    eager_parts: LayerParts  # the model's parts, eager (its module's EAGER_PARTS)
    layers_name: str  # names the layers in the compile-failure warning ("the ESM-2 layers")
    fp32_layernorm: bool = False  # run every LayerNorm in float32 (then cast back) for fp16 robustness

    def __init__(self) -> None:
        super().__init__()
        self.attention_backend = "exact"
        self.linear = F.linear  # every projection goes through this (see EmbeddingModel.emulate_fp32)
        self.compiled: LayerParts | None = None  # torch.compile'd layer parts, or None (eager)
        # Per layer, the weights the forward reads (split under the shadow's maths), built on first use and again
        # after the weights moved (device or dtype): see `layer_weights`.
        self._layer_weights: list[Any] | None = None
        self._weights_anchor = 0  # `weights_location()` when _layer_weights was built

    @property
    @abstractmethod
    def embedding_weight(self) -> torch.Tensor:
        """The token embedding's weight: its device and dtype are the model's."""

    @abstractmethod
    def token_embeddings(self, tokens: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """Layer 0 of int64 tokens [T] (offsets cu_seqlens [B+1]): [T, D] in the weights' dtype."""

    @abstractmethod
    def rotary_frequencies(self, device: torch.device) -> torch.Tensor:
        """The rotary `inv_freq` on `device`: float32 [hd/2]."""

    @abstractmethod
    def layer_math(self) -> Any:
        """The constants every layer of the next forward computes with (the model's LayerMath)."""

    @abstractmethod
    def last_layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm, applied after the last layer: [T, D] -> [T, D]."""

    @abstractmethod
    def build_layer_weights(self, split: Callable[[torch.Tensor], SplitWeight] | None) -> list[Any]:
        """Per layer, the tensors the parts read (the model's LayerWeights), every projection weight passed
        through `split` when given (the shadow's split maths)."""

    @abstractmethod
    def weights_location(self) -> int:
        """Where layer 0's first projection weight lives (a data_ptr): it changes when the weights move."""

    def select_attention(self, device: torch.device) -> str:
        """Fastest non-ALiBi kernel for `device` and the current weight dtype (call after moving the model)."""
        dtype = self.embedding_weight.dtype
        self.attention_backend = select_backend(torch.device(device), alibi=False, dtype=dtype, head_dim=self.head_dim)
        return self.attention_backend

    @property
    def compiling(self) -> bool:
        return self.compiled is not None

    def emulate_fp32(self, math: str) -> None:
        """As EmbeddingModel.emulate_fp32; for the split maths the projection weights are split once (on the
        next forward), so the (compiled) layers receive plain tensors instead of looking splits up per call."""
        super().emulate_fp32(math)
        self._layer_weights = None

    def layer_weights(self) -> list[Any]:
        """Per layer, the tensors the forward reads (`build_layer_weights`), every projection split under the
        shadow's split maths. Rebuilt when the weights moved."""
        if self._layer_weights is None or self.weights_location() != self._weights_anchor:
            # SplitLinear.split, not its cached `prepare`: a model may build new tensors (ESM-2 fuses q/k/v).
            split = self.linear.split if isinstance(self.linear, SplitLinear) else None
            self._layer_weights = self.build_layer_weights(split)
            self._weights_anchor = self.weights_location()  # after the build, which may have moved it (ESM-2)
        return self._layer_weights

    def use_compile(self, on: bool, backend: str | Callable[..., Any] = "inductor") -> bool:
        """Run the layer parts between attention kernels through `torch.compile`: LayerNorms, rotary, the
        activation and the residual adds become fused kernels around the matmuls (one compile for all layers and
        all batch shapes, see `compile_over_tokens`). Falls back to eager, with a warning, if compiling fails.
        `backend`: torch.compile's backend (tests pass one that records the graphs)."""
        if on:
            self.compiled = tuple(compile_over_tokens(part, backend) for part in self.eager_parts)  # type: ignore[assignment]
        else:
            self.compiled = None
        return on

    @torch.no_grad()
    def forward_layers(
        self,
        tokens: torch.Tensor,  # int64 [T] token ids of all sequences, concatenated
        positions: torch.Tensor,  # int64 [T] position of each token inside its own sequence
        cu_seqlens: torch.Tensor,  # int32 [B+1] offsets of each sequence in `tokens`
        max_seqlen: int,  # longest sequence in the batch, in tokens
        layers: Sequence[int],  # representation layers: 0 = embeddings, num_layers or -1 = last (after the final norm)
    ) -> list[torch.Tensor]:
        """Hidden states of each of `layers` for every token, [T, D] each in the weights' dtype, from one forward
        that runs no deeper than the deepest layer asked for; the last layer comes after the final LayerNorm."""
        targets = resolve_layers(layers, self.num_layers, self.info.name or self.info.family)
        deepest = max(targets)
        tokens = tokens.long()
        x = self.token_embeddings(tokens, cu_seqlens)  # [T, D]
        hidden = {0: x}  # layer -> [T, D]
        if deepest > 0:
            inv_freq = self.rotary_frequencies(tokens.device)  # float32 [hd/2]
            cos, sin = rotary_tables(positions.to(tokens.device), inv_freq)  # [T, 1, hd] each
            cu = cu_seqlens.to(device=tokens.device, dtype=torch.int32)  # [B+1]
            plan = plan_attention(cu, x.shape[0], self.attention_backend, x.device)  # once for all layers
            weights = self.layer_weights()[:deepest]
            keep = frozenset(t for t in targets if 0 < t < deepest)
            args = (x, weights, cos, sin, cu, max_seqlen, self.attention_backend, plan, self.layer_math())
            x, kept = run_compiled_or_eager(self, run_layers, args, self.eager_parts, keep, self.layers_name)  # [T, D]
            if deepest == self.num_layers:
                x = self.last_layer_norm(x)  # [T, D]
            hidden.update(kept)
            hidden[deepest] = x
        return [hidden[t] for t in targets]
