"""Shared pytest fixtures. Each block below belongs to one model or stage; add new fixtures in their own block."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


@pytest.fixture(autouse=True, scope="session")
def jobs_run_on_ray() -> Iterator[None]:
    """The suite's jobs run on Ray (RUNNER_ENGINE, the --engine flag's variable) unless a test asks for another
    engine: with the default `auto`, every job this small would run in-process (runner.driver.in_process), and
    the Ray path (actors, retries, the cluster) would go untested. tests/test_in_process.py tests the others."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RUNNER_ENGINE", "ray")
        yield


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", REPO / "scripts" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import scripts/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_local_ray(num_cpus: int) -> None:
    """A Ray of this test process's own (address="local": even when another Ray runs on this machine), retried:
    a loaded 2-core machine can miss Ray's fixed 30 s start-up deadline, which Ray reports as a bare Exception."""
    import ray

    for attempt in range(6):
        try:
            ray.init(address="local", num_cpus=num_cpus, num_gpus=0, include_dashboard=False, log_to_driver=False,
                     object_store_memory=300 * 2**20)
            return
        except Exception as e:
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == 5:
                raise


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray per test module (start_local_ray, 4 CPUs); subprocess drivers join it by this address."""
    import ray

    start_local_ray(num_cpus=4)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@contextmanager
def running_ray(num_cpus: int) -> Iterator[None]:
    """A Ray of this test process's own (start_local_ray) for the block, shut down after it: `runner embed` in the
    block reuses it."""
    import ray

    start_local_ray(num_cpus)
    try:
        yield
    finally:
        ray.shutdown()


def read_fasta(path: Path) -> list[tuple[str, str]]:
    """(id, sequence) pairs of a small FASTA file."""
    records: list[tuple[str, str]] = []
    for line in path.read_text().splitlines():
        if line.startswith(">"):
            records.append((line[1:].split()[0], ""))
        elif line.strip() and records:
            records[-1] = (records[-1][0], records[-1][1] + line.strip())
    return records


@pytest.fixture(scope="session")
def some_proteins() -> list[tuple[str, str]]:
    """The 15 real UniRef50 proteins of tests/data/some_proteins.fasta (71-935 residues)."""
    return read_fasta(DATA / "some_proteins.fasta")


# --- commands and their outputs ----------------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str]:
    """`runner ARGS` in this process (click's CliRunner, exceptions raised as they are): (exit code, output)."""
    from click.testing import CliRunner

    from runner.cli import cli

    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def read_parts(out: Path) -> Any:
    """The pooled parts of a `runner embed` output folder, concatenated in part order: one pyarrow Table."""
    import pyarrow as pa

    return pa.concat_tables(pa.ipc.open_file(p).read_all() for p in sorted((out / "embeddings").glob("part-*.arrow")))


def vectors(table: Any, name: str = "embedding") -> Any:
    """A pooled part's vector column `name` as a numpy array [N, D]."""
    dim = table.schema.field(name).type.list_size
    return table.column(name).combine_chunks().flatten().to_numpy().reshape(-1, dim)


def embeddings_by_id(out: Path) -> dict[str, Any]:
    """id -> its stored `embedding` vector [D], of a `runner embed` output folder."""
    table = read_parts(out)
    return dict(zip(table.column("id").to_pylist(), vectors(table), strict=True))


# --- packed batches ----------------------------------------------------------------------------------

Packed = tuple[Any, Any, Any, int]  # tokens int64 [T], positions int64 [T], cu_seqlens int32 [B+1], max_seqlen


def pack(codec: Any, seqs: list[str], device: Any = None) -> Packed:
    """tokens [T], positions [T], cu_seqlens [B+1], max_seqlen of the sequences back to back, as `codec` cleans
    and encodes them; the tensors on `device` when given (CPU otherwise)."""
    import torch

    encoded = [torch.from_numpy(codec.encode(codec.clean(s))).long() for s in seqs]
    lengths = torch.tensor([len(t) for t in encoded])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()])
    tokens = torch.cat(encoded)
    if device is not None:
        tokens, positions, cu = tokens.to(device), positions.to(device), cu.to(device)
    return tokens, positions, cu, int(lengths.max())


