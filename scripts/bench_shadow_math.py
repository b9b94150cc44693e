"""How the FP32 shadow's matmuls should run on a GPU: IEEE FP32, TF32, 3xTF32, BF16x3 or FP16x3.

One CUDA GPU, plain torch + fair-esm (no Ray). A random ESM-2 of the real 650M (or 3B) shape is built in
fair-esm's format, saved, and loaded through runner's own loader; the reference script's synthetic proteins
(`bench_data.synth`: lognormal lengths, median 300, 30..1022), as many as fit, are packed into one
shadow-sized batch. Each mode runs runner's packed forward (`ESM2Embedder.forward_packed`, the actors' code):

- "fp16": the main path (FP16 weights, varlen attention, compiled layers): the speed the shadow is paid in,
  and the drift the shadow exists to measure; "fp16+nested" (or +flex, +exact) runs it with another
  attention kernel (the first "fp16" mode, always run, stays the unit), "fp16+fusedgelu" with fc1 and GELU
  as one cuBLASLt GEMM (tanh GELU epilogue, ESM2Embedder.fused_gelu);
- "ieee+exact": IEEE FP32 matmuls on CUDA cores (torch's default), attention one SDPA per sequence: the
  reference; the other FP32 modes use the shadow's attention (the split maths: "fp16x3", runner's
  FP16x3 flash kernel; "ieee": one IEEE varlen kernel per layer) unless "+fp16x3", "+flex" (3xTF32
  tensor cores), "+nested" (IEEE varlen) or "+exact" is added;
- "tf32": plain TF32 tensor cores for every FP32 matmul (10-bit mantissa: not an FP32 reference);
- "tf32x3": `runner.kernels.tf32x3`, three TF32 products per projection (FP32-accurate; eager only);
- "bf16x3", "fp16x3": `runner.kernels.fp16x3`, one half GEMM over hi/lo pairs, eager and "+compile".

Prints one JSON line per mode: tok_per_s, cost_per_token_vs_fp16 (the shadow's price per sampled token in
main-path tokens: rate x this bounds the shadow's share of a GPU), and max relative difference / 1 - cosine
of the mean-pooled embeddings against "ieee". `--profile MODE` adds the top CUDA kernels of that mode.

    python3 scripts/bench_shadow_math.py [--arch 650M] [--tokens 16384] [--reps 5] [--profile fp16x3+compile+flex]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bench import ARCH, cmd_make_ckpt  # the benchmark's architectures and random fair-esm checkpoint writer
from bench_data import synth  # the reference script's synthetic proteins

REPO = Path(__file__).resolve().parents[1]


def synth_batch(total_tokens: int) -> list[str]:
    """The reference's synthetic proteins, in order, as many as fit in total_tokens (with BOS/EOS)."""
    proteins, used = [], 0
    for _, seq in synth(max(16, total_tokens // 150)):  # ~2x more than fit: the median protein is 302 tokens
        if used + len(seq) + 2 > total_tokens:
            break
        proteins.append(seq)
        used += len(seq) + 2
    return proteins


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="650M", choices=sorted(ARCH))
    ap.add_argument("--tokens", type=int, default=16384, help="tokens in the packed batch (runner's shadow_batch_tokens)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself (use --arch 8M)")
    ap.add_argument("--modes", default="ieee,tf32,tf32x3,fp16x3,bf16x3+compile,fp16x3+compile,fp16x3+compile+exact",
                    help="comma list: MATH[+compile][+flex|+nested|+exact], MATH one of ieee tf32 tf32x3 bf16x3 fp16x3; "
                         "fp16[+KERNEL][+fusedgelu] for the main path")
    ap.add_argument("--profile", action="append", default=[], help="mode to profile (repeatable)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from runner.kernels.attention import BACKENDS
    from runner.kernels.tf32x3 import tf32_matmuls
    from runner.models.esm2 import load_esm2
    from runner.stages.pooling import pool_packed

    layers, dim, heads = ARCH[args.arch]
    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"esm2-{args.arch}.pt"
        cmd_make_ckpt(argparse.Namespace(path=str(ckpt), layers=layers, dim=dim, heads=heads, seed=0, dtype="fp32"))
        started = time.perf_counter()
        model = load_esm2(str(ckpt)).to(device).eval()
        sync()
        print(json.dumps({"arch": args.arch, "load_to_device_seconds": round(time.perf_counter() - started, 1)}), flush=True)
    model.select_attention(device)
    encoded = [torch.from_numpy(model.codec.encode(seq)).long() for seq in synth_batch(args.tokens)]  # <cls> ... <eos>
    lengths = [len(e) - 2 for e in encoded]
    tokens = torch.cat(encoded).to(device)  # [T]
    pos = torch.cat([torch.arange(len(e)) for e in encoded]).to(device)  # [T]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor([n + 2 for n in lengths]).cumsum(0)
    cu = cu.to(device)
    max_len = max(lengths) + 2

    modes = ["fp16", *[m for m in args.modes.split(",") if m != "fp16"]]  # plain fp16 first: the cost unit
    fp32_attention = model.attention_backend  # what the shadow's fp32 model selects on CUDA (FP32_PREFERENCE)
    half = copy.deepcopy(model).to(torch.float16)
    half_attention = half.select_attention(device)
    half.use_compile(True)

    def prepare(mode: str) -> torch.nn.Module:
        math, *options = mode.split("+")
        kernels = [o for o in options if o in BACKENDS]
        if math == "fp16":  # the main path, "+KERNEL" trying another attention kernel on it
            half.attention_backend = kernels[0] if kernels else half_attention
            half.fused_gelu = "fusedgelu" in options
            return half
        torch._dynamo.reset()  # a fresh compile per mode: dynamo's recompile limit would silently run eager
        model.attention_backend = fp32_attention
        # The split maths bring their split attention (fp16x3) where it runs, as in the shadow actors.
        model.emulate_fp32(math if math in ("tf32x3", "bf16x3", "fp16x3") else "ieee")
        model.use_compile("compile" in options)
        model.attention_backend = kernels[0] if kernels else model.attention_backend
        return model

    def forward(net: torch.nn.Module) -> torch.Tensor:
        return pool_packed(net.forward_packed(tokens, pos, cu, max_len, -1), cu, "mean", 1, 1)  # [B, D] float32

    def run(mode: str) -> tuple[torch.Tensor, float, torch.nn.Module]:
        net = prepare(mode)
        ctx = tf32_matmuls() if mode == "tf32" else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            started = time.perf_counter()
            out = forward(net)  # warm-up (and compile)
            sync()
            first_call[mode] = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(args.reps):
                out = forward(net)
            sync()
        return out.double(), (time.perf_counter() - started) / args.reps, net

    first_call: dict[str, float] = {}  # seconds of each mode's first forward: compile (and autotune) included
    reference, _, _ = run("ieee+exact")  # IEEE FP32 projections, one SDPA (IEEE math) per sequence
    fp16_seconds = None
    for mode in modes:
        try:
            pooled, seconds, net = run(mode)
        except Exception as exc:  # one mode failing (a missing kernel) must not lose the others' figures
            print(json.dumps({"arch": args.arch, "mode": mode, "error": f"{type(exc).__name__}: {exc}"[:500]}), flush=True)
            continue
        fp16_seconds = fp16_seconds or seconds  # "fp16" runs first
        cosine = F.cosine_similarity(pooled, reference, dim=-1)
        print(json.dumps({
            "arch": args.arch, "mode": mode, "tokens": int(cu[-1]), "sequences": len(lengths),
            "tok_per_s": round(int(cu[-1]) / seconds),
            "cost_per_token_vs_fp16": round(seconds / fp16_seconds, 2),
            "first_call_seconds": round(first_call[mode], 1),
            "compiled": net.compiling,
            "attention": net.attention_backend,
            "max_rel_diff_vs_ieee": float((pooled - reference).abs().max() / reference.abs().max()),
            "one_minus_cos_max_vs_ieee": float((1 - cosine).max()),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        }), flush=True)
    for mode in args.profile:
        net = prepare(mode)
        with torch.inference_mode():
            forward(net)  # compile outside the profile
            sync()
        with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU]) as prof:
            forward(net)
            sync()
        events = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
        total = sum(e.self_device_time_total for e in events) or 1
        print(json.dumps({"profile": mode, "cuda_ms": round(total / 1000, 1), "top": [
            {"name": e.key[:90], "ms": round(e.self_device_time_total / 1000, 2), "calls": e.count}
            for e in sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
        ]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
