"""`runner validate`: a one-shot check of a low precision (fp16/bf16) against FP32 on a sample of the input.

No Ray: the sample is embedded in this process, once in FP32 (the reference) and once in the chosen
precision (and, with `fp32_layernorm`, once more with LayerNorm kept in FP32), with the same packed
forward and pooling as `runner embed`.

- Sampling: a reservoir of `sample` valid records (seeded), filled while streaming, so memory is bounded
  by the sample, not the input. Sequences longer than the model's limit are truncated, as `embed` does.
- Strata: the sampled sequences sorted by length and cut into three equal-count groups (terciles by rank:
  short / medium / long); each stratum reports its own length range. Ranks, not fixed bounds, so every
  stratum is populated whatever the length distribution of the input.
- Per stratum: min/mean/max cosine to FP32, mean |difference|, relative std difference
  (mean over sequences of |std(low) / std(fp32) - 1|, std over the embedding's dimensions), relative L2-norm
  difference (mean over sequences of |‖low‖ / ‖fp32‖ - 1|) and the outliers (ids below `min_cosine`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.driver.budget import CPU_TOKEN_BUDGET, auto_token_budget
from runner.errors import RunnerError
from runner.input.batch import TokenizedRecord
from runner.input.packing import pack_block
from runner.input.prepare import Preparer
from runner.input.sources import expand_inputs, read_records, sniff_input
from runner.models.base import EmbeddingModel, SequenceCodec
from runner.models.registry import load_codec, load_model, model_info
from runner.stages.embed_stage import DTYPES, pooled_forward
from runner.stages.shadow import compare

log = logging.getLogger("runner")

LOW_PRECISIONS: tuple[str, ...] = ("fp16", "bf16")
STRATA: tuple[str, ...] = ("short", "medium", "long")
MAX_OUTLIERS_LISTED = 20  # per stratum; the count is always complete


class ValidationFailed(RunnerError):
    """Some sampled sequence's cosine to FP32 is below --min-cosine. Exit code 4, like a drift abort."""

    exit_code = 4


@dataclass
class ValidateSettings:
    """What `runner validate` compares, and on what."""

    inputs: list[str]  # FASTA/Parquet/CSV files, globs or directories
    model: str  # model spec, as for `runner embed`
    sample: int = 1000  # sequences compared (fewer when the input has fewer valid records)
    precision: str | None = None  # fp16 | bf16; None = fp16 on GPU, bf16 on CPU (CPU fp16 is slow or missing)
    fp32_layernorm: bool = False  # also run the low precision with LayerNorm in fp32, and time both
    exact_gelu: bool = False  # erf GELU in the low precision, as `embed --exact-gelu` (else ESM-2's fused tanh GELU)
    min_cosine: float = 0.99  # a sequence below this cosine vs FP32 is an outlier (and fails the check)
    gpus: int | None = None  # 0 = CPU, 1 = the first GPU; None = 1 when CUDA is available
    seed: int = 0  # reservoir-sampling seed
    id_column: str = "id"
    seq_column: str = "sequence"
    layer: int = -1
    pooling: str | None = None  # None = the model's default
    max_residues: int | None = None  # None = the model's limit
    token_budget: int | None = None  # None = 4096 on CPU, sized from free memory on GPU

    def check(self) -> None:
        """One RunnerError naming the fix for a value a user can get wrong."""
        if not self.inputs:
            raise RunnerError("no input given: pass FASTA/Parquet/CSV files, globs or directories")
        if not self.model:
            raise RunnerError("no model given: pass --model esm2_t33_650M_UR50D (or a .pt / HF directory path)")
        if self.sample < 3:
            raise RunnerError("--sample must be at least 3 (one sequence per length stratum)")
        if self.precision is not None and self.precision not in LOW_PRECISIONS:
            raise RunnerError(f"--precision must be fp16 or bf16 (compared against fp32), not {self.precision!r}")
        if self.gpus is not None and self.gpus not in (0, 1):
            raise RunnerError("--gpus must be 0 (CPU) or 1: validate runs in this process on one device")
        if self.gpus == 1 and not torch.cuda.is_available():
            raise RunnerError("--gpus 1 but PyTorch sees no CUDA GPU: pass --gpus 0 to validate on CPU")
        if not -1 <= self.min_cosine <= 1:
            raise RunnerError("--min-cosine must be a cosine between -1 and 1")
        if self.token_budget is not None and self.token_budget < 8:
            raise RunnerError("--token-budget must be at least 8 tokens")


