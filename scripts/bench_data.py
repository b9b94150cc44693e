"""Synthetic benchmark inputs: the reference script's proteins (as arrays, records or FASTA), a flat-memory
generator of short proteins for the CPU-stage benchmark, and random-weight ESM-2 checkpoints of any size in
fair-esm's file format. Heavy imports (numpy, torch, fair-esm) happen inside the functions."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AA = "LAGVESIKRDTPNQFYMHCW"  # the reference script's 20 amino acids, in its order


# ------------------------------------------------------------------------------------------ synthetic data


def synth_arrays(n: int, seed: int = 0, median: float = 300, sigma: float = 0.65, lo: int = 30, hi: int = 1022):
    """The reference script's `synth(n)` draws, as arrays: (lengths int64 [n], residue bytes uint8 [sum])."""
    import numpy as np
    import torch

    g = torch.Generator().manual_seed(seed)
    lens = torch.exp(torch.randn(n, generator=g) * sigma + math.log(median)).clamp(lo, hi).long()
    idx = torch.randint(0, len(AA), (int(lens.sum()),), generator=g)
    lut = np.frombuffer(AA.encode(), dtype=np.uint8)
    return lens.numpy(), lut[idx.numpy()]


def synth(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Exactly the reference script's `synth` output: [("s0", "MKV..."), ...]."""
    lens, res = synth_arrays(n, seed)
    out, p = [], 0
    for i, length in enumerate(lens.tolist()):
        out.append((f"s{i}", res[p : p + length].tobytes().decode()))
        p += length
    return out


def write_synth_fasta(path: Path, n: int, seed: int = 0, width: int = 60) -> dict:
    """The reference's synthetic proteins as FASTA (lines of `width`); returns counts."""
    lens, res = synth_arrays(n, seed)
    p = 0
    with open(path, "wb") as f:
        for i, length in enumerate(lens.tolist()):
            seq = res[p : p + length].tobytes()
            p += length
            body = b"\n".join(seq[j : j + width] for j in range(0, length, width))
            f.write(b">s%d synthetic\n%s\n" % (i, body))
    residues = int(lens.sum())
    return {"records": n, "residues": residues, "tokens": residues + 2 * n, "bytes": path.stat().st_size}


def write_short_fasta(path: Path, n: int, seed: int = 0, median: float = 100, sigma: float = 0.65,
                      lo: int = 30, hi: int = 1022, width: int = 60, chunk: int = 100_000) -> dict:
    """N synthetic proteins (lognormal lengths) streamed to disk chunk by chunk (numpy; flat memory)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lut = np.frombuffer(AA.encode(), dtype=np.uint8)
    residues = 0
    with open(path, "wb", buffering=8 << 20) as f:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            lens = np.clip(np.exp(rng.standard_normal(m) * sigma + math.log(median)), lo, hi).astype(np.int64)
            res = lut[rng.integers(0, len(AA), int(lens.sum()), dtype=np.uint8)].tobytes()
            parts, p = [], 0
            for i, length in enumerate(lens.tolist()):
                seq = res[p : p + length]
                p += length
                body = b"\n".join(seq[j : j + width] for j in range(0, length, width))
                parts.append(b">p%d\n%s\n" % (start + i, body))
            f.write(b"".join(parts))
            residues += int(lens.sum())
    return {"records": n, "residues": residues, "tokens": residues + 2 * n, "bytes": path.stat().st_size}


# ------------------------------------------------------------------------------------------ checkpoints


def write_random_esm2(path: Path, layers: int, dim: int, heads: int, seed: int = 0, dtype: str = "fp16") -> Path:
    """A random-weight ESM-2 checkpoint in fair-esm's file format (as scripts/tiny_esm2.py writes, same
    weight scales), built for large models: shapes from a meta-device module, values drawn on the GPU when
    there is one, stored in `dtype` (fp16 halves the file; runner's loader upcasts on load). No
    contact-regression file (optional for embeddings)."""
    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    import esm
    from esm.model.esm2 import ESM2
    from tiny_esm2 import _CFG_DEFAULTS

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    with torch.device("meta"):
        model = ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads, alphabet=alphabet, token_dropout=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    saved: dict[str, torch.Tensor] = {}
    embed = None
    for name, meta in model.state_dict().items():
        shape = tuple(meta.shape)
        if name.startswith("contact_head.") or name == "lm_head.weight":
            continue
        if name.endswith("rot_emb.inv_freq"):
            hd = shape[0] * 2
            value = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            saved[f"encoder.sentence_encoder.{name}"] = value
            continue
        if "layer_norm" in name and name.endswith(".weight"):
            value = 1.0 + 0.05 * randn(shape)
        elif name.endswith(".bias"):
            value = 0.02 * randn(shape)
        elif name == "embed_tokens.weight":
            value = randn(shape)
            value[model.padding_idx] = 0.0
        else:
            value = randn(shape) / math.sqrt(shape[-1])
        value = value.to(torch_dtype).cpu()
        if name == "embed_tokens.weight":
            embed = value
        prefix = "encoder." if name.startswith("lm_head.") else "encoder.sentence_encoder."
        saved[prefix + name] = value
    saved["encoder.lm_head.weight"] = embed  # tied to the embedding, one storage in the file
    cfg = argparse.Namespace(encoder_layers=layers, encoder_embed_dim=dim, encoder_ffn_embed_dim=4 * dim,
                             encoder_attention_heads=heads, token_dropout=True, **_CFG_DEFAULTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"cfg": {"model": cfg}, "model": saved}, tmp)
    os.replace(tmp, path)
    return path


def write_random_esmc(path: Path, layers: int, dim: int, heads: int, seed: int = 0, dtype: str = "fp16") -> Path:
    """A random-weight ESM C state dict in EvolutionaryScale's original layout (what `data/weights/esmc_*.pth`
    holds; names from runner's one table), the weight scales of scripts/tiny_esmc.py, stored in `dtype`. The
    heads are 64 wide, as in every ESM C (the file carries no config: runner reads the shape from the tensors)."""
    import torch

    from runner.models.esmc import EsmcArchitecture
    from runner.models.esmc_checkpoints import BLOCK_PREFIX, BLOCK_WEIGHT_NAMES, WEIGHT_NAMES, _meta_model

    if dim != 64 * heads:
        raise ValueError(f"ESM C heads are 64 wide: dim {dim} != 64 * {heads} heads")
    arch = EsmcArchitecture(layers=layers, dim=dim, heads=heads, ffn_dim=int(((8 / 3 * dim) + 255) // 256 * 256))
    shapes = {name: tuple(t.shape) for name, t in _meta_model(arch).state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    names = [(ours, original) for ours, original, _ in WEIGHT_NAMES]
    for i in range(layers):
        names += [(BLOCK_PREFIX["runner"].format(i=i) + ours, BLOCK_PREFIX["original"].format(i=i) + original)
                  for ours, original, _ in BLOCK_WEIGHT_NAMES]
    saved: dict[str, torch.Tensor] = {}
    for ours, original in names:
        shape = shapes[ours]
        value = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if len(shape) == 1:  # LayerNorm gains near 1, small biases
            value = (1.0 if ours.endswith("weight") else 0.0) + 0.1 * value
        elif not ours.startswith("embed"):
            value = value / math.sqrt(shape[-1])  # keeps activations O(1)
        saved[original] = value.to(torch_dtype).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(saved, tmp)
    os.replace(tmp, path)
    return path
