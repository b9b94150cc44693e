"""What several layers x poolings cost per packed batch, on one GPU (issue 15), without Ray.

    python3 scripts/bench_pooling.py [--arch 650M] [--tokens 65536] [--reps 30] [--out FILE]

A random fair-esm checkpoint of the architecture (`bench_data.write_random_esm2`) is loaded into one embedding
stage exactly as `runner embed` builds it on a GPU (`EmbedStage`: fp16, compiled layers, fused GELU). The
reference script's synthetic proteins are packed by runner's own packer into one batch of --tokens tokens.
Two output settings share that stage's model: "one" (the default: last layer, mean) and "three" (--layers
0,mid,last --pooling mean,cls,max: 9 columns). Per repetition, alternately one then three (slow drift of the
GPU's clocks cancels in the paired ratios), median of --reps after --warmup:

- forward: `forward_layers` alone (CUDA events);
- pool: `pool_layers` on those hidden states (CUDA events), and the implementation before the one-pass pooling
  (`legacy_pool_layers`, kept here as the baseline);
- embed: `EmbedStage.embed_outputs`: forward, pooling, finite flags, the one copy to the host and its sync
  (CUDA events from before the first kernel to after the sync);
- call: the stage's whole `__call__` on the packed-batch row (perf_counter): as above plus the Arrow output,
  i.e. an actor's work per batch except Ray's.

Prints one JSON document (also written to --out): medians in ms, the three/one ratio of each (median of the
per-repetition ratios) and the throughput the `call` figures imply. `--cpu` runs a tiny model on the CPU (a
smoke test of this script only: perf_counter instead of CUDA events).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench import ARCH, ESMC_ARCHS  # noqa: E402  (the benchmark's architectures: name -> layers, dim, heads)
from bench_data import write_random_esm2, write_synth_fasta  # noqa: E402


def legacy_pool_layers(hiddens: Sequence[torch.Tensor], cu_seqlens: torch.Tensor, poolings: Sequence[str],
                       special_start: int, special_end: int) -> torch.Tensor:
    """runner.stages.pooling.pool_layers before the one-pass pooling (commit 84d42dd): per layer a float32 copy
    of the states, masked copies for mean and max, index_add_ sums, a stack at the end. The baseline only."""
    first = hiddens[0]
    starts = cu_seqlens[:-1].long()  # [B]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()  # [B]
    num_windows, num_tokens = lengths.numel(), first.shape[0]
    window_of_token = torch.repeat_interleave(torch.arange(num_windows, device=first.device), lengths,
                                              output_size=num_tokens)  # [T]
    offset = torch.arange(num_tokens, device=first.device) - starts[window_of_token]  # [T]
    residue = (offset >= special_start) & (offset < lengths[window_of_token] - special_end)  # [T]
    out: list[torch.Tensor] = []
    for hidden in hiddens:
        hidden32 = hidden.float()  # [T, D]
        for mode in poolings:
            if mode == "cls":
                out.append(hidden[starts].float())  # [B, D]
            elif mode == "max":
                values = torch.where(residue[:, None], hidden32, float("-inf"))  # [T, D]
                out.append(torch.segment_reduce(values, "max", lengths=lengths, unsafe=True))  # [B, D]
            else:
                sums = torch.zeros(num_windows, hidden.shape[1], device=hidden.device)  # [B, D]
                if mode == "mean_all":
                    sums.index_add_(0, window_of_token, hidden32)
                    counts = lengths.clamp(min=1).float()  # [B]
                else:
                    sums.index_add_(0, window_of_token, torch.where(residue[:, None], hidden32, 0.0))
                    counts = (lengths - special_start - special_end).clamp(min=1).float()  # [B]
                out.append(sums / counts[:, None])  # [B, D]
    return torch.stack(out, dim=1)  # [B, L*P, D]


class Timer:
    """Milliseconds of a callable: CUDA events around it on a GPU (the GPU's own clock), perf_counter on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3


def packed_row(fasta: Path, spec: str, tokens: int) -> pa.Table:
    """The first packed-batch row runner's packer makes of `fasta` with a budget of `tokens` (as Ray Data hands it
    to an embedding actor)."""
    from runner.input.stream import PackSettings, ReadSettings, pack_records, read_blocks
    from runner.models.registry import load_codec

    records = next(read_blocks(ReadSettings((str(fasta),), "id", "sequence", 4096)))
    packed = pack_records(records, PackSettings(load_codec(spec), None, "truncate", 0, tokens))
    return packed.slice(0, 1)


def with_outputs(stage, layers: Sequence[int], poolings: Sequence[str]):
    """A view of `stage` (same model, compiled layers and device) storing other layers x poolings."""
    from runner.models.base import resolve_layers
    from runner.stages.embed_stage import output_schema

    other = copy.copy(stage)
    other.settings = replace(stage.settings, layers=tuple(layers), poolings=tuple(poolings))
    other.layers = tuple(resolve_layers(layers, stage.model.num_layers, "bench"))
    other.schema = output_schema(stage.embed_dim, other.settings.columns)
    return other


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="650M", choices=sorted(a for a in ARCH if a not in ESMC_ARCHS),
                    help="an ESM-2 shape (random fair-esm weights)")
    ap.add_argument("--tokens", type=int, default=65536, help="token budget of the packed batch (runner's default)")
    ap.add_argument("--reps", type=int, default=30, help="timed repetitions of each figure (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed repetitions first")
    ap.add_argument("--no-compile", action="store_true", help="eager layers (runner embed --no-compile)")
    ap.add_argument("--cpu", action="store_true", help="smoke test: tiny model on the CPU")
    ap.add_argument("--workdir", help="keep the checkpoint and FASTA here (default: a temporary directory)")
    ap.add_argument("--out", help="also write the JSON document here")
    args = ap.parse_args(argv)

    from runner.input.batch import PackedBatch
    from runner.stages.embed_stage import EmbedStage, StageSettings, _rows, _to_device
    from runner.stages.pooling import pool_layers

    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or --cpu --arch tiny for a smoke test", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    layers_n, dim, heads = ARCH[args.arch]
    one_layers, one_poolings = (-1,), ("mean",)
    three_layers, three_poolings = (0, (layers_n + 1) // 2, layers_n), ("mean", "cls", "max")
    with tempfile.TemporaryDirectory(prefix="bench-pooling-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ckpt = work / f"esm2-{args.arch}.pt"
        if not ckpt.is_file():
            write_random_esm2(ckpt, layers_n, dim, heads)
        fasta = work / "synth.fasta"
        write_synth_fasta(fasta, max(64, 2 * args.tokens // 300))  # ~2x more proteins than fit in one batch
        row = packed_row(fasta, str(ckpt), args.tokens)
        batch = PackedBatch.from_row(_rows(row)[0])
        started = time.perf_counter()
        stage = EmbedStage(StageSettings(str(ckpt), "fp32" if args.cpu else "fp16", one_layers, one_poolings,
                                         device.type, fused_gelu=True, compile_layers=not (args.cpu or args.no_compile)))
        load_seconds = time.perf_counter() - started
        variants = {"one": stage, "three": with_outputs(stage, three_layers, three_poolings)}
        codec = stage.codec
        pin = device.type == "cuda"
        tokens = _to_device(batch.tokens, torch.int64, device, pin)  # [T]
        positions = _to_device(batch.positions, torch.int64, device, pin)  # [T]
        cu = _to_device(batch.cu_seqlens, torch.int32, device, pin)  # [B+1]
        timer = Timer(device)
        times: dict[str, dict[str, list[float]]] = {v: {} for v in variants}

        def measure(name: str, figure: str, fn: Callable[[], object], timed: bool) -> None:
            ms = timer(fn)
            if timed:
                times[name].setdefault(figure, []).append(ms)

        with torch.inference_mode():
            for rep in range(args.warmup + args.reps):
                timed = rep >= args.warmup
                for name, st in variants.items():  # alternately: one, three, one, three, ...
                    poolings = st.settings.poolings
                    hiddens = st.model.forward_layers(tokens, positions, cu, batch.max_seqlen, st.layers)
                    measure(name, "forward", lambda st=st: st.model.forward_layers(
                        tokens, positions, cu, batch.max_seqlen, st.layers), timed)
                    measure(name, "pool", lambda h=hiddens, p=poolings: pool_layers(
                        h, cu, p, codec.special_start, codec.special_end), timed)
                    measure(name, "pool_legacy", lambda h=hiddens, p=poolings: legacy_pool_layers(
                        h, cu, p, codec.special_start, codec.special_end), timed)
                    del hiddens
                    measure(name, "embed", lambda st=st: st.embed_outputs(batch, per_token=False), timed)
                    started = time.perf_counter()
                    st(row)  # the actor's whole call; it ends with a sync, so the host clock is the call's time
                    if timed:
                        times[name].setdefault("call", []).append((time.perf_counter() - started) * 1e3)
        # The two settings store the same last-layer mean (bit for bit where the GPU's kernels are deterministic).
        one_vectors = variants["one"].embed(batch)[0]
        three_vectors = variants["three"].embed(batch)[0]
        column = three_poolings.index("mean") + 2 * len(three_poolings)  # the last layer's mean
        diff = float(abs(three_vectors[:, column * dim : (column + 1) * dim] - one_vectors).max())

    figures = sorted(times["one"])
    doc: dict = {
        "arch": args.arch, "device": torch.cuda.get_device_name(0) if pin else "cpu", "torch": torch.__version__,
        "attention": stage.kernels, "batch_tokens": batch.num_tokens, "batch_windows": len(batch.ids),
        "reps": args.reps, "load_seconds": round(load_seconds, 1),
        "one": {"layers": list(one_layers), "poolings": list(one_poolings)},
        "three": {"layers": list(three_layers), "poolings": list(three_poolings)},
        "median_ms": {v: {f: round(statistics.median(times[v][f]), 4) for f in figures} for v in variants},
        # Per repetition three / one (measured back to back), then the median: drift between repetitions cancels.
        "three_vs_one": {f: round(statistics.median(t / o for t, o in zip(times["three"][f], times["one"][f],
                                                                            strict=True)), 4) for f in figures},
        "extra_ms_per_batch": {f: round(statistics.median(times["three"][f]) - statistics.median(times["one"][f]), 4)
                               for f in figures},
        "call_tokens_per_second": {v: round(batch.num_tokens / statistics.median(times[v]["call"]) * 1e3, 1)
                                   for v in variants},
        "three_last_mean_max_abs_diff_vs_one": diff,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    # What the layers3 run may reach: one run's rate times one call / three's (the rest of a batch is the same).
    doc["implied_layers3_vs_pooled"] = round(1 / doc["three_vs_one"]["call"], 4)
    text = json.dumps(doc, indent=2)
    print(text, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