@dataclass
class Sample:
    """The sampled windows (one per sequence, in sample order) and what reading the input found."""

    windows: list[TokenizedRecord]
    records_read: int = 0
    rejected: int = 0  # records the model cannot embed (empty, bad characters, missing id)
    truncated: int = 0  # sampled sequences cut to the model's limit
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # residues per sampled window


def reservoir_sample(settings: ValidateSettings, codec: SequenceCodec) -> Sample:
    """Algorithm R over the valid records: each is kept with probability sample / valid-so-far."""
    paths = expand_inputs(settings.inputs)
    for path in paths:
        sniff_input(path, settings.id_column, settings.seq_column)
    preparer = Preparer(codec, settings.max_residues, "truncate")
    rng = random.Random(settings.seed)
    reservoir: list[TokenizedRecord] = []
    out = Sample(windows=reservoir)
    valid = 0
    for record in read_records(paths, settings.id_column, settings.seq_column):
        out.records_read += 1
        prepared = preparer.prepare(record)
        if not isinstance(prepared, list):
            out.rejected += 1
            continue
        valid += 1
        if len(reservoir) < settings.sample:
            reservoir.append(prepared[0])
        else:
            j = rng.randrange(valid)
            if j < settings.sample:
                reservoir[j] = prepared[0]
    if not reservoir:
        raise RunnerError(f"no valid sequence in {', '.join(settings.inputs)}: nothing to validate")
    # Renumber: the ordinal becomes the row of the sample, so packed batches map back to rows.
    out.windows = [dataclasses.replace(w, ordinal=i) for i, w in enumerate(reservoir)]
    out.truncated = sum(w.truncated for w in out.windows)
    out.lengths = np.array([w.residues for w in out.windows], dtype=np.int32)
    return out


def strata(lengths: np.ndarray) -> dict[str, np.ndarray]:
    """Row indices of the short / medium / long terciles (by rank of length, ties kept in sample order)."""
    order = np.argsort(lengths, kind="stable")
    return dict(zip(STRATA, np.array_split(order, 3), strict=True))


@dataclass
class Embedded:
    """One precision's embeddings of the sample, and how long the forwards took."""

    vectors: np.ndarray  # float32 [N, D], rows in sample order
    seconds: float  # forwards + pooling of the whole sample (after one warm-up batch)
    tokens: int

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def prepare_model(spec: str, device: torch.device, precision: str) -> EmbeddingModel:
    """Load on CPU in fp32, move to the device and dtype, then pick attention (it depends on both)."""
    model = load_model(spec).to(device, DTYPES[precision]).eval()
    model.select_attention(device)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def embed_sample(model: EmbeddingModel, windows: list[TokenizedRecord], budget: int, layer: int, pooling: str,
                 device: torch.device) -> Embedded:
    """Pooled float32 embeddings of every window, packed like `runner embed` packs them."""
    batches = pack_block(windows, budget)
    out = np.zeros((len(windows), model.info.embed_dim), dtype=np.float32)

    pooled_forward(model, batches[0], device, layer, pooling)  # warm-up: first-call costs (kernel selection, allocator) would skew the timing
    _sync(device)
    started = time.perf_counter()
    pooled = [pooled_forward(model, b, device, layer, pooling) for b in batches]  # [B, D] float32 each
    _sync(device)
    seconds = time.perf_counter() - started
    for batch, vectors in zip(batches, pooled, strict=True):
        out[batch.ordinals] = vectors.cpu().numpy()
    return Embedded(out, seconds, sum(b.num_tokens for b in batches))


def stratum_stats(ids: list[str], lengths: np.ndarray, low: np.ndarray, ref: np.ndarray, rows: np.ndarray,
                  min_cosine: float) -> dict[str, Any]:
    """The comparison numbers of one stratum (rows of the sample)."""
    if not len(rows):
        return {"n": 0}
    lo, rf = low[rows].astype(np.float64), ref[rows].astype(np.float64)  # [n, D]
    cosine, _, norm_ratio = compare(lo, rf)  # [n] each
    std_ratio = lo.std(axis=1) / np.maximum(rf.std(axis=1), 1e-300)  # [n]
    bad = np.flatnonzero(~(cosine >= min_cosine))  # NaN counts as an outlier
    bad = bad[np.argsort(cosine[bad])]  # worst first
    return {
        "n": int(len(rows)),
        "length_min": int(lengths[rows].min()),
        "length_max": int(lengths[rows].max()),
        "cosine_min": float(np.min(cosine)),
        "cosine_mean": float(np.mean(cosine)),
        "cosine_max": float(np.max(cosine)),
        "mean_abs_diff": float(np.abs(lo - rf).mean()),
        "rel_std_diff": float(np.abs(std_ratio - 1).mean()),
        "rel_norm_diff": float(np.abs(norm_ratio - 1).mean()),
        "outlier_count": int(len(bad)),
        "outliers": [
            {"id": ids[rows[i]], "length": int(lengths[rows[i]]), "cosine": float(cosine[i])}
            for i in bad[:MAX_OUTLIERS_LISTED]
        ],
    }


