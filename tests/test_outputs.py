"""Several layers and poolings from one forward (issue 15): the model interface, pooling, merging, settings.

The end-to-end checks through `runner embed` (every stored column and per-token array against fair-esm's own
forward) are in tests/test_outputs_cli.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import pack

from runner.config import EmbedConfig
from runner.errors import RunnerError
from runner.models.base import resolve_layers
from runner.models.esm2 import ESM2Embedder, load_esm2
from runner.output.sink import ChunkMerger, vector_columns
from runner.stages.pooling import pool_layers
from runner.stages.shadow import compare_columns


@pytest.fixture(scope="module")
def embedder(tiny_esm2_path: Path) -> ESM2Embedder:
    return load_esm2(str(tiny_esm2_path))


def test_forward_layers_equal_fair_esm_representations(
    embedder: ESM2Embedder, fair_esm_model: torch.nn.Module, some_proteins: list[tuple[str, str]]
) -> None:
    seqs = [s for _, s in some_proteins[:5]]
    tokens, positions, cu, max_len = pack(embedder.codec, seqs)
    # Out of order, negatives from the end: -1 is layer 2 (the last, after the final LayerNorm), -3 is layer 0.
    got = embedder.forward_layers(tokens, positions, cu, max_len, [1, -1, -3])
    _, _, padded = fair_esm_model.alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(seqs)])
    with torch.no_grad():
        reps = fair_esm_model(padded, repr_layers=[0, 1, 2])["representations"]
    for hidden, layer in zip(got, [1, 2, 0], strict=True):
        ref = torch.cat([reps[layer][i, : len(s) + 2] for i, s in enumerate(seqs)])  # [T, D] packed
        diff = (hidden - ref).abs().max().item()
        assert diff < 1e-4, f"layer {layer}: max abs diff {diff:.2e}"
    # One layer through forward_packed is the same computation.
    assert torch.equal(embedder.forward_packed(tokens, positions, cu, max_len, 1), got[0])


def test_forward_layers_runs_no_deeper_than_asked(embedder: ESM2Embedder, monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.models import layer_loop

    ran: list[int] = []
    real = layer_loop.run_layers

    def counting(x, layers, *args, **kwargs):
        ran.append(len(layers))
        return real(x, layers, *args, **kwargs)

    monkeypatch.setattr(layer_loop, "run_layers", counting)
    tokens, positions, cu, max_len = pack(embedder.codec, ["MKTAYIAKQR"])
    embedder.forward_layers(tokens, positions, cu, max_len, [0])
    embedder.forward_layers(tokens, positions, cu, max_len, [1, 0])
    assert ran == [1]  # layer 0 alone runs no transformer layer; [1, 0] runs one


def test_resolve_layers() -> None:
    assert resolve_layers([0, 17, 33], 33, "m") == [0, 17, 33]
    assert resolve_layers([-1, -2, -34], 33, "m") == [33, 32, 0]
    with pytest.raises(RunnerError, match="out of range for m: use 0 .* to 33"):
        resolve_layers([34], 33, "m")
    with pytest.raises(RunnerError, match="out of range"):
        resolve_layers([-35], 33, "m")
    with pytest.raises(RunnerError, match="layer 33 is asked for twice"):
        resolve_layers([33, -1], 33, "m")


def test_pool_layers_every_pooling_against_numpy() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 3, 9]  # tokens per window, BOS and EOS included
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    hiddens = [torch.randn(int(cu[-1]), 6, generator=gen).half() for _ in range(2)]
    pooled = pool_layers(hiddens, cu, ["mean", "mean_all", "cls", "max"], 1, 1)
    assert pooled.shape == (3, 8, 6) and pooled.dtype == torch.float32
    for b, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        for li, hidden in enumerate(hiddens):
            h = hidden.float().numpy()
            residues = h[start + 1 : end - 1]
            expected = [residues.mean(0), h[start:end].mean(0), h[start], residues.max(0)]
            for pi, want in enumerate(expected):
                np.testing.assert_allclose(pooled[b, li * 4 + pi].numpy(), want, rtol=1e-6, atol=1e-6)


def test_max_pooling_propagates_non_finite_and_ignores_specials() -> None:
    hidden = torch.zeros(8, 2)
    hidden[0] = 1e4  # BOS of window 0: never the max of its residues
    hidden[5, 1] = float("nan")  # a residue of window 1
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    pooled = pool_layers([hidden], cu, ["max"], 1, 1)[:, 0]
    assert pooled[0].tolist() == [0.0, 0.0]
    assert torch.isnan(pooled[1, 1])


def test_vector_columns() -> None:
    assert vector_columns([33], ["mean"]) == ["embedding"]
    assert vector_columns([0, 33], ["mean", "cls"]) == ["layer0_mean", "layer0_cls", "layer33_mean", "layer33_cls"]
    assert vector_columns([5], ["mean", "max"]) == ["layer5_mean", "layer5_max"]


def test_chunk_merger_merges_max_columns_by_max_and_the_others_by_weighted_mean() -> None:
    merger = ChunkMerger(["mean", "max"], layers=1)
    first = np.array([1.0, 0.0, 1.0, -5.0])  # [mean | max] of window 0, D = 2
    second = np.array([0.0, 1.0, 0.5, 7.0])
    assert merger.add("p", 3, 0, 2, 10, 15, first) is None
    merged = merger.add("p", 3, 1, 2, 30, 15, second)
    np.testing.assert_allclose(merged, [0.25, 0.75, 1.0, 7.0])


def test_shadow_compares_every_column_and_reports_the_worst() -> None:
    main = np.array([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])  # two rows of two 2-d columns
    ref = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # row 0: its second column is orthogonal
    cosine, max_abs, _, worst = compare_columns(main, ref, 2)
    np.testing.assert_allclose(cosine, [0.0, 1.0], atol=1e-12)
    assert worst.tolist()[0] == 1 and max_abs[0] == 1.0


def test_config_parses_layers_and_poolings() -> None:
    config = EmbedConfig(inputs=["a"], model="m", out="o").with_overrides({"layers": "0,17,-1", "pooling": "mean,cls"})
    assert config.layer_list() == [0, 17, -1] and config.pooling_list("mean_all") == ["mean", "cls"]
    assert EmbedConfig(pooling="max").pooling_list("mean") == ["max"]
    assert EmbedConfig().pooling_list("mean_all") == ["mean_all"] and EmbedConfig(layer=5).layer_list() == [5]
    with pytest.raises(RunnerError, match="--layers takes whole numbers"):
        EmbedConfig(layers="0,x")
    with pytest.raises(RunnerError, match="--layer and --layers both given"):
        EmbedConfig(inputs=["a"], model="m", out="o", layer=3, layers=[1]).validate()
    with pytest.raises(RunnerError, match="lists a pooling twice"):
        EmbedConfig(inputs=["a"], model="m", out="o", pooling=["mean", "mean"]).validate()
    with pytest.raises(RunnerError, match="--pooling takes"):
        EmbedConfig(inputs=["a"], model="m", out="o", pooling=["median"]).validate()


def test_cli_rejects_a_bad_layer_before_ray_starts(tiny_esm2_path: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from runner.cli import cli

    fasta = tmp_path / "a.fasta"
    fasta.write_text(">a\nMKTAYIAK\n")
    result = CliRunner().invoke(cli, ["embed", str(fasta), "--model", str(tiny_esm2_path), "--out",
                                      str(tmp_path / "o"), "--gpus", "0", "--layers", "0,5"])
    assert result.exit_code != 0
    assert "layer 5 (--layer/--layers) is out of range" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["embed", str(fasta), "--model", str(tiny_esm2_path), "--out",
                                      str(tmp_path / "o"), "--gpus", "0", "--pooling", "mean,median"])
    assert result.exit_code == 2 and "choose from mean, mean_all, cls, max" in result.output
    import ray

    assert not ray.is_initialized()
