"""Build a tiny random ESM-2 in Hugging Face transformers' format, and convert such a directory to fair-esm's.

The directory is what `transformers.EsmForMaskedLM.from_pretrained` (or `EsmModel`) reads, written by
`save_pretrained` itself: config.json (model_type "esm"), model.safetensors (or, with --bin, a
pytorch_model.bin state dict as older uploads carry) and the EsmTokenizer files (vocab.txt in fair-esm's token
order). The rotary inv_freq is stored rounded to float16, as checkpoints trained in half precision may hold it,
so a loader that recomputes it instead of reading it gives (slightly) different embeddings.

`to_fair_esm` writes the same weights as a fair-esm checkpoint (`{"cfg": {"model": Namespace}, "model": ...}`
plus `<stem>-contact-regression.pt`), renamed by runner's own table (runner.models.esm2_hf), so both loading
paths can be compared on identical weights.

Usage:
    python scripts/tiny_hf_esm2.py OUT_DIR [--layers 2 --dim 64 --heads 4 --seed 0 --model esm|masked-lm --bin]
    python scripts/tiny_hf_esm2.py --to-fair-esm HF_DIR OUT.pt
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: `runner` is this checkout's package
    sys.path.insert(0, str(REPO))


def _fill_random(model: torch.nn.Module, generator: torch.Generator, padding_idx: int) -> None:
    """Random weights of sensible scale in every parameter (biases and LayerNorm gains included, so a wrong
    mapping of any of them shows), and inv_freq rounded to float16."""
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied LM-head weight appears once
            shape = tuple(param.shape)
            if "LayerNorm" in name or "layer_norm" in name:
                value = (1.0 + 0.05 * torch.randn(shape, generator=generator)) if name.endswith("weight") else (
                    0.02 * torch.randn(shape, generator=generator))
            elif name.endswith("bias"):
                value = 0.02 * torch.randn(shape, generator=generator)
            elif name.endswith("word_embeddings.weight"):
                value = torch.randn(shape, generator=generator)  # unit scale, like trained embeddings
                value[padding_idx] = 0.0
            else:
                value = torch.randn(shape, generator=generator) / math.sqrt(shape[-1])  # keeps activations O(1)
            param.copy_(value)
        for name, buffer in model.named_buffers():
            if name.endswith("inv_freq"):
                buffer.copy_(buffer.half().float())


def make_hf_esm2(
    out_dir: str | Path,
    layers: int = 2,
    dim: int = 64,
    heads: int = 4,
    seed: int = 0,
    model: str = "masked-lm",
    weights_format: str = "safetensors",
) -> Path:
    """Write a tiny random transformers ESM-2 (`model`: "masked-lm" = EsmForMaskedLM, "esm" = EsmModel with its
    pooler) and its tokenizer to `out_dir`; `weights_format` "safetensors" or "bin". Returns the directory."""
    import esm
    from transformers import EsmConfig, EsmForMaskedLM, EsmModel, EsmTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    config = EsmConfig(
        vocab_size=len(alphabet.all_toks),
        hidden_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * dim,
        position_embedding_type="rotary",
        emb_layer_norm_before=False,
        token_dropout=True,
        mask_token_id=alphabet.mask_idx,
        pad_token_id=alphabet.padding_idx,
        max_position_embeddings=1026,
        layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    network = EsmForMaskedLM(config) if model == "masked-lm" else EsmModel(config)
    _fill_random(network, torch.Generator().manual_seed(seed), alphabet.padding_idx)
    network.save_pretrained(out)
    if weights_format == "bin":  # the pickled state dict older uploads carry instead of safetensors
        (out / "model.safetensors").unlink()
        torch.save({k: v.contiguous() for k, v in network.state_dict().items()}, out / "pytorch_model.bin")
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(alphabet.all_toks) + "\n")
    EsmTokenizer(vocab_file=str(vocab)).save_pretrained(out)
    return out


def to_fair_esm(hf_dir: str | Path, out_path: str | Path) -> Path:
    """The weights of transformers ESM-2 directory `hf_dir` as a fair-esm checkpoint at `out_path` (and its
    `-contact-regression.pt`), renamed by runner's table. The LM head is not carried over."""
    from runner.models import esm2_hf

    directory = Path(hf_dir)
    config = esm2_hf.read_hf_config(directory)
    state = esm2_hf.fair_esm_state(
        esm2_hf.read_weights(esm2_hf.weight_files(directory)), config, esm2_hf.read_vocab(directory), directory
    )
    model = {f"encoder.sentence_encoder.{k}": v for k, v in state.items() if not k.startswith("contact_head.")}
    regression = {k: v for k, v in state.items() if k.startswith("contact_head.")}
    cfg_model = argparse.Namespace(
        encoder_layers=config.layers,
        encoder_embed_dim=config.dim,
        encoder_ffn_embed_dim=4 * config.dim,
        encoder_attention_heads=config.heads,
        token_dropout=config.token_dropout,
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"cfg": {"model": cfg_model}, "model": model}, out)
    torch.save({"model": regression}, out.with_name(f"{out.stem}-contact-regression.pt"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write (or, with --to-fair-esm, the .pt file)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=["masked-lm", "esm"], default="masked-lm",
                        help="EsmForMaskedLM (as the facebook/esm2_* uploads) or EsmModel (with its pooler)")
    parser.add_argument("--bin", action="store_true", help="pytorch_model.bin instead of model.safetensors")
    parser.add_argument("--to-fair-esm", type=Path, metavar="HF_DIR",
                        help="convert this transformers ESM-2 directory to a fair-esm .pt file at OUT")
    args = parser.parse_args()
    if args.to_fair_esm is not None:
        print(to_fair_esm(args.to_fair_esm, args.out))
        return
    print(make_hf_esm2(args.out, args.layers, args.dim, args.heads, args.seed, args.model,
                       "bin" if args.bin else "safetensors"))


if __name__ == "__main__":
    main()