def variant_report(name: str, ln: bool, embedded: Embedded, reference: Embedded, sample: Sample,
                   groups: dict[str, np.ndarray], min_cosine: float) -> dict[str, Any]:
    """One low-precision variant against FP32: per stratum, overall, speed and pass/fail."""
    ids = [w.id for w in sample.windows]
    per = {s: stratum_stats(ids, sample.lengths, embedded.vectors, reference.vectors, rows, min_cosine)
           for s, rows in groups.items()}
    every = np.arange(len(ids))
    overall = stratum_stats(ids, sample.lengths, embedded.vectors, reference.vectors, every, min_cosine)
    return {
        "name": name,
        "fp32_layernorm": ln,
        "seconds": round(embedded.seconds, 4),
        "tokens_per_second": round(embedded.tokens_per_second, 1),
        "strata": per,
        "overall": overall,
        "passed": overall["outlier_count"] == 0,
    }


def run_validate(settings: ValidateSettings) -> dict[str, Any]:
    """Compare the low precision against FP32 on a sample; the report as a JSON-able dict."""
    settings.check()
    on_gpu = settings.gpus == 1 if settings.gpus is not None else torch.cuda.is_available()
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    precision = settings.precision or ("fp16" if on_gpu else "bf16")
    codec = load_codec(settings.model)
    pooling = settings.pooling or codec.default_pooling
    info = model_info(settings.model)
    sample = reservoir_sample(settings, codec)
    groups = strata(sample.lengths)
    if settings.token_budget:
        budget = settings.token_budget
    elif on_gpu:
        free, _ = torch.cuda.mem_get_info(device)
        # Both models may be resident while one is freed: size for fp32 weights.
        budget = auto_token_budget(free, weight_bytes=info.parameters * 4, embed_dim=info.embed_dim)
    else:
        budget = CPU_TOKEN_BUDGET

    # One model at a time: the reference is computed and freed before the low precision is loaded.
    model = prepare_model(settings.model, device, "fp32")
    attention = {"fp32": model.attention_backend}
    reference = embed_sample(model, sample.windows, budget, settings.layer, pooling, device)
    del model
    if on_gpu:
        torch.cuda.empty_cache()
    model = prepare_model(settings.model, device, precision)
    model.fused_gelu = not settings.exact_gelu  # what `runner embed` runs with the same flag
    attention[precision] = model.attention_backend
    variants = []
    low = embed_sample(model, sample.windows, budget, settings.layer, pooling, device)
    variants.append(variant_report(precision, False, low, reference, sample, groups, settings.min_cosine))
    if settings.fp32_layernorm:
        model.fp32_layernorm = True  # same weights, LayerNorm computed in fp32
        fixed = embed_sample(model, sample.windows, budget, settings.layer, pooling, device)
        variants.append(variant_report(f"{precision}+fp32_layernorm", True, fixed, reference, sample, groups,
                                       settings.min_cosine))
    report: dict[str, Any] = {
        "model": settings.model,
        "checkpoint": info.checkpoint,
        "precision": precision,
        "device": str(device),
        "attention": attention,
        "gelu": "tanh, fused into fc1's GEMM" if model.fused_gelu_in_use else "erf (fair-esm's)",
        "layer": settings.layer,
        "pooling": pooling,
        "token_budget": budget,
        "min_cosine": settings.min_cosine,
        "sample": {
            "requested": settings.sample,
            "used": len(sample.windows),
            "records_read": sample.records_read,
            "rejected": sample.rejected,
            "truncated": sample.truncated,
            "seed": settings.seed,
        },
        "strata_method": "terciles by rank of the sampled lengths (residues, after truncation)",
        "reference": {
            "precision": "fp32",
            "seconds": round(reference.seconds, 4),
            "tokens_per_second": round(reference.tokens_per_second, 1),
        },
        "variants": variants,
    }
    if settings.fp32_layernorm:
        plain, fixed_report = variants
        report["fp32_layernorm"] = {
            "plain_passed": plain["passed"],
            "fixed_passed": fixed_report["passed"],
            "recovers": (not plain["passed"]) and fixed_report["passed"],
            # > 1: the fp32 LayerNorms cost that factor in time (measured on this sample and device).
            "slowdown": round(fixed_report["seconds"] / plain["seconds"], 3) if plain["seconds"] > 0 else None,
            "cosine_min_plain": plain["overall"]["cosine_min"],
            "cosine_min_fixed": fixed_report["overall"]["cosine_min"],
        }
    # The check passes when the configuration you would run passes: with --fp32-layernorm, that is the
    # fp32-LayerNorm variant (the plain one is reported beside it).
    report["passed"] = variants[-1]["passed"]
    return report