def shadow_math_models(model: Any, math: str, compiled: bool, device: Any) -> tuple[Any, Any, Any]:
    """Three copies of `model` on `device`, each with its attention kernel chosen there: IEEE FP32, FP32 emulated
    with the shadow's `math` (compiled when `compiled`), and FP16: what the gpu tests of the shadow's maths compare."""
    import copy

    import torch

    ieee = copy.deepcopy(model).to(device)
    ieee.select_attention(device)
    emulated = copy.deepcopy(model).to(device)
    emulated.select_attention(device)
    emulated.emulate_fp32(math)
    assert emulated.use_compile(compiled) == compiled
    half = copy.deepcopy(model).to(device, torch.float16)
    half.select_attention(device)
    return ieee, emulated, half


# --- ESM-2 -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_esm2_script() -> ModuleType:
    """scripts/tiny_esm2.py, for tests that build their own variants (make_esm2)."""
    return load_script("tiny_esm2")


@pytest.fixture(scope="session")
def tiny_esm2_path(tmp_path_factory: pytest.TempPathFactory, tiny_esm2_script: ModuleType) -> Path:
    """A tiny random ESM-2 checkpoint in fair-esm's format (2 layers, dim 64, 4 heads) with its regression file."""
    return tiny_esm2_script.make_esm2(tmp_path_factory.mktemp("esm2") / "esm2_tiny.pt")


def load_fair_esm(checkpoint: Path) -> tuple[Any, Any]:
    """fair-esm's own loader on a checkpoint file (torch.load made safe the way runner's is): (model, alphabet)."""
    import argparse

    import esm
    import torch

    with torch.serialization.safe_globals([argparse.Namespace]):
        return esm.pretrained.load_model_and_alphabet_local(str(checkpoint))


@pytest.fixture(scope="module")
def fair_esm_model(tiny_esm2_path: Path) -> Any:
    """tiny_esm2_path through fair-esm's own loader, in eval mode (one per test module)."""
    return load_fair_esm(tiny_esm2_path)[0].eval()


@pytest.fixture(scope="session")
def overflow_esm2_path(tmp_path_factory: pytest.TempPathFactory, tiny_esm2_script: ModuleType) -> Path:
    """Like tiny_esm2_path, but any sequence containing 'W' embeds to non-finite values in fp32."""
    return tiny_esm2_script.make_esm2(
        tmp_path_factory.mktemp("esm2_overflow") / "esm2_overflow.pt", overflow_residue="W"
    )


@pytest.fixture(scope="session")
def esm2_150m(tmp_path_factory: pytest.TempPathFactory, tiny_esm2_script: ModuleType) -> Path:
    """Random weights in the esm2_t30_150M_UR50D shape (30 layers, 640 wide, 20 heads), for the GPU tests."""
    return tiny_esm2_script.make_esm2(tmp_path_factory.mktemp("esm150") / "esm2_150m.pt", layers=30, dim=640,
                                      heads=20, seed=0)


def fair_esm_extract(checkpoint: Path, fasta: Path, repr_layers: list[int]) -> dict[str, dict]:
    """What fair-esm's scripts/extract.py computes for each sequence with `--include mean per_tok bos`:
    its loader, batch converter (truncation 1022) and padded FP32 forward, sliced as extract.py slices.
    By label: {"label", "representations" {layer: [L, D]}, "mean_representations", "bos_representations"}."""
    import torch

    model, alphabet = load_fair_esm(checkpoint)
    model.eval()
    labels, strs, toks = alphabet.get_batch_converter(1022)(read_fasta(fasta))
    with torch.no_grad():
        reps = model(toks, repr_layers=repr_layers)["representations"]
    out = {}
    for i, label in enumerate(labels):
        n = min(1022, len(strs[i]))
        out[label] = {
            "label": label,
            "representations": {layer: t[i, 1 : n + 1].clone() for layer, t in reps.items()},
            "mean_representations": {layer: t[i, 1 : n + 1].mean(0).clone() for layer, t in reps.items()},
            "bos_representations": {layer: t[i, 0].clone() for layer, t in reps.items()},
        }
    return out


# --- ESM-2 in transformers' format ------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_hf_esm2_script() -> ModuleType:
    """scripts/tiny_hf_esm2.py (make_hf_esm2, to_fair_esm)."""
    return load_script("tiny_hf_esm2")


