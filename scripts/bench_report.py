"""Figures of a result document: per-model ratios against the reference and between runs, the worst model
per target at the top level, the markdown table, and the merge of two documents (later runs win)."""

from __future__ import annotations

import re
import statistics

# Run names: g<GPUs>_s<rate>, with _r<k> for the k-th repeat (k >= 2) and _eager for the eager baseline.
_RUN_NAME = re.compile(r"^g(?P<gpus>\d+)_s(?P<rate>[0-9.e-]+)(?:_r(?P<repeat>\d+))?$")

TARGETS = {  # name -> (target, "min" = at least, "max" = at most)
    # issue 15: --per-token --per-token-dtype float16 at >= 0.8x, and three layers x three poolings within 3 %,
    # of the plain (one layer, pooled) run in the same call (bench.py --outputs per_token_fp16,layers3)
    "per_token_fp16_vs_pooled": (0.8, "min"),
    "layers3_vs_pooled": (0.97, "min"),
    "vs_reference_packed_fp16": (1.0, "min"),
    "vs_fair_esm_fp32": (10.0, "min"),
    "scaling_efficiency_4gpu": (0.9, "min"),
    "shadow_cost_0.01": (0.03, "max"),
    # ESM C: against transformers' EsmcModel at its best batch size, and the per-GPU tok/s target of the model.
    "vs_transformers_esmc": (3.0, "min"),
    "vs_target_tok_per_s": (1.0, "min"),
}


# A shadow run's window with the shadow running (the manifest's `throughput.with_shadow`) is measured only when it
# holds at least this many batches and this share of the run's tokens; shorter, the rate is mostly its edges.
MIN_WINDOW_BATCHES = 5
MIN_WINDOW_SHARE = 0.1


def _div(a, b):
    return round(a / b, 4) if a and b else None


def shadow_window(run: dict) -> dict | None:
    """The run's `with_shadow` window (actor clock from the shadow's first comparison to the end) when it is long
    enough to measure; None when it is too short, empty, or missing (no shadow result, or an older manifest)."""
    window = run.get("with_shadow")
    if not window or not window.get("tokens_per_second"):
        return None
    too_short = window.get("tokens", 0) < MIN_WINDOW_SHARE * (run.get("tokens") or 0)
    if window.get("batches", 0) < MIN_WINDOW_BATCHES or too_short:
        return None
    return window


def shadow_lagged(run: dict) -> bool:
    """Whether a shadow run's throughput cost could not be measured: the shadow ran alongside too little of the
    main stream. Runs whose manifests have `throughput.with_shadow` lag when that window is too short to measure
    (`shadow_window`); a late start alone does not matter, the cost is read over the window. Older runs fall back
    to `shadow.compared_after_stream`: most comparisons after the stream ended (the FP32 actors were still
    starting, or fell behind), so the whole-job figure did not see the shadow's work. Runs recorded before that
    field existed carry `shadow_lagged: true` with their evidence in `shadow_lag_evidence`."""
    if run.get("shadow_lagged"):
        return True
    if "with_shadow" in run:
        return shadow_window(run) is None
    shadow = run.get("shadow") or {}
    compared, after = shadow.get("compared") or 0, shadow.get("compared_after_stream")
    return bool(compared) and after is not None and after > compared / 2


def tokens_per_second_with_shadow(run: dict) -> float | None:
    """A shadow run's steady tok/s with the shadow running: its window's rate when measurable, else (files from
    before the window) its whole-job steady rate."""
    window = shadow_window(run)
    return window["tokens_per_second"] if window else run.get("tokens_per_second_steady")


