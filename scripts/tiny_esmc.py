"""Build a tiny random ESM C in both released formats, for tests and demos (no internet needed).

    python scripts/tiny_esmc.py OUT_DIR [--layers 2 --heads 2 --seed 0 --overflow-residue W --base-model]
      -> OUT_DIR/esmc_tiny/      transformers layout: EsmcForMaskedLM (or EsmcModel) `save_pretrained` + EsmcTokenizer
      -> OUT_DIR/esmc_tiny.pth   the same weights as EvolutionaryScale's `esm` package names them (original layout)

The .pth is written by this script's own renaming (below), not by runner's name table, so loading both and
getting the same vectors checks that table. Heads are 64 wide as in every ESM C; the SwiGLU width follows the
released rule (8/3 of the width, rounded up to a multiple of 256).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch


def swiglu_width(dim: int) -> int:
    """The released models' SwiGLU width: 8/3 * dim rounded up to a multiple of 256 (960 -> 2560, 1152 -> 3072)."""
    return int(((8 / 3 * dim) + 255) // 256 * 256)


def _random_state(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights of sensible scale for every entry: LayerNorm gains near 1 with visible biases (so a
    mapping that swapped or dropped one shows), unit-scale embeddings, projections keeping activations O(1)."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if tensor.ndim == 1 and name.endswith(".weight"):  # LayerNorm gains (q/k norms, block norms, final)
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith(".bias"):
            value = 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith("embed_tokens.weight"):
            value = torch.randn(shape, generator=generator)
        else:
            value = torch.randn(shape, generator=generator) / math.sqrt(shape[-1])
        state[name] = value.float()
    return state


def original_layout(state: dict[str, torch.Tensor], layers: int, dim: int, generator: torch.Generator
                    ) -> dict[str, torch.Tensor]:
    """transformers EsmcModel weights under EvolutionaryScale's `esm.models.esmc.ESMC` names (q|k|v and gate|up
    fused, as its `layernorm_qkv` and SwiGLU `ffn` hold them), plus a random `sequence_head` (the LM head)."""
    s = {k.removeprefix("esmc."): v for k, v in state.items() if not k.startswith("lm_head.")}
    out = {"embed.weight": s["embed_tokens.weight"], "transformer.norm.weight": s["norm.weight"]}
    for i in range(layers):
        hf, orig = f"layers.{i}.", f"transformer.blocks.{i}."
        out[orig + "attn.layernorm_qkv.0.weight"] = s[hf + "input_layernorm.weight"]
        out[orig + "attn.layernorm_qkv.0.bias"] = s[hf + "input_layernorm.bias"]
        out[orig + "attn.layernorm_qkv.1.weight"] = torch.cat(
            [s[hf + f"self_attn.{p}_proj.weight"] for p in ("q", "k", "v")])
        out[orig + "attn.q_ln.weight"] = s[hf + "self_attn.q_norm.weight"]
        out[orig + "attn.k_ln.weight"] = s[hf + "self_attn.k_norm.weight"]
        out[orig + "attn.out_proj.weight"] = s[hf + "self_attn.o_proj.weight"]
        out[orig + "ffn.0.weight"] = s[hf + "post_attention_layernorm.weight"]
        out[orig + "ffn.0.bias"] = s[hf + "post_attention_layernorm.bias"]
        out[orig + "ffn.1.weight"] = torch.cat([s[hf + "mlp.gate_proj.weight"], s[hf + "mlp.up_proj.weight"]])
        out[orig + "ffn.3.weight"] = s[hf + "mlp.down_proj.weight"]
    # RegressionHead(d_model, 64): Linear, GELU, LayerNorm, Linear. Not read for embeddings; present in the release.
    for name, shape in (("0.weight", (dim, dim)), ("0.bias", (dim,)), ("2.weight", (dim,)), ("2.bias", (dim,)),
                        ("3.weight", (64, dim)), ("3.bias", (64,))):
        out[f"sequence_head.{name}"] = 0.05 * torch.randn(shape, generator=generator)
    return {k: v.clone().contiguous() for k, v in out.items()}


def make_esmc(
    out_dir: str | Path,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    overflow_residue: str | None = None,
    base_model: bool = False,
    name: str = "esmc_tiny",
) -> tuple[Path, Path]:
    """Write OUT_DIR/<name>/ (transformers) and OUT_DIR/<name>.pth (original layout); returns both paths.

    `base_model`: save an `EsmcModel` (names without prefix) instead of the hub's `EsmcForMaskedLM` ("esmc."
    prefix plus `lm_head`). With `overflow_residue` (e.g. "W") that residue's embedding row is huge (alternating
    +-1e30, finite), so in fp32 every sequence holding it embeds to non-finite values and others stay finite.
    """
    from transformers import EsmcConfig, EsmcForMaskedLM, EsmcModel, EsmcTokenizer

    out = Path(out_dir)
    dim = 64 * heads
    config = EsmcConfig(vocab_size=64, hidden_size=dim, intermediate_size=swiglu_width(dim), num_hidden_layers=layers,
                        num_attention_heads=heads)
    torch.manual_seed(seed)  # transformers' own init of anything the state below does not set
    model = (EsmcModel if base_model else EsmcForMaskedLM)(config).eval()
    generator = torch.Generator().manual_seed(seed)
    state = _random_state(model, generator)
    if overflow_residue is not None:
        tokenizer = EsmcTokenizer()
        token = tokenizer.convert_tokens_to_ids(overflow_residue)
        if len(overflow_residue) != 1 or token == tokenizer.unk_token_id:
            raise ValueError(f"overflow_residue must be one residue letter, not {overflow_residue!r}")
        row = torch.full((dim,), 1e30)
        row[1::2] = -1e30
        state["embed_tokens.weight" if base_model else "esmc.embed_tokens.weight"][token] = row
    model.load_state_dict(state)
    directory = out / name
    model.save_pretrained(directory, safe_serialization=True)
    EsmcTokenizer().save_pretrained(directory)
    pth = out / f"{name}.pth"
    torch.save(original_layout(state, layers, dim, generator), pth)
    return directory, pth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write <name>/ and <name>.pth into")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2, help="64-wide heads: the width is 64 * heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overflow-residue", default=None, help="residue whose embedding overflows in fp32")
    parser.add_argument("--base-model", action="store_true", help="save EsmcModel instead of EsmcForMaskedLM")
    parser.add_argument("--name", default="esmc_tiny")
    args = parser.parse_args()
    directory, pth = make_esmc(args.out, args.layers, args.heads, args.seed, args.overflow_residue, args.base_model,
                               args.name)
    print(directory)
    print(pth)


if __name__ == "__main__":
    main()