def write_report(report: dict[str, Any], path: Path) -> None:
    """The report as indented JSON; RunnerError when the file cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise RunnerError(f"cannot write {path} ({e.strerror or e}): choose a writable --out") from None


def format_table(report: dict[str, Any]) -> str:
    """The terminal summary: one line per variant and stratum, then speed and the outliers."""
    header = (f"{'variant':<22} {'stratum':<8} {'n':>5} {'length':>11} {'cos min':>10} {'cos mean':>10} "
              f"{'cos max':>10} {'mean|d|':>9} {'rel std':>9} {'rel norm':>9} {'below':>6}")
    lines = [
        f"{report['model']}: {report['precision']} vs fp32 on {report['device']}, "
        f"{report['sample']['used']} sampled sequence(s), threshold {report['min_cosine']}",
        header,
        "-" * len(header),
    ]
    for v in report["variants"]:
        for name, s in [*v["strata"].items(), ("all", v["overall"])]:
            if not s["n"]:
                lines.append(f"{v['name']:<22} {name:<8} {0:>5}")
                continue
            lengths = f"{s['length_min']}-{s['length_max']}"
            lines.append(
                f"{v['name']:<22} {name:<8} {s['n']:>5} {lengths:>11} {s['cosine_min']:>10.7f} "
                f"{s['cosine_mean']:>10.7f} {s['cosine_max']:>10.7f} {s['mean_abs_diff']:>9.2e} "
                f"{s['rel_std_diff']:>9.2e} {s['rel_norm_diff']:>9.2e} {s['outlier_count']:>6}"
            )
    lines.append("")
    lines.append(f"speed: fp32 {report['reference']['tokens_per_second']:,.0f} tok/s; "
                 + "; ".join(f"{v['name']} {v['tokens_per_second']:,.0f} tok/s" for v in report["variants"]))
    ln = report.get("fp32_layernorm")
    if ln:
        verdict = ("recovers the failing precision" if ln["recovers"] else
                   "not needed (plain precision passes)" if ln["plain_passed"] else "does not recover it")
        lines.append(f"fp32 LayerNorm: {verdict}; time x{ln['slowdown']} vs plain {report['precision']}")
    for v in report["variants"]:
        worst = [o for s in v["strata"].values() if s["n"] for o in s["outliers"]]
        if worst:
            worst.sort(key=lambda o: o["cosine"])
            shown = ", ".join(f"{o['id']} ({o['cosine']:.7f})" for o in worst[:10])
            lines.append(f"{v['name']}: {v['overall']['outlier_count']} below {report['min_cosine']}: {shown}")
    lines.append("PASS" if report["passed"] else "FAIL")
    return "\n".join(lines)


def failure(report: dict[str, Any], path: Path) -> ValidationFailed:
    """The one-line error of a failed check, naming the worst ids."""
    v = report["variants"][-1]
    worst = sorted((o for s in v["strata"].values() if s["n"] for o in s["outliers"]), key=lambda o: o["cosine"])
    shown = ", ".join(f"{o['id']} (cosine {o['cosine']:.7f})" for o in worst[:5])
    hint = "" if v["fp32_layernorm"] else ", or try --fp32-layernorm"
    return ValidationFailed(
        f"{v['overall']['outlier_count']} of {v['overall']['n']} sampled sequence(s) below --min-cosine "
        f"{report['min_cosine']} in {v['name']}: {shown}; see {path}. Embed with --precision fp32{hint}"
    )
