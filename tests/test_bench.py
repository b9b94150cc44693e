"""scripts/bench.py and its modules (bench_data, bench_monitor, bench_report, bench_cpu_stages): the dry-run
plan of `bench.py gpu`, the ratios and merge of result documents, the synthetic inputs and random
checkpoints, subprocess monitoring and the `_cpu-one` CPU-stage run. CPU only, no Ray, no GPU."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
for _path in (str(REPO), str(SCRIPTS)):  # as `python scripts/bench.py` sees them (scripts/ is not a package)
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench  # noqa: E402
from bench_attention import parse_config  # noqa: E402
from bench_cpu_stages import BENCH  # noqa: E402
from bench_data import AA, synth, synth_arrays, write_random_esm2, write_short_fasta, write_synth_fasta  # noqa: E402
from bench_monitor import child_env, run_logged, tail  # noqa: E402
from bench_report import (  # noqa: E402
    TARGETS,
    compute_ratios,
    markdown_table,
    merge_docs,
    output_pairs_lines,
    summarize,
)
from conftest import load_script, pack, run_bench  # noqa: E402


def read_fasta(path: Path) -> list[tuple[str, str]]:
    """(first word of the header, sequence) of every record."""
    records: list[tuple[str, str]] = []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            records.append((line[1:].split()[0], ""))
        elif line:
            records[-1] = (records[-1][0], records[-1][1] + line)
    return records


def runner_commands(stdout: str) -> list[list[str]]:
    """The planned `runner embed` command lines of a dry run, split into words."""
    return [line.split() for line in stdout.splitlines() if " -m runner embed " in line]


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


# --- command line: gpu --dry-run -----------------------------------------------------------------------


def test_gpu_dry_run_prints_one_runner_command_per_shadow_rate(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    res = run_bench("gpu", "--models", "650M", "--gpus", "1", "--shadow-rates", "0,0.01", "--seqs", "650M=64",
                    "--cpu-check", "0", "--dry-run", "--workdir", str(work), "--out", str(out))
    assert res.returncode == 0, res.stderr
    cmds = runner_commands(res.stdout)
    assert [option(c, "--shadow-rate") for c in cmds] == ["0", "0.01"]
    for c, rate in zip(cmds, ["0", "0.01"], strict=True):
        assert c[0] == sys.executable and c[4] == str(work / "650M-64.fasta")  # 64 sequences x 1 GPU
        assert option(c, "--model") == str(work / "esm2-650M.pt")
        assert option(c, "--out") == str(work / f"out-650M-g1-s{rate}")
        assert option(c, "--gpus") == "1" and option(c, "--rows-per-part") == "2048"
        assert "--no-progress" in c
    assert "(no --reference: reference figures skipped)" in res.stdout
    assert list(work.iterdir()) == [] and not out.exists()  # a dry run writes no input, checkpoint or result


def test_gpu_dry_run_shadow_rates_only_at_the_smallest_gpu_count(tmp_path: Path) -> None:
    ref = tmp_path / "reference_bench.py"  # only its path is printed
    res = run_bench("gpu", "--models", "650M,3B", "--gpus", "4,1", "--shadow-rates", "0,0.01", "--seqs", "8",
                    "--ref-seqs", "650M=5", "--reference", str(ref), "--rows-per-part", "16",
                    "--cpu-check", "0", "--dry-run", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    plan = [(Path(c[4]).name, option(c, "--gpus"), option(c, "--shadow-rate"), option(c, "--rows-per-part"))
            for c in runner_commands(res.stdout)]
    assert plan == [
        ("650M-8.fasta", "1", "0", "16"), ("650M-8.fasta", "1", "0.01", "16"), ("650M-32.fasta", "4", "0", "16"),
        ("3B-8.fasta", "1", "0", "16"), ("3B-8.fasta", "1", "0.01", "16"), ("3B-32.fasta", "4", "0", "16"),
    ]
    refs = [line.split() for line in res.stdout.splitlines() if str(ref) in line]
    default_3b = bench.DEFAULT_REF_SEQS["3B"]
    assert [r[2:] for r in refs] == [["650M", "5", bench.REF_MODES], ["3B", str(default_3b), bench.REF_MODES]]


def test_gpu_unknown_model_is_refused(tmp_path: Path) -> None:
    res = run_bench("gpu", "--models", "650M,7B", "--dry-run", "--workdir", str(tmp_path))
    assert res.returncode != 0 and "unknown model(s) ['7B']" in res.stderr


def test_parse_per_model() -> None:
    defaults = {"650M": 20480, "3B": 8192}
    assert bench.parse_per_model(None, defaults) == defaults
    assert bench.parse_per_model("64", defaults) == {"650M": 64, "3B": 64}
    assert bench.parse_per_model("3B=16", defaults) == {"650M": 20480, "3B": 16}


# --- runner outputs: steady clock from part files, manifest figures --------------------------------------


def test_steady_from_parts_uses_the_parts_after_the_first(tmp_path: Path) -> None:
    (tmp_path / "embeddings").mkdir()
    lengths = [[100, 200], [300], [50, 50, 50], [1000]]
    stamps = [1_000.0, 1_002.0, 1_003.5, 1_006.0]
    for i, (part, stamp) in enumerate(zip(lengths, stamps, strict=True)):
        path = tmp_path / "embeddings" / f"part-{i:05d}.arrow"
        table = pa.table({"length": pa.array(part, pa.int32())})
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.utime(path, (stamp, stamp))
    tokens = sum(sum(p) + 2 * len(p) for p in lengths[1:])  # residues + BOS/EOS, first part excluded
    got = bench.steady_from_parts(tmp_path)
    assert got["parts"] == 4 and got["steady_tokens"] == tokens
    assert got["steady_seconds"] == pytest.approx(stamps[-1] - stamps[0], abs=1e-3)
    assert got["steady_tokens_per_second"] == pytest.approx(tokens / (stamps[-1] - stamps[0]), abs=0.1)
    for extra in (2, 3):  # fewer than 3 parts: no clock
        (tmp_path / "embeddings" / f"part-0000{extra}.arrow").unlink()
    assert bench.steady_from_parts(tmp_path) == {"parts": 2}


def test_find_keys_flattens_matching_manifest_entries() -> None:
    import re

    manifest = {"throughput": {"steady_tokens_per_second": 5.0, "tokens": 9},
                "workers": {"gpu0": {"peak_memory_mib": 100, "rows": 3}}, "memory": {"rss": 1}}
    got = bench.find_keys(manifest, re.compile(r"steady|peak|memory", re.I))
    assert got == {"throughput.steady_tokens_per_second": 5.0, "workers.gpu0.peak_memory_mib": 100,
                   "memory": {"rss": 1}}


# A manifest's throughput section with every clock sane: 60 s wall, first output at 10 s.
THROUGHPUT = {"tokens": 6_000_000, "wall_seconds": 60.0, "first_output_seconds": 10.0,
              "tokens_per_second": 100_000.0, "steady_tokens_per_second": 150_000.0,
              "actor_steady_tokens_per_second": 123_456.7, "forward_tokens_per_second": 130_000.0,
              "actor_busy_fraction": 0.95}
PARTS = {"parts": 5, "steady_seconds": 40.0, "steady_tokens_per_second": 140_000.0}


def test_steady_candidates_put_the_actor_clock_first() -> None:
    mem = {"gpu_busy_seconds": 48.0}
    candidates = bench.steady_candidates(THROUGHPUT, mem, PARTS)
    assert candidates == {"actor clock": 123_456.7, "gpu busy window": round(6_000_000 / 48.0, 1),
                          "manifest": 150_000.0, "part mtimes": 140_000.0, "wall": 100_000.0}
    assert bench.pick_steady(candidates) == (123_456.7, "actor clock")


@pytest.mark.parametrize("actors", [None, 0.0])  # a manifest from before the actor clock, or an actor with 1 batch
def test_steady_candidates_fall_back_to_the_gpu_busy_window(actors: float | None) -> None:
    thr = {k: v for k, v in THROUGHPUT.items() if k != "actor_steady_tokens_per_second"}
    if actors is not None:
        thr["actor_steady_tokens_per_second"] = actors
    candidates = bench.steady_candidates(thr, {"gpu_busy_seconds": 48.0}, PARTS)
    assert list(candidates)[0] == "actor clock" and candidates["actor clock"] is None
    assert bench.pick_steady(candidates) == (round(6_000_000 / 48.0, 1), "gpu busy window")
    # Without the busy window either: the driver's clock, then the part mtimes, then wall.
    assert bench.pick_steady(bench.steady_candidates(thr, {}, PARTS)) == (150_000.0, "manifest")
    late = dict(thr, first_output_seconds=55.0)  # first output after 80 % of the wall time: not sane
    assert bench.pick_steady(bench.steady_candidates(late, {}, PARTS)) == (140_000.0, "part mtimes")
    assert bench.pick_steady(bench.steady_candidates(late, {}, {"parts": 2})) == (100_000.0, "wall")


WINDOW = {"from_seconds": 21.5, "batches": 40, "tokens": 2_500_000, "span_seconds": 21.0, "tokens_per_second": 119_000.0}


@pytest.mark.parametrize("with_shadow", ["absent", None, WINDOW])  # an older manifest, no shadow result, a window
def test_run_runner_keeps_the_actor_figures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            with_shadow: str | dict | None) -> None:
    """A run's result takes its steady rate from the actor clock and keeps the forward rate, the busy fraction and
    the window with the shadow running (only when the manifest has the field, so that old runs fall back)."""
    out = tmp_path / "out"
    throughput = THROUGHPUT if with_shadow == "absent" else THROUGHPUT | {"with_shadow": with_shadow}

    def fake_run_logged(cmd, log_path, timeout, env=None, monitor=False):  # runner "ran" and wrote its manifest
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps({"status": "complete", "throughput": throughput}))
        return 0, 70.0, {"gpu_busy_seconds": 48.0}

    monkeypatch.setattr(bench, "run_logged", fake_run_logged)
    args = SimpleNamespace(rows_per_part=2048, token_budget=None, runner_arg=None, timeout=60)
    result = bench.run_runner(tmp_path / "in.fasta", tmp_path / "m.pt", out, 1, 0.01, args, tmp_path)
    assert (result["tokens_per_second_steady"], result["steady_source"]) == (123_456.7, "actor clock")
    assert result["forward_tokens_per_second"] == 130_000.0 and result["actor_busy_fraction"] == 0.95
    assert result["steady_candidates"]["gpu busy window"] == round(6_000_000 / 48.0, 1)
    if with_shadow == "absent":
        assert "with_shadow" not in result
    else:
        assert result["with_shadow"] == with_shadow


# --- ratios, targets, merge ----------------------------------------------------------------------------


def run(gpus: int, shadow: float, steady: float, wall: float, exit_code: int = 0) -> dict:
    return {"gpus": gpus, "shadow_rate": shadow, "exit_code": exit_code, "tokens": 1_000_000,
            "tokens_per_second_steady": steady, "tokens_per_second_wall": wall}


REF = {"modes": {"packed16": {"tok_per_s": 180_000.0}, "extract32": {"tok_per_s": 16_000.0},
                 "extract16": {"tok_per_s": 64_000.0}}}


def test_compute_ratios_from_runs_and_reference() -> None:
    s0, s01, s1, g4, eager = 200_000.0, 193_000.0, 150_000.0, 720_000.0, 125_000.0
    w0, w01, w4 = 100_000.0, 98_000.0, 300_000.0
    model = {
        "reference": REF,
        "runs": {
            "g1_s0": run(1, 0.0, s0, w0),
            "g1_s0.01": run(1, 0.01, s01, w01),
            "g1_s0.1": run(1, 0.1, s1, 90_000.0),
            "g4_s0": run(4, 0.0, g4, w4),
            "g1_s0_eager": run(1, 0.0, eager, 70_000.0),
            "g2_s0": run(2, 0.0, 1e9, 1e9, exit_code=1),  # failed: ignored
        },
    }
    packed, fp32, fp16 = 180_000.0, 16_000.0, 64_000.0
    got = compute_ratios(model)
    assert got["reference_tok_per_s"] == {"extract32": fp32, "extract16": fp16, "packed16": packed}
    assert got["runner_tok_per_s_per_gpu"] == s0
    assert got["vs_reference_packed_fp16"] == pytest.approx(s0 / packed, abs=1e-4)
    assert got["vs_fair_esm_fp32"] == pytest.approx(s0 / fp32, abs=1e-4)
    assert got["vs_fair_esm_fp16"] == pytest.approx(s0 / fp16, abs=1e-4)
    assert got["shadow_cost_0.01"] == pytest.approx(1 - s01 / s0, abs=1e-4)
    assert got["vs_reference_packed_fp16_shadow_0.01"] == pytest.approx(s01 / packed, abs=1e-4)
    assert got["shadow_cost_0.1"] == pytest.approx(1 - s1 / s0, abs=1e-4)
    assert got["compile_speedup"] == pytest.approx(s0 / eager, abs=1e-4)
    assert got["scaling_efficiency_4gpu"] == pytest.approx(g4 / (4 * s0), abs=1e-4)
    # the same ratios on wall-clock rates (Ray start-up and model loading included)
    assert got["runner_tok_per_s_per_gpu_wall"] == w0
    assert got["vs_reference_packed_fp16_wall"] == pytest.approx(w0 / packed, abs=1e-4)
    assert got["shadow_cost_0.01_wall"] == pytest.approx(1 - w01 / w0, abs=1e-4)
    assert got["scaling_efficiency_4gpu_wall"] == pytest.approx(w4 / (4 * w0), abs=1e-4)


def test_compute_ratios_takes_medians_of_repeats_and_pairs_their_shadow_costs() -> None:
    base = [250_000.0, 262_000.0, 256_000.0]  # three repeats of the shadow-0 run, back to back with ...
    shadowed = [243_000.0, 249_000.0, 250_000.0]  # ... the three shadow-0.01 runs
    runs = {}
    for k, (b, s) in enumerate(zip(base, shadowed, strict=True), start=1):
        suffix = f"_r{k}" if k > 1 else ""
        runs[f"g1_s0{suffix}"] = run(1, 0.0, b, b / 2)
        runs[f"g1_s0.01{suffix}"] = run(1, 0.01, s, s / 2)
    runs["g1_s0_eager"] = run(1, 0.0, 1.0, 1.0)  # not a repeat of g1_s0
    got = compute_ratios({"reference": REF, "runs": runs})
    assert got["runner_tok_per_s_per_gpu"] == sorted(base)[1]  # the median
    assert got["shadow_cost_0.01"] == pytest.approx(1 - sorted(shadowed)[1] / sorted(base)[1], abs=1e-4)
    assert got["shadow_cost_0.01_per_repeat"] == [round(1 - s / b, 4) for b, s in zip(base, shadowed, strict=True)]
    assert got["compile_speedup"] == pytest.approx(sorted(base)[1] / 1.0, abs=1e-4)
    one = compute_ratios({"reference": REF, "runs": {k: v for k, v in runs.items() if "_r" not in k}})
    assert "shadow_cost_0.01_per_repeat" not in one  # a single pair has no spread to show


@pytest.mark.parametrize("after_stream", [8, 2])
def test_a_lagging_shadow_is_not_counted_as_a_shadow_cost(after_stream: int) -> None:
    """When most comparisons came after the main stream ended, the shadow's work was not overlapped with the
    main path: its 'cost' is kept aside (`_lagging`) and cannot pass or fail the target."""
    shadowed = run(1, 0.01, 199_000.0, 50_000.0)
    shadowed["shadow"] = {"compared": 10, "compared_after_stream": after_stream}
    got = compute_ratios({"reference": REF, "runs": {"g1_s0": run(1, 0.0, 200_000.0, 100_000.0),
                                                     "g1_s0.01": shadowed}})
    lagging = after_stream > 5
    assert ("shadow_cost_0.01" in got) is not lagging
    assert ("shadow_cost_0.01_lagging" in got) is lagging
    assert got.get("shadow_lagging_runs") == (["g1_s0.01"] if lagging else None)
    cost = got["shadow_cost_0.01_lagging" if lagging else "shadow_cost_0.01"]
    assert cost == pytest.approx(0.005, abs=1e-4)
    doc = {"models": {"3B": got}}
    summarize(doc)
    assert ("shadow_cost_0.01" in doc.get("targets", {})) is not lagging
    assert ("lagged (0.5%)" in markdown_table(doc)) is lagging


def test_a_run_flagged_by_hand_as_lagging_counts_as_lagging() -> None:
    """Runs recorded before manifests had compared_after_stream carry the flag and its evidence."""
    shadowed = run(1, 0.01, 199_000.0, 50_000.0) | {"shadow_lagged": True, "shadow": {"compared": 10}}
    got = compute_ratios({"reference": REF, "runs": {"g1_s0": run(1, 0.0, 200_000.0, 100_000.0),
                                                     "g1_s0.01": shadowed}})
    assert "shadow_cost_0.01" not in got and got["shadow_lagging_runs"] == ["g1_s0.01"]


def shadow_run(steady: float, window: dict | None, after_stream: int = 9) -> dict:
    """A shadow-0.01 run of 1M tokens with the manifest's `with_shadow` window; most comparisons after the stream
    (a late start), which by itself no longer makes a run lagged when its window is long enough."""
    return run(1, 0.01, steady, 50_000.0) | {"with_shadow": window,
                                              "shadow": {"compared": 10, "compared_after_stream": after_stream}}


def test_the_shadow_cost_is_read_over_the_window_the_shadow_ran_in() -> None:
    """A shadow that started late left most of the job unslowed: the whole-job rate hides its cost, the window
    from its first comparison on shows it."""
    window = {"from_seconds": 30.0, "batches": 40, "tokens": 400_000, "span_seconds": 2.1, "tokens_per_second": 190_000.0}
    got = compute_ratios({"reference": REF, "runs": {"g1_s0": run(1, 0.0, 200_000.0, 100_000.0),
                                                     "g1_s0.01": shadow_run(199_000.0, window)}})
    assert got["shadow_cost_0.01"] == pytest.approx(1 - 190_000 / 200_000, abs=1e-4)
    assert got["shadow_cost_0.01_whole_job"] == pytest.approx(1 - 199_000 / 200_000, abs=1e-4)
    assert got["shadow_cost_0.01_measured_over"] == "the shadow's window"
    assert got["shadow_cost_0.01_wall"] == pytest.approx(1 - 50_000 / 100_000, abs=1e-4)  # wall: whole job only
    assert "shadow_cost_0.01_lagging" not in got and "shadow_lagging_runs" not in got
    doc = {"models": {"3B": got}}
    summarize(doc)
    assert doc["targets"]["shadow_cost_0.01"]["worst"] == got["shadow_cost_0.01"]
    assert "| 5.0% |" in markdown_table(doc)


@pytest.mark.parametrize("window", [
    None,  # the shadow compared nothing
    {"from_seconds": 50.0, "batches": 0, "tokens": 0, "span_seconds": 0.0, "tokens_per_second": 0.0},  # only after
    {"from_seconds": 48.0, "batches": 4, "tokens": 300_000, "span_seconds": 1.0, "tokens_per_second": 190_000.0},
    {"from_seconds": 45.0, "batches": 30, "tokens": 90_000, "span_seconds": 1.0, "tokens_per_second": 190_000.0},
])
def test_a_window_too_short_to_measure_is_lagging(window: dict | None) -> None:
    """Under 5 batches or 10 % of the tokens with the shadow running: not a result, whatever the comparisons say."""
    got = compute_ratios({"reference": REF, "runs": {"g1_s0": run(1, 0.0, 200_000.0, 100_000.0),
                                                     "g1_s0.01": shadow_run(199_000.0, window, after_stream=0)}})
    assert "shadow_cost_0.01" not in got and got["shadow_lagging_runs"] == ["g1_s0.01"]
    assert got["shadow_cost_0.01_lagging"] == got["shadow_cost_0.01_whole_job"] == pytest.approx(0.005, abs=1e-4)


def test_repeats_pair_the_window_rates_and_old_runs_fall_back_to_the_whole_job() -> None:
    def window(rate: float) -> dict:
        return {"from_seconds": 20.0, "batches": 50, "tokens": 500_000, "span_seconds": 2.0, "tokens_per_second": rate}

    runs = {"g1_s0": run(1, 0.0, 200_000.0, 1.0), "g1_s0_r2": run(1, 0.0, 210_000.0, 1.0),
            "g1_s0.01": shadow_run(199_000.0, window(194_000.0)),
            "g1_s0.01_r2": shadow_run(209_000.0, window(199_500.0))}
    got = compute_ratios({"reference": REF, "runs": runs})
    assert got["shadow_cost_0.01_per_repeat"] == [round(1 - 194_000 / 200_000, 4), round(1 - 199_500 / 210_000, 4)]
    assert got["shadow_cost_0.01"] == pytest.approx(1 - (194_000 + 199_500) / 2 / 205_000, abs=1e-4)
    # A file from before the window: one repeat has none, so its whole-job rate stands in for it.
    runs["g1_s0.01_r2"] = {k: v for k, v in runs["g1_s0.01_r2"].items() if k != "with_shadow"} | {
        "shadow": {"compared": 10, "compared_after_stream": 0}}
    got = compute_ratios({"reference": REF, "runs": runs})
    assert got["shadow_cost_0.01_per_repeat"] == [round(1 - 194_000 / 200_000, 4), round(1 - 209_000 / 210_000, 4)]
    assert got["shadow_cost_0.01_measured_over"] == "the shadow's window (runs that have one), else the whole job"


def test_recorded_result_files_still_give_their_figures() -> None:
    """The files in benchmarks/results predate `with_shadow`: recomputed, every figure they hold is unchanged (the
    shadow costs fall back to the whole job), and only the new names are added."""
    recorded = [path for path in sorted((REPO / "benchmarks" / "results").glob("*-nvidia-h200*.json"))
                if any("runs" in m for m in json.loads(path.read_text()).get("models", {}).values())]
    assert recorded
    for path in recorded:
        doc = json.loads(path.read_text())
        for name, model in doc["models"].items():
            got = compute_ratios(json.loads(json.dumps(model)))
            assert {k: got[k] for k in got if k in model} == {k: model[k] for k in got if k in model}, (path, name)
            for key in (k for k in got if k.startswith("shadow_cost_") and k.endswith("_whole_job")):
                rate_cost = key.removesuffix("_whole_job")
                assert got[key] == got.get(rate_cost, got.get(f"{rate_cost}_lagging")), (path, key)
        merged = merge_docs({"models": {}}, doc)
        assert markdown_table(merged).count("\n") == 1 + len(doc["models"])


def test_gpu_dry_run_interleaves_repeats(tmp_path: Path) -> None:
    work = tmp_path / "work"
    res = run_bench("gpu", "--models", "650M", "--gpus", "1", "--shadow-rates", "0,0.01", "--seqs", "650M=64",
                    "--repeats", "2", "--cpu-check", "0", "--dry-run", "--workdir", str(work))
    assert res.returncode == 0, res.stderr
    outs = [option(c, "--out") for c in runner_commands(res.stdout)]
    assert outs == [str(work / f"out-650M-{name}") for name in ("g1-s0", "g1-s0.01", "g1-s0-r2", "g1-s0.01-r2")]


def test_compute_ratios_per_gpu_at_the_smallest_count() -> None:
    got = compute_ratios({"reference": REF, "runs": {"g4_s0": run(4, 0.0, 720_000.0, 400_000.0),
                                                     "g4_s0.01": run(4, 0.01, 684_000.0, 380_000.0)}})
    assert got["runner_tok_per_s_per_gpu"] == 720_000.0 / 4
    assert got["vs_reference_packed_fp16"] == pytest.approx(720_000.0 / 4 / 180_000.0, abs=1e-4)
    assert got["shadow_cost_0.01"] == pytest.approx(1 - 684_000.0 / 720_000.0, abs=1e-4)
    assert "scaling_efficiency_4gpu" not in got  # needs a 1-GPU run


def test_output_variants_are_planned_beside_the_plain_run_and_compared_with_it(tmp_path: Path) -> None:
    work = tmp_path / "work"
    res = run_bench("gpu", "--models", "650M", "--gpus", "1", "--shadow-rates", "0,0.01", "--seqs", "650M=64",
                    "--outputs", "per_token_fp16,layers3", "--cpu-check", "0", "--dry-run", "--workdir", str(work))
    assert res.returncode == 0, res.stderr
    cmds = runner_commands(res.stdout)
    assert [option(c, "--out").rsplit("out-650M-", 1)[1] for c in cmds] == [
        "g1-s0", "g1-s0-per_token_fp16", "g1-s0-layers3", "g1-s0.01"]
    assert cmds[1][-3:] == ["--per-token", "--per-token-dtype", "float16"]
    assert cmds[2][-4:] == ["--layers", "0,17,33", "--pooling", "mean,cls,max"]
    per_token = run(1, 0.0, 180_000.0, 90_000.0) | {"variant": "per_token_fp16", "per_token_bytes_per_second": 4.6e8,
                                                    "driver_rss_peak_mib": 900.0, "driver_cpu_fraction": 0.3}
    layers = run(1, 0.0, 196_000.0, 99_000.0) | {"variant": "layers3"}
    got = compute_ratios({"reference": REF, "runs": {"g1_s0": run(1, 0.0, 200_000.0, 100_000.0),
                                                     "g1_s0_per_token_fp16": per_token, "g1_s0_layers3": layers}})
    assert got["per_token_fp16_vs_pooled"] == pytest.approx(0.9, abs=1e-4)
    assert got["layers3_vs_pooled"] == pytest.approx(0.98, abs=1e-4)
    assert got["per_token_fp16_bytes_per_second"] == 4.6e8
    assert got["per_token_fp16_driver"] == {"rss_peak_mib": 900.0, "cpu_fraction": 0.3}
    assert got["runner_tok_per_s_per_gpu"] == 200_000.0  # the variants are not plain runs


def test_output_variants_alternate_sides_over_repeats(tmp_path: Path) -> None:
    work = tmp_path / "work"
    res = run_bench("gpu", "--models", "650M", "--gpus", "1", "--shadow-rates", "0", "--seqs", "650M=64",
                    "--outputs", "layers3", "--repeats", "3", "--cpu-check", "0", "--dry-run", "--workdir", str(work))
    assert res.returncode == 0, res.stderr
    names = [option(c, "--out").rsplit("out-650M-", 1)[1] for c in runner_commands(res.stdout)]
    assert names == ["g1-s0", "g1-s0-layers3", "g1-s0-r2-layers3", "g1-s0-r2", "g1-s0-r3", "g1-s0-r3-layers3"]


def test_output_variants_are_compared_per_repeat_and_the_median_taken() -> None:
    def pair(plain: float, variant: float, forward: tuple[float, float], busy: tuple[float, float]) -> tuple[dict, dict]:
        return (run(1, 0.0, plain, plain / 2) | {"forward_tokens_per_second": forward[0], "actor_busy_fraction": busy[0]},
                run(1, 0.0, variant, variant / 2) | {"variant": "layers3", "forward_tokens_per_second": forward[1],
                                                    "actor_busy_fraction": busy[1]})

    # The GPU was 10 % slower in repeat 2 than in the others: the median of the medians would mix repeats,
    # the per-repeat ratios do not.
    pairs = [pair(320_000.0, 313_600.0, (330_000.0, 326_700.0), (0.97, 0.96)),
             pair(288_000.0, 276_480.0, (297_000.0, 291_060.0), (0.97, 0.95)),
             pair(321_000.0, 317_790.0, (331_000.0, 327_690.0), (0.97, 0.97))]
    runs = {}
    for k, (plain, variant) in enumerate(pairs, start=1):
        name = "g1_s0" + (f"_r{k}" if k > 1 else "")
        runs[name], runs[f"{name}_layers3"] = plain, variant
    runs["g1_s0_r4_layers3"] = run(1, 0.0, 1.0, 1.0) | {"variant": "layers3"}  # its plain run failed: no pair
    runs["g1_s0_r4"] = run(1, 0.0, 1.0, 1.0, exit_code=124)
    got = compute_ratios({"runs": runs})
    assert got["layers3_vs_pooled_per_repeat"] == [0.98, 0.96, 0.99]
    assert got["layers3_vs_pooled"] == 0.98
    assert got["layers3_forward_vs_pooled"] == 0.99
    lines = output_pairs_lines({"runs": runs})
    assert len(lines) == 4 and lines[1].startswith("repeat 2: pooled 288,000 tok/s (forward 297,000, busy 0.97) | "
                                                   "layers3 276,480 tok/s (forward 291,060, busy 0.95): 0.96")
    assert lines[-1].startswith("layers3_vs_pooled = 0.9800 (median of 3 pair(s); forward 0.99")


def test_compute_ratios_without_successful_runs() -> None:
    got = compute_ratios({"reference": REF, "runs": {"g1_s0": run(1, 0.0, 1.0, 1.0, exit_code=124)}})
    assert set(got) == {"reference_tok_per_s"}


def test_summarize_keeps_the_worst_model_per_target() -> None:
    doc = {"models": {
        "650M": {"vs_reference_packed_fp16": 1.2, "vs_fair_esm_fp32": 11.0, "shadow_cost_0.01": 0.02},
        "3B": {"vs_reference_packed_fp16": 0.95, "vs_fair_esm_fp32": 12.0, "shadow_cost_0.01": 0.05},
    }}
    summarize(doc)
    assert doc["vs_reference_packed_fp16"] == 0.95 and doc["vs_fair_esm_fp32"] == 11.0
    assert doc["shadow_cost_0.01"] == 0.05  # a cost: the largest is the worst
    targets = doc["targets"]
    # no model has a 4-GPU figure, an ESM C reference or tok/s target, nor output-variant runs
    assert set(targets) == set(TARGETS) - {"scaling_efficiency_4gpu", "vs_transformers_esmc", "vs_target_tok_per_s",
                                           "per_token_fp16_vs_pooled", "layers3_vs_pooled"}
    assert targets["vs_reference_packed_fp16"]["pass"] is False
    assert targets["vs_fair_esm_fp32"]["pass"] is True
    assert targets["shadow_cost_0.01"] == {"target": "<= 0.03", "worst": 0.05, "pass": False,
                                           "per_model": {"650M": 0.02, "3B": 0.05}}


def test_merge_docs_keeps_the_runs_of_both() -> None:
    base = {"gpu": "NVIDIA H200", "date": "2026-01-01",
            "models": {"650M": {"reference": REF, "runs": {"g1_s0": run(1, 0.0, 200_000.0, 100_000.0),
                                                           "g4_s0": run(4, 0.0, 1.0, 1.0, exit_code=1)}}}}
    new = {"gpu": "other", "torch": "9.9",
           "models": {"650M": {"runs": {"g1_s0.01": run(1, 0.01, 190_000.0, 95_000.0),
                                        "g4_s0": run(4, 0.0, 760_000.0, 350_000.0)}},
                      "3B": {"reference": REF, "runs": {"g1_s0": run(1, 0.0, 90_000.0, 40_000.0)}}}}
    merged = merge_docs(base, new)
    m650 = merged["models"]["650M"]
    assert set(m650["runs"]) == {"g1_s0", "g1_s0.01", "g4_s0"}
    assert m650["runs"]["g4_s0"]["exit_code"] == 0  # the later document wins per run
    assert m650["reference"] == REF  # kept: the new document has none for 650M
    assert m650["shadow_cost_0.01"] == pytest.approx(1 - 190_000 / 200_000, abs=1e-4)  # recomputed
    assert m650["scaling_efficiency_4gpu"] == pytest.approx(760_000 / (4 * 200_000), abs=1e-4)
    assert set(merged["models"]["3B"]["runs"]) == {"g1_s0"}
    assert merged["gpu"] == "NVIDIA H200" and merged["torch"] == "9.9"  # top-level: base first, new fills in
    assert merged["vs_reference_packed_fp16"] == pytest.approx(90_000 / 180_000, abs=1e-4)  # worst model: 3B

    table = markdown_table(merged).splitlines()
    assert len(table) == 2 + 2 and table[2].startswith("| 650M | 16,000 | 64,000 | 180,000 | 200,000 (100,000) |")


def test_merge_command_writes_the_merged_file(tmp_path: Path) -> None:
    a = {"models": {"650M": {"reference": REF, "runs": {"g1_s0": run(1, 0.0, 200_000.0, 100_000.0)}}}}
    b = {"models": {"650M": {"runs": {"g1_s0.01": run(1, 0.01, 194_000.0, 97_000.0)}}}}
    for name, doc in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(doc))
    res = run_bench("merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "-o", str(tmp_path / "m.json"))
    assert res.returncode == 0, res.stderr
    merged = json.loads((tmp_path / "m.json").read_text())
    assert set(merged["models"]["650M"]["runs"]) == {"g1_s0", "g1_s0.01"}
    assert merged["shadow_cost_0.01"] == pytest.approx(0.03, abs=1e-4)
    assert "| 650M |" in res.stdout


# --- synthetic inputs and checkpoints ------------------------------------------------------------------


def test_synth_respects_its_clip_bounds_and_seed() -> None:
    lens, res = synth_arrays(20_000, seed=0)
    assert lens.dtype == np.int64 and len(lens) == 20_000 and len(res) == int(lens.sum())
    assert lens.min() >= 30 and lens.max() == 1022  # the long tail reaches the upper clip
    assert 280 <= float(np.median(lens)) <= 320  # lognormal around median 300
    assert set(np.unique(res).tobytes().decode()) == set(AA)
    again, res_again = synth_arrays(20_000, seed=0)
    assert np.array_equal(lens, again) and np.array_equal(res, res_again)
    assert not np.array_equal(lens, synth_arrays(20_000, seed=1)[0])
    narrow, _ = synth_arrays(2_000, seed=0, lo=250, hi=350)
    assert narrow.min() == 250 and narrow.max() == 350


def test_synth_records_and_fasta_agree(tmp_path: Path) -> None:
    records = synth(300, seed=3)
    lens, _ = synth_arrays(300, seed=3)
    assert [r[0] for r in records] == [f"s{i}" for i in range(300)]
    assert [len(r[1]) for r in records] == lens.tolist()
    info = write_synth_fasta(tmp_path / "s.fasta", 300, seed=3)
    assert read_fasta(tmp_path / "s.fasta") == records
    residues = sum(len(s) for _, s in records)
    assert info == {"records": 300, "residues": residues, "tokens": residues + 2 * 300,
                    "bytes": (tmp_path / "s.fasta").stat().st_size}
    assert max(len(line) for line in (tmp_path / "s.fasta").read_text().splitlines()) <= 60 + len(">s299 synthetic")


def test_short_fasta_streams_bounded_records(tmp_path: Path) -> None:
    info = write_short_fasta(tmp_path / "a.fasta", 2_500, seed=5, chunk=1_000)
    records = read_fasta(tmp_path / "a.fasta")
    lengths = [len(s) for _, s in records]
    assert [r[0] for r in records] == [f"p{i}" for i in range(2_500)]
    assert min(lengths) >= 30 and max(lengths) <= 1022 and 80 <= float(np.median(lengths)) <= 120
    assert info["records"] == 2_500 and info["residues"] == sum(lengths) and info["tokens"] == sum(lengths) + 5_000
    write_short_fasta(tmp_path / "b.fasta", 2_500, seed=5, chunk=1_000)
    assert (tmp_path / "a.fasta").read_bytes() == (tmp_path / "b.fasta").read_bytes()


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_random_esm2_checkpoint_loads_in_runner(tmp_path: Path, dtype: str) -> None:
    from runner.models.esm2 import load_esm2_file

    path = write_random_esm2(tmp_path / "esm2.pt", layers=2, dim=32, heads=4, seed=7, dtype=dtype)
    assert path == tmp_path / "esm2.pt" and not (tmp_path / "esm2.pt.tmp").exists()
    saved = torch.load(path, weights_only=False)["model"]
    want = torch.float16 if dtype == "fp16" else torch.float32
    embed = saved["encoder.sentence_encoder.embed_tokens.weight"]
    assert embed.dtype == want and embed.shape[1] == 32
    assert torch.equal(saved["encoder.lm_head.weight"], embed)  # tied to the embedding

    model = load_esm2_file(path)
    assert (model.info.embed_dim, model.info.num_layers, model.num_heads) == (32, 2, 4)
    loaded = model.esm.embed_tokens.weight
    assert loaded.dtype == torch.float32 and torch.equal(loaded, embed.float())  # upcast on load, same values
    assert not loaded[model.esm.padding_idx].any()

    tokens, positions, cu, max_len = pack(model.codec, [s for _, s in synth(3, seed=0)])
    hidden = model.forward_packed(tokens, positions, cu, max_len, -1)
    assert hidden.shape == (int(cu[-1]), 32) and torch.isfinite(hidden).all()

    other = torch.load(write_random_esm2(tmp_path / "again.pt", 2, 32, 4, seed=7, dtype=dtype),
                       weights_only=False)["model"]
    assert all(torch.equal(saved[k], other[k]) for k in saved)  # deterministic per seed (CPU generator)


# --- subprocesses and the CPU stages -------------------------------------------------------------------


def test_run_logged_captures_output_and_samples_rss(tmp_path: Path) -> None:
    script = "import time; x = b'x' * (64 << 20); print('hello'); time.sleep(1.2)"  # 64 MiB resident
    rc, secs, mem = run_logged([sys.executable, "-c", script], tmp_path / "a.log", timeout=60, monitor=True)
    assert rc == 0 and secs >= 1.2 and tail(tmp_path / "a.log") == "hello"
    assert mem["driver_rss_peak_mib"] >= 64 and mem["process_tree_rss_peak_mib"] >= 64


def test_run_logged_times_out_with_124(tmp_path: Path) -> None:
    rc, secs, mem = run_logged([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "b.log",
                               timeout=0.5)
    assert rc == 124 and secs < 30 and mem == {}


def test_child_env_puts_the_repository_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = child_env()
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"]
    assert tail(Path("/nonexistent/file.log")) == ""


def test_cpu_one_measures_every_record_of_the_fasta(tmp_path: Path) -> None:
    info = write_short_fasta(tmp_path / "in.fasta", 3_000, seed=1)
    assert BENCH == SCRIPTS / "bench.py"  # the CPU-stage runs re-enter the command line
    res = run_bench("_cpu-one", str(tmp_path / "in.fasta"), str(tmp_path / "out"), "--block", "1024",
                    "--sample-every", "1000")
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["records"] == 3_000 and got["tokens"] == info["tokens"]
    assert got["settings"]["records_per_block"] == 1024 and len(got["rss_samples"]) >= 3
    per = got["cpu_s_per_mtok"]
    assert per["total"] == pytest.approx(per["read"] + per["tokenize_pack"] + per["write"], abs=1e-3)
    assert all(math.isfinite(v) and v >= 0 for v in per.values())
    parts = sorted((tmp_path / "out" / "embeddings").glob("part-*.arrow"))
    rows = sum(pa.ipc.open_file(pa.memory_map(str(p))).read_all().num_rows for p in parts)
    assert rows == 3_000


def test_bench_attention_reads_launch_configurations() -> None:
    assert parse_config("128x64/w8/s3") == {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    with pytest.raises(ValueError):
        parse_config("128x64")  # warps and stages are part of a configuration


@pytest.mark.slow
def test_bench_pooling_runs_both_settings_on_a_tiny_model(tmp_path: Path) -> None:
    """scripts/bench_pooling.py's CPU smoke test: every figure for both settings, and the three-layer setting stores
    the one-layer setting's vector in its last-layer mean column."""
    out = tmp_path / "pooling.json"
    res = run_bench("--cpu", "--arch", "tiny", "--tokens", "1024", "--reps", "2", "--warmup", "1", "--workdir",
                    str(tmp_path / "work"), "--out", str(out), script="bench_pooling.py", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    figures = {"forward", "pool", "pool_legacy", "embed", "call"}
    assert set(doc["median_ms"]["one"]) == set(doc["median_ms"]["three"]) == figures
    assert all(v > 0 for v in doc["three_vs_one"].values())
    assert doc["three"] == {"layers": [0, 1, 2], "poolings": ["mean", "cls", "max"]}
    assert 0 < doc["batch_tokens"] <= 1024 and doc["batch_windows"] >= 1
    assert doc["three_last_mean_max_abs_diff_vs_one"] == 0.0


def test_startup_cpu_profile_counts_each_process_of_the_command(tmp_path: Path) -> None:
    """scripts/startup_cpu_profile.py: CPU seconds per process of the command's session, children included."""
    profile = load_script("startup_cpu_profile")
    assert profile.role("ray::MapWorker(MapBatches(EmbedStage)) x") == "ray::MapWorker(MapBatches(EmbedStage))"
    assert profile.role("/venv/bin/python -m runner embed in.fasta") == "runner (driver)"
    assert profile.role("/venv/lib/ray/core/src/ray/raylet/raylet --raylet_socket_name=x") == "raylet"
    busy = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\n"
    parent = f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {busy!r}])\nexec({busy!r})\n"
    out = tmp_path / "p.json"
    assert profile.main(["--out", str(out), "--", sys.executable, "-c", parent]) == 0
    result = json.loads(out.read_text())
    spinning = [p for p in result["processes"] if p["cpu_s"] >= 0.5]
    assert len(spinning) == 2, result["processes"]  # the command and its child, each ~0.6 CPU-s
    assert result["cpu_s_total"] >= 1.1 and result["wall_s"] >= 1.1