def fake_hub_cache(cache: Path, repo: str, files_from: Path) -> Path:
    """Lay out `files_from` as huggingface_hub's cache holds a download of hub model `repo` at `cache`
    (models--org--name/refs/main + snapshots/<revision>/...); returns the snapshot directory."""
    import shutil

    revision = "0123456789abcdef0123456789abcdef01234567"
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    shutil.copytree(files_from, root / "snapshots" / revision)
    return root / "snapshots" / revision


@contextmanager
def ray_with_hub_cache(cache: Path, repo: str, files_from: Path, **env: str) -> Iterator[None]:
    """A local Ray (4 CPUs) started with a Hugging Face cache at `cache` that holds `files_from` as hub model `repo`,
    and HF_HUB_OFFLINE=1 (no network here): the driver and the actors resolve the hub name as from a user's warm
    cache. `env`: more environment variables for this process and the actors."""
    from huggingface_hub import constants

    fake_hub_cache(cache, repo, files_from)
    patch = pytest.MonkeyPatch()
    patch.setenv("HF_HUB_CACHE", str(cache))  # the actors' processes (they inherit Ray's environment)
    patch.setenv("HF_HUB_OFFLINE", "1")
    for name, value in env.items():
        patch.setenv(name, value)
    patch.setattr(constants, "HF_HUB_CACHE", str(cache))  # this process imported huggingface_hub already
    patch.setattr(constants, "HF_HUB_OFFLINE", True)
    try:
        with running_ray(num_cpus=4):  # address="local": a Ray of its own, even when others run on this machine
            yield
    finally:
        patch.undo()


@pytest.fixture(scope="session")
def tiny_hf_esm2_dir(tmp_path_factory: pytest.TempPathFactory, tiny_hf_esm2_script: ModuleType) -> Path:
    """A tiny random EsmForMaskedLM saved by transformers' save_pretrained (safetensors) with its tokenizer."""
    return tiny_hf_esm2_script.make_hf_esm2(tmp_path_factory.mktemp("hf_esm2") / "esm2_hf_tiny")


# --- DNABERT -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_dnabert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DNABERT-S checkpoint in the released HF layout (config, safetensors, BPE tokenizer)."""
    return load_script("tiny_dnabert").make_dnabert(
        tmp_path_factory.mktemp("dnabert") / "dnabert_tiny", layout="dnabert-s"
    )


# --- ESM C -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_esmc_script() -> ModuleType:
    """scripts/tiny_esmc.py, for tests that build their own variants (make_esmc)."""
    return load_script("tiny_esmc")


@pytest.fixture(scope="session")
def tiny_esmc(tmp_path_factory: pytest.TempPathFactory, tiny_esmc_script: ModuleType) -> tuple[Path, Path]:
    """A tiny random ESM C (2 layers, width 128, 2 heads of 64): the transformers directory (EsmcForMaskedLM
    save_pretrained + EsmcTokenizer) and the same weights as an original-layout .pth."""
    return tiny_esmc_script.make_esmc(tmp_path_factory.mktemp("esmc"))


@pytest.fixture(scope="session")
def overflow_esmc_dir(tmp_path_factory: pytest.TempPathFactory, tiny_esmc_script: ModuleType) -> Path:
    """Like tiny_esmc's directory, but any sequence containing 'W' embeds to non-finite values in fp32."""
    return tiny_esmc_script.make_esmc(tmp_path_factory.mktemp("esmc_overflow"), overflow_residue="W")[0]


# --- GPU ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_ray() -> Iterator[None]:
    """A local Ray with every GPU of this machine, for a module of gpu tests (pytest.mark.usefixtures("gpu_ray"))."""
    import ray
    import torch

    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def pythonpath_with(repo: Path) -> str:
    """PYTHONPATH for a `python -m runner` subprocess: this checkout first, then the test run's own PYTHONPATH
    (a GPU machine's bundle of packages lives there; replacing it hides fair-esm and Ray from the child)."""
    return os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)


def run_bench(*args: str, script: str = "bench.py", timeout: float = 120) -> Any:
    """`python scripts/<script> ARGS` as the wrapper runs it, with the repository on PYTHONPATH: the completed
    process (text stdout and stderr)."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=pythonpath_with(REPO))
    return subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
