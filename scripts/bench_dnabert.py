"""Throughput of DNABERT-S-sized embedding: runner's packed FP16 forward against a padded FP32 forward.

Runs on one CUDA GPU with plain torch (no Ray, no checkpoint, no network):

- model: the released DNABERT-S / DNABERT-2-117M shape (hidden 768, 12 layers, 12 heads, intermediate
  3072, vocab 4096) built with `DnabertEmbedder(config)`, random weights under the released names
  (`scripts/tiny_dnabert.py`'s generator, DNABERT-S layout) loaded through the same name mapping as a
  real checkpoint;
- data: synthetic reads, lognormal lengths around 250 bp clipped to 50..2000 bp. Token ids are
  synthesised directly, ceil(nt / 4.5) BPE tokens between [CLS] and [SEP]: the released tokenizer is not
  available offline, and a BPE trained here on random DNA would not have its length statistics, while
  ~4.5 nt/token is what the released tokenizer gives on genomic DNA (DNABERT-2 paper). Throughput depends
  only on the token counts, not on which ids they are;
- modes, same sequences, timed after a warm-up with `torch.cuda.synchronize`:
  "packed_fp16": runner's `forward_packed` (flash_attn or flex ALiBi kernel), token-budget batches in
  input order; "padded_fp32": the straightforward baseline, length-sorted padded batches, dense
  attention with an explicit ALiBi + padding bias (what a trust_remote_code FP32 run does, minus its
  unpad tricks); "padded_fp16": the same baseline in FP16, to separate packing from precision.
  Throughput counts real tokens only (padding excluded). Embeddings are mean-pooled over all tokens
  (DNABERT-S's pooling) and compared with the padded FP32 ones by cosine.

Prints one JSON line per mode: {mode, tok_per_s, seq_per_s, peak_gib, cos_vs_fp32_min, cos_vs_fp32_mean, ...}.

    python3 scripts/bench_dnabert.py [--sequences 20000] [--token-budget 65536]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from runner.models.dnabert import RELEASED_CONFIG, DnabertEmbedder, _checkpoint_state  # noqa: E402
from runner.stages.pooling import pool_packed  # noqa: E402

CLS_ID, SEP_ID, FIRST_BPE_ID = 1, 2, 5  # the released tokenizer: [UNK] [CLS] [SEP] [PAD] [MASK], then BPE
NT_PER_TOKEN = 4.5


def _tiny_module():
    spec = importlib.util.spec_from_file_location("tiny_dnabert", REPO / "scripts" / "tiny_dnabert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(seed: int) -> DnabertEmbedder:
    """The released shape, random weights under the released (DNABERT-S) names, FP32 on the CPU."""
    cfg = dict(RELEASED_CONFIG)
    model = DnabertEmbedder(cfg, name="random-DNABERT-S")
    gen = torch.Generator().manual_seed(seed)
    raw = _tiny_module().release_state_dict(
        cfg["vocab_size"],
        cfg["num_hidden_layers"],
        cfg["hidden_size"],
        cfg["intermediate_size"],
        "dnabert-s",
        gen,
    )
    model.load_state_dict(_checkpoint_state(raw, model, Path("random")), strict=True)
    return model.eval().requires_grad_(False)


def synthetic_reads(n: int, seed: int) -> list[np.ndarray]:
    """Token ids of `n` reads: lognormal nt lengths (median 250, clipped 50..2000) -> ceil(nt/4.5) BPE ids."""
    rng = np.random.default_rng(seed)
    nt = np.clip(rng.lognormal(math.log(250), 0.6, n), 50, 2000).astype(int)  # [n]
    vocab = RELEASED_CONFIG["vocab_size"]
    out = []
    for length in nt:
        body = rng.integers(FIRST_BPE_ID, vocab, math.ceil(length / NT_PER_TOKEN))
        out.append(np.concatenate([[CLS_ID], body, [SEP_ID]]).astype(np.int64))
    return out


def packed_batches(seqs: list[np.ndarray], budget: int) -> list[list[int]]:
    """Indices grouped in input order so each group has at most `budget` tokens."""
    groups, cur, used = [], [], 0
    for i, s in enumerate(seqs):
        if cur and used + len(s) > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += len(s)
    if cur:
        groups.append(cur)
    return groups


def padded_batches(seqs: list[np.ndarray], budget: int) -> list[list[int]]:
    """Length-sorted groups with batch * longest <= `budget` padded tokens."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    groups, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * len(seqs[i]) > budget:  # sorted: seqs[i] is the longest so far
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


