"""scripts/bench.py for ESM C: the dry-run plan (original-layout checkpoint, transformers reference modes), the
random .pth runner loads, and the ratios against transformers' EsmcModel and the tok/s target. CPU only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
for _path in (str(REPO), str(SCRIPTS)):  # as `python scripts/bench.py` sees them (scripts/ is not a package)
    if _path not in sys.path:
        sys.path.insert(0, _path)

import bench  # noqa: E402
from bench_data import synth, write_random_esmc  # noqa: E402
from bench_report import compute_ratios, markdown_table, summarize  # noqa: E402
from conftest import pack, run_bench  # noqa: E402


def test_dry_run_plans_esmc_with_its_checkpoint_and_reference_modes(tmp_path: Path) -> None:
    ref = tmp_path / "reference_bench.py"  # only its path is printed
    work = tmp_path / "work"
    res = run_bench("gpu", "--models", "esmc300,650M", "--gpus", "1", "--shadow-rates", "0", "--seqs", "esmc300=64",
                    "--reference", str(ref), "--cpu-check", "0", "--dry-run", "--workdir", str(work))
    assert res.returncode == 0, res.stderr
    runs = [line.split() for line in res.stdout.splitlines() if " -m runner embed " in line]
    models = [words[words.index("--model") + 1] for words in runs]
    assert models == [str(work / "esmc-esmc300.pth"), str(work / "esm2-650M.pt")]
    refs = [line.split()[2:] for line in res.stdout.splitlines() if str(ref) in line]
    assert refs == [["esmc300", str(bench.DEFAULT_REF_SEQS["esmc300"]), "hfc16,hfc16_16384"],
                    ["650M", str(bench.DEFAULT_REF_SEQS["650M"]), bench.REF_MODES]]


def test_random_esmc_checkpoint_loads_in_runner(tmp_path: Path) -> None:
    from runner.models.esmc_checkpoints import load_esmc
    from runner.models.registry import model_family

    path = write_random_esmc(tmp_path / "esmc.pth", layers=2, dim=128, heads=2, seed=3)
    assert model_family(str(path)) == "esmc"
    saved = torch.load(path, weights_only=True)
    assert saved["transformer.blocks.1.ffn.1.weight"].shape == (2 * 512, 128)  # gate|up, 8/3 * 128 -> 512
    assert saved["embed.weight"].dtype == torch.float16
    model = load_esmc(str(path))
    assert (model.num_layers, model.info.embed_dim, model.num_heads) == (2, 128, 2)
    tokens, positions, cu, max_len = pack(model.codec, [s for _, s in synth(3, seed=0)])
    hidden = model.forward_packed(tokens, positions, cu, max_len, -1)
    assert hidden.shape == (int(cu[-1]), 128) and torch.isfinite(hidden).all()
    with pytest.raises(ValueError, match="64 wide"):
        write_random_esmc(tmp_path / "bad.pth", layers=1, dim=100, heads=2)


def test_ratios_against_transformers_best_batch_and_the_target() -> None:
    steady = 420_000.0
    model = {
        "target_tok_per_s": 500_000,
        "reference": {"modes": {"hfc16": {"tok_per_s": 46_000}, "hfc16_16384": {"tok_per_s": 109_000}}},
        "runs": {"g1_s0": {"gpus": 1, "shadow_rate": 0.0, "exit_code": 0, "tokens": 10**7,
                           "tokens_per_second_steady": steady, "tokens_per_second_wall": 300_000.0}},
    }
    model.update(compute_ratios(model))
    assert model["reference_tok_per_s"] == {"hfc16": 46_000, "hfc16_16384": 109_000, "best": 109_000}
    assert model["vs_transformers_esmc"] == pytest.approx(steady / 109_000, abs=1e-4)
    assert model["vs_target_tok_per_s"] == pytest.approx(steady / 500_000, abs=1e-4)
    doc = {"models": {"esmc300": model}}
    summarize(doc)
    assert doc["targets"]["vs_transformers_esmc"]["pass"] is True  # 3.85x >= 3x
    assert doc["targets"]["vs_target_tok_per_s"]["pass"] is False  # 420k < 500k
    assert "| 109,000 | 3.85x | 0.84x |" in markdown_table(doc)
