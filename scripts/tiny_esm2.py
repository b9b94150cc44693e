"""Build tiny ESM-2 checkpoints in fair-esm's real file format, for tests and demos.

The file is what fair-esm's `esm.pretrained.load_model_and_alphabet_local` reads:
    {"cfg": {"model": argparse.Namespace(encoder_layers=..., ...)},
     "model": {"encoder.sentence_encoder.layers.0.self_attn.q_proj.weight": ..., "encoder.lm_head.dense.weight": ...}}
and, beside it, `<stem>-contact-regression.pt` = {"model": {"contact_head.regression.weight": ..., ".bias": ...}}.

Usage: python scripts/tiny_esm2.py OUT.pt [--layers 2 --dim 64 --heads 4 --seed 0 --overflow-residue W]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

# The fairseq model arguments a released ESM-2 cfg["model"] carries (values of a small model here).
_CFG_DEFAULTS = {
    "_name": "esm2",
    "dropout": 0.0,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "max_positions": 1026,
    "encoder_learned_pos": False,
    "no_token_positional_embeddings": True,
}


def _fill_weights(model: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random weights of sensible scale for every entry of fair-esm's ESM2 state dict (module names)."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        if name.endswith("rot_emb.inv_freq"):
            value = tensor.clone()  # deterministic buffer, saved as in the released files
        elif "layer_norm" in name and name.endswith(".weight"):
            value = 1.0 + 0.05 * torch.randn(shape, generator=generator)  # near-identity LayerNorm gain
        elif name.endswith(".bias"):
            value = 0.02 * torch.randn(shape, generator=generator)
        elif name == "embed_tokens.weight":
            value = torch.randn(shape, generator=generator)  # unit-scale embeddings, like trained ones
            value[model.padding_idx] = 0.0
        elif name == "lm_head.weight":
            continue  # tied to embed_tokens.weight, set below
        else:
            fan_in = shape[-1]
            value = torch.randn(shape, generator=generator) / math.sqrt(fan_in)  # keeps activations O(1)
        state[name] = value.to(torch.float32)
    state["lm_head.weight"] = state["embed_tokens.weight"]  # tied, as in fair-esm (one storage in the file)
    return state


def make_esm2(
    path: str | Path,
    layers: int = 2,
    dim: int = 64,
    heads: int = 4,
    seed: int = 0,
    overflow_residue: str | None = None,
    contact_regression: bool = True,
) -> Path:
    """Write a tiny random ESM-2 checkpoint (and its contact-regression file) to `path`; returns the path.

    With `overflow_residue` (e.g. "W"), that residue's embedding row is huge (alternating +-1e30, finite),
    so the first LayerNorm's variance overflows in fp32 and every sequence containing the residue gets a
    non-finite embedding (attention spreads the NaN across the sequence), while other sequences stay finite.
    """
    import esm
    from esm.model.esm2 import ESM2

    path = Path(path)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    model = ESM2(
        num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet=alphabet, token_dropout=True
    )
    generator = torch.Generator().manual_seed(seed)
    state = _fill_weights(model, generator)
    if overflow_residue is not None:
        if len(overflow_residue) != 1 or overflow_residue not in alphabet.tok_to_idx:
            raise ValueError(
                f"overflow_residue must be one residue letter of the ESM alphabet, not {overflow_residue!r}"
            )
        row = torch.full((dim,), 1e30)
        row[1::2] = -1e30
        state["embed_tokens.weight"][alphabet.get_idx(overflow_residue)] = row

    # fairseq names: the transformer under "encoder.sentence_encoder.", the LM head under "encoder.";
    # the contact regression is not in the main file.
    saved: dict[str, torch.Tensor] = {}
    regression: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if name.startswith("contact_head."):
            regression[name] = value
        elif name.startswith("lm_head."):
            saved[f"encoder.{name}"] = value
        else:
            saved[f"encoder.sentence_encoder.{name}"] = value
    cfg_model = argparse.Namespace(
        encoder_layers=layers,
        encoder_embed_dim=dim,
        encoder_ffn_embed_dim=4 * dim,
        encoder_attention_heads=heads,
        token_dropout=True,
        **_CFG_DEFAULTS,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": {"model": cfg_model}, "model": saved}, path)
    if contact_regression:
        torch.save({"model": regression}, path.with_name(f"{path.stem}-contact-regression.pt"))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="checkpoint file to write (.pt)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overflow-residue", default=None, help="residue whose embedding overflows in fp32")
    parser.add_argument(
        "--no-contact-regression", action="store_true", help="do not write the regression file"
    )
    args = parser.parse_args()
    out = make_esm2(
        args.out,
        layers=args.layers,
        dim=args.dim,
        heads=args.heads,
        seed=args.seed,
        overflow_residue=args.overflow_residue,
        contact_regression=not args.no_contact_regression,
    )
    print(out)


if __name__ == "__main__":
    main()
