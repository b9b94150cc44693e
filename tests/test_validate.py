"""`runner validate` on CPU: bf16 against FP32 on the tiny ESM-2 checkpoint, in-process (no Ray)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke

from runner.errors import RunnerError
from runner.models.registry import load_codec
from runner.validate import ValidateSettings, reservoir_sample, strata

DATA = Path(__file__).resolve().parent / "data"
STATS = ("n", "length_min", "length_max", "cosine_min", "cosine_mean", "cosine_max", "mean_abs_diff",
         "rel_std_diff", "rel_norm_diff", "outlier_count", "outliers")


@pytest.fixture(scope="module")
def passing(tiny_esm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, dict]:
    """bf16 vs fp32 with a threshold bf16 meets, plus the fp32-LayerNorm variant."""
    out = tmp_path_factory.mktemp("validate") / "report.json"
    code, output = invoke("validate", str(DATA / "some_proteins.fasta"), "--model", str(tiny_esm2_path),
                          "--gpus", "0", "--precision", "bf16", "--sample", "12", "--max-residues", "300",
                          "--min-cosine", "0.999", "--fp32-layernorm", "--out", str(out))
    return code, output, json.loads(out.read_text())


def test_report_has_three_strata_with_the_stats(passing: tuple[int, str, dict]) -> None:
    code, output, report = passing
    assert code == 0, output
    assert report["precision"] == "bf16" and report["device"] == "cpu" and report["passed"] is True
    assert report["sample"]["used"] == 12 and report["sample"]["records_read"] == 15
    assert report["sample"]["truncated"] >= 1  # some proteins are longer than 300
    plain = report["variants"][0]
    assert plain["name"] == "bf16" and plain["fp32_layernorm"] is False
    assert report["gelu"] == "erf (fair-esm's)"  # the fused tanh GELU exists for GPUs only
    assert list(plain["strata"]) == ["short", "medium", "long"]
    for stats in [*plain["strata"].values(), plain["overall"]]:
        assert set(STATS) <= set(stats)
        # bf16 drifts for real but stays close: nothing below 0.999, nothing exactly equal.
        assert 0.999 <= stats["cosine_min"] <= stats["cosine_mean"] <= stats["cosine_max"] < 1
        assert stats["mean_abs_diff"] > 0 and stats["rel_std_diff"] > 0 and stats["rel_norm_diff"] > 0
        assert stats["outlier_count"] == 0 and stats["outliers"] == []
    s = plain["strata"]
    assert [s[k]["n"] for k in ("short", "medium", "long")] == [4, 4, 4]
    assert s["short"]["length_max"] <= s["medium"]["length_min"] <= s["medium"]["length_max"] <= s["long"]["length_min"]
    assert s["long"]["length_max"] == 300
    assert plain["overall"]["cosine_min"] == min(v["cosine_min"] for v in s.values())
    assert plain["tokens_per_second"] > 0 and report["reference"]["tokens_per_second"] > 0


def test_fp32_layernorm_section(passing: tuple[int, str, dict]) -> None:
    _, output, report = passing
    fixed = report["variants"][1]
    assert fixed["name"] == "bf16+fp32_layernorm" and fixed["fp32_layernorm"] is True
    assert list(fixed["strata"]) == ["short", "medium", "long"]
    ln = report["fp32_layernorm"]
    assert ln["plain_passed"] is True and ln["fixed_passed"] is True and ln["recovers"] is False
    assert ln["slowdown"] > 0
    assert ln["cosine_min_fixed"] == fixed["overall"]["cosine_min"]
    assert "fp32 LayerNorm: not needed" in output


def test_terminal_table(passing: tuple[int, str, dict]) -> None:
    _, output, report = passing
    rows = [line for line in output.splitlines() if re.match(r"bf16(\+fp32_layernorm)?\s+(short|medium|long|all)\s", line)]
    assert len(rows) == 8  # 2 variants x (3 strata + all)
    short = next(r for r in rows if r.split()[:2] == ["bf16", "short"])
    assert f"{report['variants'][0]['strata']['short']['cosine_min']:.7f}" in short
    assert "speed: fp32" in output
    assert "PASS" in output.splitlines()


def test_fails_with_exit_4_naming_ids(tiny_esm2_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "strict.json"
    code, output = invoke("validate", str(DATA / "some_proteins.fasta"), "--model", str(tiny_esm2_path),
                          "--gpus", "0", "--precision", "bf16", "--sample", "6", "--max-residues", "100",
                          "--min-cosine", "0.9999999", "--out", str(out))
    assert code == 4, output
    assert "Traceback" not in output
    error = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "6 of 6 sampled sequence(s) below --min-cosine 0.9999999" in error[0]
    assert "--fp32-layernorm" in error[0] and str(out) in error[0]
    report = json.loads(out.read_text())  # written before the exit
    assert report["passed"] is False
    outliers = [o for s in report["variants"][0]["strata"].values() for o in s["outliers"]]
    assert len(outliers) == 6 and all(o["cosine"] < 0.9999999 for o in outliers)
    worst = min(outliers, key=lambda o: o["cosine"])
    assert f"{worst['id']} (cosine {worst['cosine']:.7f})" in error[0]
    assert "FAIL" in output


def test_reservoir_sample_is_seeded_bounded_and_skips_rejects(tmp_path: Path) -> None:
    fasta = tmp_path / "many.fasta"
    fasta.write_text("".join(f">s{i}\n{'ACDEFGHIKLMNPQRSTVWY'[: 1 + i % 20] * (1 + i % 7)}\n" for i in range(300))
                     + ">bad\nMK1\n>empty\n\n")
    codec = load_codec("esm2_t6_8M_UR50D")
    settings = ValidateSettings(inputs=[str(fasta)], model="esm2_t6_8M_UR50D", sample=40, seed=3)
    first = reservoir_sample(settings, codec)
    again = reservoir_sample(settings, codec)
    other = reservoir_sample(ValidateSettings(inputs=[str(fasta)], model="x", sample=40, seed=4), codec)
    ids = [w.id for w in first.windows]
    assert len(ids) == len(set(ids)) == 40
    assert ids == [w.id for w in again.windows] and ids != [w.id for w in other.windows]
    assert first.records_read == 302 and first.rejected == 2
    assert {"bad", "empty"}.isdisjoint(ids)
    # Not just the first records: a uniform sample of 300 reaches past the first 40.
    assert max(int(i[1:]) for i in ids) > 150
    groups = strata(first.lengths)
    assert sorted(np.concatenate(list(groups.values())).tolist()) == list(range(40))
    assert first.lengths[groups["short"]].max() <= first.lengths[groups["long"]].min()


@pytest.mark.parametrize(
    "changes, message",
    [({"sample": 2}, "--sample"), ({"precision": "fp32"}, "fp16 or bf16"), ({"gpus": 2}, "--gpus must be 0")],
)
def test_bad_settings_are_one_line_errors(changes: dict, message: str) -> None:
    settings = ValidateSettings(inputs=["x.fasta"], model="esm2_t6_8M_UR50D", **changes)
    with pytest.raises(RunnerError, match=re.escape(message)):
        settings.check()
