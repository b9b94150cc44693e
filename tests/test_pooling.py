"""Pooling several layers x poolings in one pass (runner.stages.pooling, the embedding stage's output buffer).

CPU only, no Ray: the embedding stage is called directly, as Ray Data would call it.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import load_script

from runner.errors import RunnerError
from runner.input.stream import PackSettings, ReadSettings, pack_records, read_blocks
from runner.models.registry import load_codec, load_model
from runner.stages.embed_stage import EmbedStage, StageSettings
from runner.stages.pooling import POOLINGS, pool_layers, window_segments

DATA = Path(__file__).parent / "data"
LAYERS = (0, 1, -1)  # the embeddings, the first layer and the last (after the final LayerNorm): all three tiny models


def packed_rows(spec: str, fasta: Path, budget: int) -> list[pa.Table]:
    """The packed-batch rows (one table each, as Ray Data hands them to the stage) of a FASTA's first block."""
    records = next(read_blocks(ReadSettings((str(fasta),), "id", "sequence", 64)))
    packed = pack_records(records, PackSettings(load_codec(spec), None, "truncate", 0, budget))
    return [packed.slice(i, 1) for i in range(packed.num_rows) if packed.column("ids")[i].as_py()]


def embeddings(stage: EmbedStage, rows: list[pa.Table]) -> tuple[list[str], np.ndarray]:
    """(ids, float32 [N, C*D]) of the embedded rows the stage returns for `rows`."""
    out = pa.concat_tables(stage(row) for row in rows)
    out = out.filter(pa.compute.is_valid(out.column("embedding")))
    width = out.schema.field("embedding").type.list_size
    return out.column("id").to_pylist(), out.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, width)


@pytest.fixture(scope="module")
def dna_fasta(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("dna") / "dna.fasta"
    path.write_text("".join(f">d{i}\n{''.join(rng.choice('ACGT') for _ in range(rng.randint(20, 120)))}\n"
                            for i in range(12)))
    return path


@pytest.fixture(scope="module")
def models(tiny_esm2_path: Path, tiny_dnabert_dir: Path, tmp_path_factory: pytest.TempPathFactory,
           dna_fasta: Path) -> dict[str, tuple[str, Path, int]]:
    """Each model family's tiny checkpoint (a spec runner loads), a FASTA it embeds and a token budget that packs
    that FASTA into several batches."""
    esmc_dir, _ = load_script("tiny_esmc").make_esmc(tmp_path_factory.mktemp("esmc_pool"))
    proteins = DATA / "some_proteins.fasta"
    return {"esm2": (str(tiny_esm2_path), proteins, 1024), "esmc": (str(esmc_dir), proteins, 1024),
            "dnabert": (str(tiny_dnabert_dir), dna_fasta, 64)}  # BPE: a few bases per token


@pytest.mark.parametrize("family", ["esm2", "esmc", "dnabert"])
def test_several_layers_and_poolings_equal_the_one_pair_runs_exactly(models, family: str) -> None:
    """Every column of a 3-layer x 4-pooling job is bit for bit the vector a job of that one layer and one pooling
    stores: the pairs share one forward and one pass over each layer, and none changes another's arithmetic."""
    spec, fasta, budget = models[family]
    rows = packed_rows(spec, fasta, budget)
    assert len(rows) >= 2  # several packed batches, each of several windows
    together = EmbedStage(StageSettings(spec, "fp32", LAYERS, POOLINGS, "cpu"))
    ids, vectors = embeddings(together, rows)
    dim = together.embed_dim
    assert vectors.shape == (len(ids), len(LAYERS) * len(POOLINGS) * dim) and len(ids) >= 8
    assert np.isfinite(vectors).all()
    for li, layer in enumerate(LAYERS):
        for pi, pooling in enumerate(POOLINGS):
            alone = EmbedStage(StageSettings(spec, "fp32", layer, pooling, "cpu"))
            single_ids, single = embeddings(alone, rows)
            assert single_ids == ids
            column = li * len(POOLINGS) + pi  # layer-major, as the sink names them
            got = vectors[:, column * dim : (column + 1) * dim]
            assert np.array_equal(got, single), f"layer {layer} {pooling}: max diff {np.abs(got - single).max()}"
    # The columns differ from each other (no column is another's copy, e.g. a wrong offset into the buffer).
    blocks = vectors.reshape(len(ids), -1, dim)
    assert all(not np.array_equal(blocks[:, a], blocks[:, b]) for a in range(blocks.shape[1]) for b in range(a))


def test_pool_layers_writes_into_a_view_of_a_larger_buffer() -> None:
    gen = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 6, 9, 19], dtype=torch.int32)
    hiddens = [torch.randn(19, 5, generator=gen).half() for _ in range(2)]
    buffer = torch.full((3 * 2 * 2 * 5 + 3,), 7.0)  # vectors, then three more floats (the stage's finite flags)
    view = buffer[:60].view(3, 4, 5)
    returned = pool_layers(hiddens, cu, ["max", "mean"], 1, 1, out=view)
    assert returned.data_ptr() == buffer.data_ptr()
    assert torch.equal(view, pool_layers(hiddens, cu, ["max", "mean"], 1, 1))
    assert buffer[60:].tolist() == [7.0, 7.0, 7.0]  # nothing written past the vectors
    with pytest.raises(ValueError, match="expected float32"):
        pool_layers(hiddens, cu, ["max"], 1, 1, out=view)


