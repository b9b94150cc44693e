"""The one place that maps a model spec (name or path) to its family, codec and weights.

Dispatch is by known names and file format, never by substrings of a name:
- a fair-esm ESM-2 name, or a file ending in ".pt"                      -> ESM-2 (`runner.models.esm2`)
- a known DNABERT hub name, or a directory holding a config.json       -> DNABERT (`runner.models.dnabert`)
The DNABERT module (transformers) is imported only when a DNABERT model is asked for.
"""

from __future__ import annotations

from pathlib import Path

from runner.errors import RunnerError
from runner.models.base import EmbeddingModel, ModelInfo, SequenceCodec
from runner.models.esm2 import ESM2_MODELS

# Hub names served by runner.models.dnabert (kept here so resolving a spec does not import transformers).
DNABERT_NAMES: tuple[str, ...] = ("zhihan1996/DNABERT-S", "zhihan1996/DNABERT-2-117M")


def model_family(spec: str) -> str:
    """ "esm2" or "dnabert" for a model spec; RunnerError naming the accepted forms otherwise."""
    if spec in ESM2_MODELS or spec.endswith(".pt"):
        return "esm2"
    if spec in DNABERT_NAMES:
        return "dnabert"
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return "dnabert"
    names = ", ".join([*ESM2_MODELS, *DNABERT_NAMES])
    raise RunnerError(
        f"model {spec} not found: use one of {names} or a path to a fair-esm .pt file or an HF model directory"
    )


def load_codec(spec: str) -> SequenceCodec:
    """The weight-free text side of a model (cleaning, alphabet check, tokenization)."""
    if model_family(spec) == "esm2":
        from runner.models.esm2 import esm2_codec

        return esm2_codec(spec)
    from runner.models.dnabert import dnabert_codec

    return dnabert_codec(spec)


def load_model(spec: str) -> EmbeddingModel:
    """The model with its weights, on CPU in float32; the caller moves it to its device and dtype."""
    if model_family(spec) == "esm2":
        from runner.models.esm2 import load_esm2

        return load_esm2(spec)
    from runner.models.dnabert import load_dnabert

    return load_dnabert(spec)


def model_info(spec: str, compute_sha256: bool = False) -> ModelInfo:
    """What the manifest records about a model, without loading its weights.

    With `compute_sha256` (once per job, on the driver) hub weights are downloaded first, so actors on
    the driver's node find them cached, and the checkpoint is hashed.
    """
    if model_family(spec) == "esm2":
        from runner.models.esm2 import esm2_info

        return esm2_info(spec, compute_sha256=compute_sha256)
    from runner.models.dnabert import dnabert_info

    return dnabert_info(spec, compute_sha256=compute_sha256)