def compute_ratios(model: dict) -> dict:
    """Ratios of one model from its runs and reference figures (steady tok/s; `_wall` variants too).
    A pair run several times (`_r2`, `_r3`, ...) counts with its median; shadow costs also per repeat.
    `shadow_cost_R` compares the shadow runs' rate while their shadow ran (`tokens_per_second_with_shadow`) with
    the shadow-0 runs' steady rate; `shadow_cost_R_whole_job` compares the whole jobs. A shadow cost whose runs
    lagged (`shadow_lagged`) is kept as `shadow_cost_R_lagging` (whole job), not as a result."""
    runs = model.get("runs", {})
    ref = model.get("reference", {}).get("modes", {})
    ref_packed = ref.get("packed16", {}).get("tok_per_s")
    ref_fp32 = ref.get("extract32", {}).get("tok_per_s")
    ref_fp16 = ref.get("extract16", {}).get("tok_per_s")
    ok = {k: r for k, r in runs.items() if r.get("exit_code") == 0 and r.get("tokens")}
    out: dict = {"reference_tok_per_s": {"extract32": ref_fp32, "extract16": ref_fp16, "packed16": ref_packed}}
    # ESM C's reference: transformers' EsmcModel (modes hfc16, hfc16_<tokens per batch>); the best batch size counts.
    ref_esmc = {mode: rec.get("tok_per_s") for mode, rec in ref.items() if mode.startswith("hfc16") and rec.get("tok_per_s")}
    ref_esmc_best = max(ref_esmc.values(), default=None)
    if ref_esmc:
        out["reference_tok_per_s"] = {**ref_esmc, "best": ref_esmc_best}
    if not ok:
        return out
    base_g = min(r["gpus"] for r in ok.values())
    # Repeats of one (GPUs, rate) pair, in run order: 1, 2, ... (`bench.py gpu --repeats N` interleaves them).
    repeats: dict[tuple[int, str], dict[int, dict]] = {}
    for name, r in ok.items():
        match = _RUN_NAME.match(name)
        if match:
            pair = (int(match["gpus"]), f"{float(match['rate']):g}")
            repeats.setdefault(pair, {})[int(match["repeat"] or 1)] = r

    def values(g, s, key, figure=None):
        """Each repeat's figure: `figure(run)` when given, else the run's `key`."""
        runs_of = repeats.get((g, f"{s:g}"), {})
        found = {k: figure(r) if figure else r.get(key) for k, r in sorted(runs_of.items())}
        return {k: v for k, v in found.items() if v}

    def get(g, s, key="tokens_per_second_steady", figure=None):
        """The run's figure; the median over repeats when the pair was run more than once."""
        found = list(values(g, s, key, figure).values())
        return statistics.median(found) if found else None

    def paired_costs(rate, key, figure=None):
        """1 - shadowed / unshadowed per repeat: each pair ran back to back, so slow drift cancels."""
        base, shadowed = values(base_g, 0, key), values(base_g, rate, key, figure)
        return [round(1 - shadowed[k] / base[k], 4) for k in sorted(set(base) & set(shadowed))]

    for suffix, key in (("", "tokens_per_second_steady"), ("_wall", "tokens_per_second_wall")):
        per_gpu = (get(base_g, 0, key) or 0) / max(base_g, 1) or None
        out[f"runner_tok_per_s_per_gpu{suffix}"] = round(per_gpu, 1) if per_gpu else None
        out[f"vs_reference_packed_fp16{suffix}"] = _div(per_gpu, ref_packed)
        out[f"vs_fair_esm_fp32{suffix}"] = _div(per_gpu, ref_fp32)
        out[f"vs_fair_esm_fp16{suffix}"] = _div(per_gpu, ref_fp16)
        if ref_esmc_best:
            out[f"vs_transformers_esmc{suffix}"] = _div(per_gpu, ref_esmc_best)
        if model.get("target_tok_per_s"):
            out[f"vs_target_tok_per_s{suffix}"] = _div(per_gpu, model["target_tok_per_s"])
        with_shadow = get(base_g, 0.01, key)
        if with_shadow and get(base_g, 0, key):
            out[f"vs_reference_packed_fp16_shadow_0.01{suffix}"] = _div(with_shadow / max(base_g, 1), ref_packed)
        for rate in sorted({r.get("shadow_rate") or 0 for r in ok.values() if r["gpus"] == base_g} - {0}):
            shadowed = get(base_g, rate, key)
            if not (shadowed and get(base_g, 0, key)):
                continue
            shadow_runs = {name: r for name, r in ok.items() if r["gpus"] == base_g and r.get("shadow_rate") == rate}
            lagging = [name for name, r in shadow_runs.items() if shadow_lagged(r)]
            whole_job = round(1 - shadowed / get(base_g, 0, key), 4)
            if suffix == "":  # the steady clock: also read over the part of each job that the shadow ran in
                out[f"shadow_cost_{rate:g}_whole_job"] = whole_job
            # Wall clocks include start-up and the shadow's tail: only the whole job has one.
            figure = tokens_per_second_with_shadow if suffix == "" and not lagging else None
            name = f"shadow_cost_{rate:g}" + ("_lagging" if lagging else "")
            measured = get(base_g, rate, key, figure) if figure else shadowed
            out[f"{name}{suffix}"] = round(1 - measured / get(base_g, 0, key), 4)
            if figure:
                windows = [shadow_window(r) is not None for r in shadow_runs.values()]
                out[f"shadow_cost_{rate:g}_measured_over"] = (
                    "the shadow's window" if all(windows) else "the whole job" if not any(windows)
                    else "the shadow's window (runs that have one), else the whole job")
            if len(paired_costs(rate, key, figure)) > 1:
                out[f"{name}_per_repeat{suffix}"] = paired_costs(rate, key, figure)
            if lagging:
                out["shadow_lagging_runs"] = sorted(set(out.get("shadow_lagging_runs", [])) | set(lagging))
        eager = ok.get(f"g{base_g}_s0_eager", {}).get(key)
        if eager and get(base_g, 0, key):
            out[f"compile_speedup{suffix}"] = _div(get(base_g, 0, key), eager)
        # Output variants (bench.py --outputs): each repeat runs the plain shadow-0 run and the variants back to
        # back; the ratio is the median of the per-repeat ratios (drift between repeats cancels), or the ratio of
        # the medians for runs that cannot be paired.
        plain = get(base_g, 0, key)
        for variant in sorted({r["variant"] for r in ok.values() if r.get("variant")}):
            found = [r.get(key) for r in ok.values() if r.get("variant") == variant and r.get(key)]
            ratios = paired_ratios(ok, variant, base_g, key)
            if ratios:
                out[f"{variant}_vs_pooled{suffix}"] = round(statistics.median(ratios.values()), 4)
                if len(ratios) > 1:
                    out[f"{variant}_vs_pooled_per_repeat{suffix}"] = [ratios[k] for k in sorted(ratios)]
            elif found and plain:
                out[f"{variant}_vs_pooled{suffix}"] = _div(statistics.median(found), plain)
            if suffix == "":
                # The GPU's share of the cost: the actors' forward rate (time inside the forward, its pooling and
                # copy back), against the rest (the actors waiting for input or output: the busy fraction).
                forward = paired_ratios(ok, variant, base_g, "forward_tokens_per_second")
                if forward:
                    out[f"{variant}_forward_vs_pooled"] = round(statistics.median(forward.values()), 4)
                variant_runs = [r for r in ok.values() if r.get("variant") == variant]
                rates = [r["per_token_bytes_per_second"] for r in variant_runs if r.get("per_token_bytes_per_second")]
                if rates:
                    out[f"{variant}_bytes_per_second"] = statistics.median(rates)
                out[f"{variant}_driver"] = {
                    "rss_peak_mib": max((r.get("driver_rss_peak_mib") or 0 for r in variant_runs), default=None),
                    "cpu_fraction": max((r.get("driver_cpu_fraction") or 0 for r in variant_runs), default=None),
                }
        one, four = get(1, 0, key), get(4, 0, key)
        if one and four:
            out[f"scaling_efficiency_4gpu{suffix}"] = round(four / (4 * one), 4)
    return out


