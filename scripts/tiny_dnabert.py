"""Build a tiny DNABERT checkpoint in the released Hugging Face layout, for tests and benchmarks.

The files mirror what `zhihan1996/DNABERT-2-117M` and `zhihan1996/DNABERT-S` ship: `config.json` with
the release's keys (MosaicBERT: `alibi_starting_size`, `auto_map` into `bert_layers.py`),
`model.safetensors` under the released weight names, and a BPE `tokenizer.json` whose special tokens
sit at the release's ids ([UNK]=0, [CLS]=1, [SEP]=2, [PAD]=3, [MASK]=4) with a "[CLS] $A [SEP]"
TemplateProcessing post-processor.

Two layouts: "dnabert2" (BertForMaskedLM: "bert." prefix plus the MLM head `cls.predictions.*`) and
"dnabert-s" (bare BertModel: no prefix, plus `pooler.dense.*`). Weights are random but not tiny, so
attention is far from uniform and numerical tests can tell implementations apart.

    python scripts/tiny_dnabert.py OUTDIR [--layout dnabert-s] [--vocab 96]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

SPECIAL_TOKENS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]  # the release's order: ids 0..4


def random_dna(rng: random.Random, n: int, n_rate: float = 0.0) -> str:
    """`n` random nucleotides; each is N with probability `n_rate`."""
    return "".join("N" if rng.random() < n_rate else rng.choice("ACGT") for _ in range(n))


def train_tokenizer(vocab_size: int = 96, seed: int = 0, corpus: int = 400):
    """A BPE `tokenizers.Tokenizer` trained on random DNA, special tokens at the released ids."""
    from tokenizers import Tokenizer, models, processors, trainers

    rng = random.Random(seed)
    texts = [random_dna(rng, rng.randint(50, 400), n_rate=0.01) for _ in range(corpus)]
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=list("ACGTN"),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"BPE trainer put {name} at {tok.token_to_id(name)}, not {i}")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 1), ("[SEP]", 2)],
    )
    return tok


def release_config(vocab: int, layers: int, dim: int, heads: int, inner: int, layout: str) -> dict:
    """config.json with the keys of the release (values scaled down)."""
    arch = "BertForMaskedLM" if layout == "dnabert2" else "BertModel"
    return {
        "_name_or_path": "zhihan1996/DNABERT-2-117M",
        "alibi_starting_size": 512,
        "architectures": [arch],
        "attention_probs_dropout_prob": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_bert.BertConfig",
            "AutoModel": "bert_layers.BertModel",
            "AutoModelForMaskedLM": "bert_layers.BertForMaskedLM",
            "AutoModelForSequenceClassification": "bert_layers.BertForSequenceClassification",
        },
        "classifier_dropout": None,
        "gradient_checkpointing": False,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": dim,
        "initializer_range": 0.02,
        "intermediate_size": inner,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512,
        "model_type": "bert",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "transformers_version": "4.28.0",
        "type_vocab_size": 2,
        "use_cache": True,
        "vocab_size": vocab,
    }


def release_state_dict(
    vocab: int, layers: int, dim: int, inner: int, layout: str, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random weights under the released names (fan-in scaled so activations stay O(1))."""

    def lin(out_f: int, in_f: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=gen) * gain / in_f**0.5

    def vec(n: int, center: float = 0.0, spread: float = 0.1) -> torch.Tensor:
        return center + spread * torch.randn(n, generator=gen)

    sd: dict[str, torch.Tensor] = {
        "embeddings.word_embeddings.weight": torch.randn(vocab, dim, generator=gen),
        "embeddings.token_type_embeddings.weight": 0.5 * torch.randn(2, dim, generator=gen),
        "embeddings.LayerNorm.weight": vec(dim, 1.0),
        "embeddings.LayerNorm.bias": vec(dim),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        # gain 2 on q/k makes attention logits O(1): softmax is peaked, not uniform.
        sd[p + "attention.self.Wqkv.weight"] = torch.cat(
            [lin(dim, dim, 2.0), lin(dim, dim, 2.0), lin(dim, dim)]
        )
        sd[p + "attention.self.Wqkv.bias"] = vec(3 * dim)
        sd[p + "attention.output.dense.weight"] = lin(dim, dim)
        sd[p + "attention.output.dense.bias"] = vec(dim)
        sd[p + "attention.output.LayerNorm.weight"] = vec(dim, 1.0)
        sd[p + "attention.output.LayerNorm.bias"] = vec(dim)
        sd[p + "mlp.gated_layers.weight"] = lin(2 * inner, dim)
        sd[p + "mlp.wo.weight"] = lin(dim, inner)
        sd[p + "mlp.wo.bias"] = vec(dim)
        sd[p + "mlp.layernorm.weight"] = vec(dim, 1.0)
        sd[p + "mlp.layernorm.bias"] = vec(dim)
    if layout == "dnabert-s":
        sd["pooler.dense.weight"] = lin(dim, dim)
        sd["pooler.dense.bias"] = vec(dim)
        return sd
    sd = {"bert." + k: v for k, v in sd.items()}
    # BertForMaskedLM's head; the decoder weight is tied to the word embeddings in the release.
    sd["cls.predictions.transform.dense.weight"] = lin(dim, dim)
    sd["cls.predictions.transform.dense.bias"] = vec(dim)
    sd["cls.predictions.transform.LayerNorm.weight"] = vec(dim, 1.0)
    sd["cls.predictions.transform.LayerNorm.bias"] = vec(dim)
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"].clone()
    sd["cls.predictions.decoder.bias"] = vec(vocab)
    return sd


def make_dnabert(
    directory: str | Path,
    layers: int = 2,
    dim: int = 32,
    heads: int = 4,
    seed: int = 0,
    layout: str = "dnabert2",
    vocab_size: int = 96,
    inner: int | None = None,
) -> Path:
    """Write config.json, model.safetensors, tokenizer.json (+ tokenizer_config / special_tokens_map)
    into `directory` and return it. `inner` (intermediate_size) defaults to 2 * dim: 64 for dim 32."""
    from safetensors.torch import save_file

    if layout not in ("dnabert2", "dnabert-s"):
        raise ValueError(f"layout must be 'dnabert2' or 'dnabert-s', not {layout!r}")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    inner = 2 * dim if inner is None else inner
    tok = train_tokenizer(vocab_size, seed)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    tok.save(str(out / "tokenizer.json"))
    # The roles of the release's special tokens, as both tokenizer files name them.
    roles = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
             "mask_token": "[MASK]"}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512, "padding_side": "right"}
    (out / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, **roles}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(roles, indent=2))
    config = release_config(vocab, layers, dim, heads, inner, layout)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)
    state = release_state_dict(vocab, layers, dim, inner, layout, gen)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout", choices=("dnabert2", "dnabert-s"), default="dnabert2")
    parser.add_argument("--vocab", type=int, default=96)
    args = parser.parse_args()
    path = make_dnabert(args.outdir, args.layers, args.dim, args.heads, args.seed, args.layout, args.vocab)
    print(path)


if __name__ == "__main__":
    main()
