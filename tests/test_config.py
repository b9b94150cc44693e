"""Settings: YAML files, flags winning over them, and validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.cli import build_config
from runner.config import EmbedConfig, load_config_file, resolve_precision
from runner.errors import RunnerError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load_and_validate(name: str) -> None:
    config = EmbedConfig(inputs=["x.fa"], out="o").with_overrides(load_config_file(CONFIGS / name))
    assert config.validate().model


def test_flags_win_over_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: m.pt\nlayer: 3\ntoken-budget: 2048\nshadow_rate: 0.5\n")
    config = build_config(str(path), inputs=("a.fa",), out="o", layer=5, token_budget="auto", model=None)
    assert (config.model, config.layer, config.token_budget, config.shadow_rate) == ("m.pt", 5, None, 0.5)
    assert config.inputs == ["a.fa"]


@pytest.mark.parametrize(
    "text",
    ["layers: [0, 1, -1]\npooling: [mean, cls]\n", "layers: 0,1,-1\npooling: mean,cls\n", "layers: '0, 1, -1'\npooling: 'mean, cls'\n"],
)
def test_layer_and_pooling_lists_in_a_config_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    config = EmbedConfig(inputs=["a.fa"], model="m.pt", out="o").with_overrides(load_config_file(path)).validate()
    assert (config.layers, config.pooling) == ([0, 1, -1], ["mean", "cls"])


@pytest.mark.parametrize(
    "text, message",
    [("layers: {a: 1}\n", "layers: {'a': 1} is not a list"), ("layers: [1, x]\n", "--layers takes whole numbers"),
     ("pooling: [mean, median]\n", "--pooling takes"), ("inputs: [a.fa, 3]\n", "not a path or a list of paths")],
)
def test_bad_lists_in_a_config_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(RunnerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EmbedConfig(inputs=["a.fa"], model="m.pt", out="o").with_overrides(load_config_file(path)).validate()


@pytest.mark.parametrize(
    "text, message",
    [("layer: [1, 2\n", "not valid YAML"), ("- a\n- b\n", "mapping"), ("modle: x\n", "unknown setting(s) modle")],
)
def test_bad_config_files(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(RunnerError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EmbedConfig().with_overrides(load_config_file(path))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"precision": "fp8"}, "--precision"),
        ({"long": "wrap"}, "--long"),
        ({"shadow_rate": 1.5}, "--shadow-rate"),
        ({"gpus": -1}, "--gpus"),
        ({"token_budget": 4}, "--token-budget"),
        ({"on_drift": "panic"}, "--on-drift"),
    ],
)
def test_validation_names_the_flag(overrides: dict, message: str) -> None:
    with pytest.raises(RunnerError, match=message):
        EmbedConfig(inputs=["a"], model="m", out="o", **overrides).validate()


def test_disable_fp16_rollback_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_precision(None, on_gpu=True) == "fp16"
    assert resolve_precision(None, on_gpu=False) == "fp32"
    monkeypatch.setenv("RUNNER_DISABLE_FP16", "1")
    with pytest.warns(UserWarning, match="RUNNER_DISABLE_FP16"):
        assert resolve_precision("bf16", on_gpu=True) == "fp32"


def test_every_command_has_help_with_an_example() -> None:
    """sqlite-utils style: `runner --help` and each command's --help show a runnable example of that command, so a
    command added without one fails here."""
    from click.testing import CliRunner

    from runner.cli import cli

    assert set(cli.commands) >= {"embed", "export", "validate", "verify"}
    for name in [None, *cli.commands]:
        args = ["--help"] if name is None else [name, "--help"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        example = result.output.split("Example", 1)[-1]
        assert "Example" in result.output and f"runner {name or 'embed'} " in example, (name, result.output)