def output_pairs(runs: dict, variant: str, gpus: int) -> dict[int, tuple[dict, dict]]:
    """{repeat: (plain shadow-0 run, `variant` run of that repeat)} at `gpus` GPUs (run names g<G>_s0[_r<k>] and
    g<G>_s0[_r<k>]_<variant>, as bench.py writes them), for the runs that finished."""
    pairs: dict[int, tuple[dict, dict]] = {}
    for name, run in runs.items():
        if run.get("variant") != variant or not name.endswith(f"_{variant}"):
            continue
        base = name.removesuffix(f"_{variant}")
        match, plain = _RUN_NAME.match(base), runs.get(base)
        if match and plain and int(match["gpus"]) == gpus and float(match["rate"]) == 0:
            pairs[int(match["repeat"] or 1)] = (plain, run)
    return pairs


def paired_ratios(runs: dict, variant: str, gpus: int, key: str) -> dict[int, float]:
    """{repeat: variant run's `key` / the plain run's} for the pairs where both have the figure."""
    return {k: round(v[key] / p[key], 4) for k, (p, v) in output_pairs(runs, variant, gpus).items()
            if p.get(key) and v.get(key)}


def output_pairs_lines(model: dict) -> list[str]:
    """One line per output-variant run and its plain run (steady tok/s, forward tok/s, busy fraction, ratio), then
    the median ratio per variant: what `bench.py gpu --outputs` logs at the end of a model."""
    runs = {k: r for k, r in model.get("runs", {}).items() if r.get("exit_code") == 0 and r.get("tokens")}
    if not runs:
        return []
    gpus = min(r["gpus"] for r in runs.values())
    lines = []

    def figures(run: dict) -> str:
        busy = run.get("actor_busy_fraction")
        return (f"{run.get('tokens_per_second_steady') or 0:,.0f} tok/s (forward "
                f"{run.get('forward_tokens_per_second') or 0:,.0f}, busy {busy if busy is not None else '?'})")

    for variant in sorted({r["variant"] for r in runs.values() if r.get("variant")}):
        pairs = output_pairs(runs, variant, gpus)
        ratios = paired_ratios(runs, variant, gpus, "tokens_per_second_steady")
        for k in sorted(pairs):
            plain, run = pairs[k]
            lines.append(f"repeat {k}: pooled {figures(plain)} | {variant} {figures(run)}: {ratios.get(k)}")
        if ratios:
            forward = paired_ratios(runs, variant, gpus, "forward_tokens_per_second")
            lines.append(f"{variant}_vs_pooled = {statistics.median(ratios.values()):.4f} (median of {len(ratios)} "
                         f"pair(s); forward {statistics.median(forward.values()) if forward else None})")
    return lines