def run_packed(
    model: DnabertEmbedder, seqs: list[np.ndarray], group: list[int], dev: torch.device
) -> torch.Tensor:
    """Mean-all pooled float32 [B, D] of one packed batch."""
    parts = [seqs[i] for i in group]
    lengths = [len(p) for p in parts]
    tokens = torch.from_numpy(np.concatenate(parts)).to(dev, non_blocking=True)  # [T]
    positions = torch.from_numpy(np.concatenate([np.arange(n) for n in lengths])).to(dev)  # [T]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32, device=dev)  # [B+1]
    hidden = model.forward_packed(tokens, positions, cu, max(lengths), -1)  # [T, D]
    return pool_packed(hidden, cu, "mean_all", 1, 1)  # [B, D]


def padded_forward(model: DnabertEmbedder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The straightforward MosaicBERT forward over a padded batch: hidden states [B, L, D].

    ids int64 [B, L]; mask bool [B, L] (True = real token). Dense attention with bias
    -slope[h] * |i - j| plus -inf on padded keys, as the released code builds it.
    """
    b, n = ids.shape
    h, hd, d = model.num_heads, model.head_dim, model.dim
    emb = model.embeddings
    x = emb.LayerNorm(emb.word_embeddings(ids) + emb.token_type_embeddings.weight[0])  # [B, L, D]
    pos = torch.arange(n, device=ids.device)  # [L]
    dist = (pos[None, :] - pos[:, None]).abs().float()  # [L, L]
    slopes = model.alibi_slopes(ids.device)  # [H]
    bias = -slopes[:, None, None] * dist  # [H, L, L]
    bias = (
        bias[None].expand(b, -1, -1, -1).masked_fill(~mask[:, None, None, :], float("-inf"))
    )  # [B, H, L, L]
    bias = bias.to(x.dtype)
    for blk in model.encoder.layer:
        att = blk.attention
        qkv = att.self.Wqkv(x).view(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)  # [3, B, H, L, hd]
        ctx = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)  # [B, H, L, hd]
        ctx = ctx.transpose(1, 2).reshape(b, n, d)  # [B, L, D]
        x = att.output.LayerNorm(att.output.dense(ctx) + x)  # [B, L, D]
        mlp = blk.mlp
        gv = mlp.gated_layers(x)  # [B, L, 2I]
        x = mlp.layernorm(mlp.wo(F.gelu(gv[..., : mlp.inner]) * gv[..., mlp.inner :]) + x)  # [B, L, D]
    return x


def run_padded(
    model: DnabertEmbedder, seqs: list[np.ndarray], group: list[int], dev: torch.device
) -> torch.Tensor:
    """Mean-all pooled float32 [B, D] of one padded batch (padding excluded from the mean)."""
    parts = [seqs[i] for i in group]
    n = max(len(p) for p in parts)
    ids = np.full((len(parts), n), 3, dtype=np.int64)  # [B, L] padded with [PAD]
    for row, p in enumerate(parts):
        ids[row, : len(p)] = p
    ids_t = torch.from_numpy(ids).to(dev)  # [B, L]
    lengths = torch.tensor([len(p) for p in parts], device=dev)  # [B]
    mask = torch.arange(n, device=dev)[None, :] < lengths[:, None]  # [B, L]
    hidden = padded_forward(model, ids_t, mask).float()  # [B, L, D]
    return (hidden * mask[..., None]).sum(1) / lengths[:, None]  # [B, D]


def timed(
    run: Callable[[DnabertEmbedder, list[np.ndarray], list[int], torch.device], torch.Tensor],
    model: DnabertEmbedder,
    seqs: list[np.ndarray],
    groups: list[list[int]],
    dev: torch.device,
    warmup: int,
) -> tuple[torch.Tensor, float, float]:
    """Pooled [N, D] in input order, seconds for all groups, peak GiB; `warmup` groups run first untimed."""
    with torch.inference_mode():
        # Warm-up covers the shortest and the longest groups so compiled kernels see both extremes.
        by_size = sorted(groups, key=lambda g: max(len(seqs[i]) for i in g))
        for g in by_size[:warmup] + by_size[-warmup:]:
            run(model, seqs, g, dev)
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = torch.empty(len(seqs), model.dim, device=dev)  # [N, D]
        start = time.perf_counter()
        for g in groups:
            out[torch.tensor(g, device=dev)] = run(model, seqs, g, dev)
        torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - start
    return out, seconds, torch.cuda.max_memory_allocated(dev) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=20000)
    parser.add_argument(
        "--token-budget", type=int, default=65536, help="tokens per batch (padded tokens for padded modes)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="groups of each extreme run before timing")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_dnabert.py needs a CUDA GPU")
    dev = torch.device("cuda", 0)
    torch.manual_seed(args.seed)
    seqs = synthetic_reads(args.sequences, args.seed)
    n_tokens = sum(len(s) for s in seqs)
    fp32 = build_model(args.seed).to(dev)
    fp32.attention_backend = "exact"
    half = build_model(args.seed).to(dev, torch.float16)
    backend = half.select_attention(dev)
    print(
        json.dumps(
            {
                "setup": True,
                "gpu": torch.cuda.get_device_name(dev),
                "torch": torch.__version__,
                "sequences": len(seqs),
                "tokens": n_tokens,
                "mean_tokens": n_tokens / len(seqs),
                "max_tokens": max(len(s) for s in seqs),
                "packed_backend": backend,
                "tf32": torch.backends.cuda.matmul.allow_tf32,
            }
        ),
        flush=True,
    )

    results = {}
    pad_groups = padded_batches(seqs, args.token_budget)
    ref, sec, peak = timed(run_padded, fp32, seqs, pad_groups, dev, args.warmup)
    results["padded_fp32"] = (ref, sec, peak, len(pad_groups))
    del fp32
    torch.cuda.empty_cache()
    out, sec, peak = timed(run_padded, half, seqs, pad_groups, dev, args.warmup)
    results["padded_fp16"] = (out, sec, peak, len(pad_groups))
    pack_groups = packed_batches(seqs, args.token_budget)
    out, sec, peak = timed(run_packed, half, seqs, pack_groups, dev, args.warmup)
    results["packed_fp16"] = (out, sec, peak, len(pack_groups))

    padded_tokens = sum(len(g) * max(len(seqs[i]) for i in g) for g in pad_groups)
    for mode in ("packed_fp16", "padded_fp32", "padded_fp16"):
        emb, sec, peak, batches = results[mode]
        cos = F.cosine_similarity(emb.double(), ref.double(), dim=-1)  # [N]
        print(
            json.dumps(
                {
                    "mode": mode,
                    "tok_per_s": round(n_tokens / sec),
                    "seq_per_s": round(len(seqs) / sec, 1),
                    "peak_gib": round(peak, 3),
                    "cos_vs_fp32_min": round(cos.min().item(), 6),
                    "cos_vs_fp32_mean": round(cos.mean().item(), 6),
                    "seconds": round(sec, 3),
                    "batches": batches,
                    "finite": bool(torch.isfinite(emb).all().item()),
                    "backend": backend if mode == "packed_fp16" else "sdpa_dense_bias",
                    "padding_fraction": 0.0
                    if mode == "packed_fp16"
                    else round(1 - n_tokens / padded_tokens, 4),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
