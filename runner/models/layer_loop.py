"""The loop over a packed forward's transformer layers, shared by ESM-2 (runner.models.esm2_layers) and ESM C
(runner.models.esmc).

Each model cuts its layers around the attention kernel, not at layer boundaries, into three parts that are plain
functions of tensors: `first(x, w, cos, sin, math) -> q, k, v` (the first layer's inputs), `middle(x, o, w, w_next,
cos, sin, math) -> x, q, k, v` (the rest of one layer, then the inputs of the next) and `last(x, o, w, math) -> x`.
Compiled, the residual add of a layer and the LayerNorm of the next become one fused kernel, and there is one
compiled call per layer. Attention stays outside the parts: its int max_seqlen would otherwise specialise the
graphs per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

import torch

from runner.kernels.attention import varlen_attention

logger = logging.getLogger("runner")

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