def summarize(doc: dict) -> None:
    """Top-level ratios: the worst model for each target (min of at-least ratios, max of costs)."""
    for name, (target, kind) in TARGETS.items():
        values = {m: d.get(name) for m, d in doc["models"].items() if d.get(name) is not None}
        if not values:
            continue
        worst = min(values.values()) if kind == "min" else max(values.values())
        doc[name] = worst
        doc.setdefault("targets", {})[name] = {
            "target": f">= {target}" if kind == "min" else f"<= {target}",
            "worst": worst, "per_model": values,
            "pass": worst >= target if kind == "min" else worst <= target,
        }


def markdown_table(doc: dict) -> str:
    lines = ["| model | fair-esm FP32 | fair-esm FP16 | packed FP16 (ref) | runner / GPU steady (wall) | "
             "vs packed16 | vs FP32 | shadow 0.01 cost | 4-GPU scaling | actor GPU peak MiB | driver RSS MiB | "
             "transformers best (ESM C) | vs it | vs target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, spec=",.0f"):
        return "—" if v is None else format(v, spec)

    def shadow_cell(d):
        if d.get("shadow_cost_0.01_lagging") is not None:  # not overlapped with the main path: not a cost
            return f"lagged ({f(d['shadow_cost_0.01_lagging'], '.1%')})"
        return f(d.get("shadow_cost_0.01"), ".1%")

    for m, d in doc["models"].items():
        ref = d.get("reference_tok_per_s", {})
        runs = [r for r in d.get("runs", {}).values() if r.get("exit_code") == 0]
        gpu_peak = max((r.get("gpu_actor_peak_mib_max") or 0 for r in runs), default=0) or None
        rss = max((r.get("driver_rss_peak_mib") or 0 for r in runs), default=0) or None
        lines.append(
            f"| {m} | {f(ref.get('extract32'))} | {f(ref.get('extract16'))} | {f(ref.get('packed16'))} | "
            f"{f(d.get('runner_tok_per_s_per_gpu'))} ({f(d.get('runner_tok_per_s_per_gpu_wall'))}) | "
            f"{f(d.get('vs_reference_packed_fp16'), '.2f')}x | {f(d.get('vs_fair_esm_fp32'), '.1f')}x | "
            f"{shadow_cell(d)} | {f(d.get('scaling_efficiency_4gpu'), '.2f')} | "
            f"{f(gpu_peak)} | {f(rss)} | {f(ref.get('best'))} | {f(d.get('vs_transformers_esmc'), '.2f')}x | "
            f"{f(d.get('vs_target_tok_per_s'), '.2f')}x |"
        )
    return "\n".join(lines)


def merge_docs(base: dict, new: dict) -> dict:
    """`new` into `base`: per model, its runs and reference replace those of the same name; ratios recomputed."""
    for key, value in new.items():
        if key != "models" and key not in TARGETS and key != "targets":
            base.setdefault(key, value)
    for m, entry in new.get("models", {}).items():
        into = base.setdefault("models", {}).setdefault(m, {})
        runs = {**into.get("runs", {}), **entry.get("runs", {})}
        into.update({k: v for k, v in entry.items() if k != "runs"})
        into["runs"] = runs
        into.update(compute_ratios(into))
    summarize(base)
    return base