def test_windows_cut_into_parts_and_pieces() -> None:
    cu = torch.tensor([0, 5, 6, 8, 20], dtype=torch.int32)  # windows of 5, 1, 2 and 12 tokens
    pieces, parts, residues, tokens = window_segments(cu, 1, 1, 20, piece=4)
    # [BOS | 3 residues | EOS], [BOS | none | none], [BOS | none | EOS], [BOS | 4 + 4 + 2 residues | EOS], padding
    assert pieces.tolist() == [1, 3, 1, 1, 0, 0, 1, 0, 1, 1, 4, 4, 2, 1, 0, 0, 0]
    assert parts.tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3, 1, 3]
    assert residues.tolist() == [3, 0, 0, 10] and tokens.tolist() == [5, 1, 2, 12]
    assert int(pieces.sum()) == 20 and int(parts.sum()) == len(pieces)  # each level covers the one below exactly
    assert window_segments(cu, 0, 2, 20, piece=4)[0].tolist()[:4] == [0, 3, 2, 0]  # no BOS: an empty first part


@pytest.mark.parametrize("piece", [1, 3, 64])
def test_long_windows_pool_like_float64_whatever_the_piece_size(piece: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import runner.stages.pooling as pooling

    # pool_layers cuts windows into pieces of `piece` tokens (PIECE in production): 1 and 3 cut every window.
    monkeypatch.setattr(pooling, "window_segments",
                        lambda *args, real=pooling.window_segments: real(*args, piece=piece))
    gen = torch.Generator().manual_seed(2)
    lengths = [130, 2, 70, 300, 65]
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    hidden = (torch.randn(int(cu[-1]), 4, generator=gen) * 3).half()
    pooled = pool_layers([hidden], cu, POOLINGS, 1, 1)  # [B, 4, D]
    h = hidden.double().numpy()
    for b, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        residues = h[start + 1 : end - 1]
        mean = residues.mean(0) if len(residues) else np.zeros(4)
        top = residues.max(0) if len(residues) else np.full(4, -np.inf)
        np.testing.assert_allclose(pooled[b, 0].numpy(), mean, rtol=0, atol=1e-5)
        np.testing.assert_allclose(pooled[b, 1].numpy(), h[start:end].mean(0), rtol=0, atol=1e-5)
        assert np.array_equal(pooled[b, 2].numpy(), h[start]) and np.array_equal(pooled[b, 3].numpy(), top)


def test_a_window_of_specials_only_has_a_zero_mean_and_a_minus_inf_max() -> None:
    hidden = torch.arange(12.0).reshape(6, 2)  # windows [BOS, EOS] and [BOS, r, r, EOS]
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    pooled = pool_layers([hidden], cu, ["mean", "mean_all", "cls", "max"], 1, 1)
    assert pooled[0].tolist() == [[0.0, 0.0], [1.0, 2.0], [0.0, 1.0], [float("-inf")] * 2]
    assert pooled[1].tolist() == [[7.0, 8.0], [7.0, 8.0], [4.0, 5.0], [8.0, 9.0]]


def test_a_non_finite_special_stays_out_of_mean_and_max() -> None:
    hidden = torch.ones(5, 3)
    hidden[0] = float("inf")  # BOS
    hidden[4, 1] = float("nan")  # EOS
    pooled = pool_layers([hidden], torch.tensor([0, 5], dtype=torch.int32), ["mean", "max", "mean_all"], 1, 1)[0]
    assert pooled[0].tolist() == [1.0, 1.0, 1.0] and pooled[1].tolist() == [1.0, 1.0, 1.0]
    assert not torch.isfinite(pooled[2]).any()  # mean_all takes the specials in, by definition


@pytest.mark.parametrize("family", ["esm2", "esmc", "dnabert"])
def test_every_family_resolves_layers_alike(models, family: str) -> None:
    """forward_layers of each model: negatives count from the end, a layer asked for twice is one clear error."""
    model = load_model(models[family][0])
    tokens = torch.from_numpy(model.codec.encode(model.codec.clean("ACGTACGTAC"))).long()  # a protein and DNA alike
    cu = torch.tensor([0, len(tokens)], dtype=torch.int32)
    args = (tokens, torch.arange(len(tokens)), cu, len(tokens))
    last, first = model.forward_layers(*args, [-1, 0])
    assert torch.equal(last, model.forward_layers(*args, [model.num_layers])[0])
    assert torch.equal(first, model.forward_layers(*args, [0])[0])
    with pytest.raises(RunnerError, match=f"layer {model.num_layers} is asked for twice"):
        model.forward_layers(*args, [model.num_layers, -1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pooling_of_a_full_batch_is_float32_accurate_and_never_waits_for_the_gpu() -> None:
    """One 650M-shaped packed batch (65k tokens, D = 1280, three fp16 layers) pooled on the GPU: max and cls exact,
    the means within float32 accumulation of a float64 reference, and no host sync (the actor's other call keeps
    the GPU fed meanwhile)."""
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, 1025, (400,), generator=gen)
    lengths = lengths[: int((lengths.cumsum(0) <= 65536).sum())]  # [B] windows that fit the budget
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    hiddens = [(torch.randn(int(cu[-1]), 1280, generator=gen) * 3 + 1).half() for _ in range(3)]  # [T, D] each
    gpu = [h.cuda() for h in hiddens]
    cu_gpu = cu.cuda()
    out = torch.empty(len(lengths), 3 * len(POOLINGS), 1280, device="cuda")  # [B, C, D]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside raises
    try:
        pool_layers(gpu, cu_gpu, POOLINGS, 1, 1, out=out)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    got = out.cpu().numpy()
    for li, hidden in enumerate(hiddens):
        h = hidden.double().numpy()
        for b, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
            residues = h[start + 1 : end - 1]
            want = [residues.mean(0), h[start:end].mean(0), h[start], residues.max(0)]
            for pi, (pooling, expected) in enumerate(zip(POOLINGS, want, strict=True)):
                vector = got[b, li * len(POOLINGS) + pi]
                if pooling in ("cls", "max"):
                    assert np.array_equal(vector, expected.astype(np.float32)), (li, b, pooling)
                else:
                    np.testing.assert_allclose(vector, expected, rtol=0, atol=5e-5, err_msg=f"{li} {b} {pooling}")


def test_keeping_layers_compiles_nothing_more(tiny_esm2_path: Path) -> None:
    """The layers asked for are kept outside the compiled layer parts: any mix of layers runs the same three graphs
    (no recompile, no graph break), and the kept states equal eager ones."""
    from runner.models.esm2 import ESM2Embedder

    graphs: list[int] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    eager = load_model(str(tiny_esm2_path))
    assert isinstance(eager, ESM2Embedder)
    compiled = load_model(str(tiny_esm2_path))
    torch._dynamo.reset()
    compiled.use_compile(True, backend=recording_backend)
    tokens = torch.from_numpy(eager.codec.encode("MKTAYIAKQRQISFVKSHFSRQ")).long()
    cu = torch.tensor([0, 12, len(tokens)], dtype=torch.int32)  # two windows (the split is arbitrary here)
    positions = torch.cat([torch.arange(12), torch.arange(len(tokens) - 12)])
    for layers in ([0, 1, -1], [1], [-1], [1, 0]):
        got = compiled.forward_layers(tokens, positions, cu, 12, layers)
        want = eager.forward_layers(tokens, positions, cu, 12, layers)
        assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got, want, strict=True))
    assert compiled.compiling and len(graphs) == 3  # first inputs, middle and last output part, once each
