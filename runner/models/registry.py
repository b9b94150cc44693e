"""The one place that maps a model spec (name or path) to its family, codec and weights.

Dispatch is by known names and file content, never by substrings of a name:
- a fair-esm ESM-2 name, or a file ending in ".pt"                      -> ESM-2 (`runner.models.esm2`)
- a known hub name                                                     -> its family (HUB_FAMILIES)
- a directory: its config.json's model_type                            -> CONFIG_MODEL_TYPES
  (transformers ESM-2 directories run on the same ESM-2 model: `runner.models.esm2_hf`)
- a directory or other file holding ESM C weights, by content          -> ESM C (`runner.models.esmc`; see
  `runner.models.esmc_checkpoints.is_esmc`: e.g. an EvolutionaryScale snapshot or its .pth)
The DNABERT module (transformers) is imported only when a DNABERT model is asked for.
"""

from __future__ import annotations

from pathlib import Path

from runner.errors import RunnerError
from runner.models.base import EmbeddingModel, ModelInfo, SequenceCodec
from runner.models.esm2 import ESM2_MODELS
from runner.models.esm2_hf import HF_ESM2_MODELS
from runner.models.esmc_checkpoints import HUB_MODELS as ESMC_NAMES
from runner.models.esmc_checkpoints import esmc_codec, esmc_info, esmc_preflight, is_esmc, load_esmc

# Hub names served by runner.models.dnabert (kept here so resolving a spec does not import transformers).
DNABERT_NAMES: tuple[str, ...] = ("zhihan1996/DNABERT-S", "zhihan1996/DNABERT-2-117M")

# Hub name -> family.
HUB_FAMILIES: dict[str, str] = {
    **{name: "esm2" for name in HF_ESM2_MODELS},  # transformers ESM-2, mapped onto the packed ESM-2
    **{name: "dnabert" for name in DNABERT_NAMES},
    **{name: "esmc" for name in ESMC_NAMES},  # ESM C's short names and its EvolutionaryScale / Biohub repositories
}

# A local transformers directory's config.json "model_type" -> family. A config without model_type is read
# as DNABERT, whose released configs runner has always accepted that way.
CONFIG_MODEL_TYPES: dict[str, str] = {
    "esm": "esm2",
    "bert": "dnabert",
    "esmc": "esmc",
}


def model_family(spec: str) -> str:
    """ "esm2", "esmc" or "dnabert" for a model spec; RunnerError naming the accepted forms otherwise."""
    if spec in ESM2_MODELS or spec.endswith(".pt"):
        return "esm2"
    if spec in HUB_FAMILIES:
        return HUB_FAMILIES[spec]
    path = Path(spec).expanduser()
    if path.is_dir():
        return _directory_family(path)
    if is_esmc(spec):  # an ESM C state-dict file (.pth, .bin, .safetensors), recognised by its entries
        return "esmc"
    names = ", ".join([*ESM2_MODELS, *HUB_FAMILIES])
    raise RunnerError(
        f"model {spec} not found: use one of {names} or a path to a fair-esm .pt file, an ESM C .pth file or an HF "
        f"model directory"
    )


def _directory_family(path: Path) -> str:
    """The family of a local transformers directory, from its config.json's model_type."""
    from runner.models.esm2_hf import read_config_json

    if is_esmc(str(path)):  # model_type esmc, or a hub snapshot of the original layout (config.json "{}")
        return "esmc"
    if not (path / "config.json").is_file():
        raise RunnerError(
            f"model directory {path} has no config.json: a transformers model directory needs config.json, "
            f"the weights (model.safetensors or pytorch_model.bin) and the tokenizer files"
        )
    model_type = read_config_json(path).get("model_type", "bert")
    if model_type not in CONFIG_MODEL_TYPES:
        known = ", ".join(f"{t} ({f})" for t, f in CONFIG_MODEL_TYPES.items())
        raise RunnerError(f"{path / 'config.json'} has model_type {model_type!r}, which runner does not run: {known}")
    return CONFIG_MODEL_TYPES[model_type]


def load_codec(spec: str) -> SequenceCodec:
    """The weight-free text side of a model (cleaning, alphabet check, tokenization)."""
    if model_family(spec) == "esmc":
        return esmc_codec(spec)
    if model_family(spec) == "esm2":
        from runner.models.esm2 import esm2_codec

        return esm2_codec(spec)
    from runner.models.dnabert import dnabert_codec

    return dnabert_codec(spec)


def load_model(spec: str) -> EmbeddingModel:
    """The model with its weights, on CPU in float32; the caller moves it to its device and dtype."""
    if model_family(spec) == "esmc":
        return load_esmc(spec)
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
    if model_family(spec) == "esmc":
        return esmc_info(spec, compute_sha256=compute_sha256)
    if model_family(spec) == "esm2":
        from runner.models.esm2 import esm2_info

        return esm2_info(spec, compute_sha256=compute_sha256)
    from runner.models.dnabert import dnabert_info

    return dnabert_info(spec, compute_sha256=compute_sha256)


def preflight(spec: str) -> ModelInfo:
    """The cheap check of a model before start-up (no Ray, about a second): each family reads its config and
    its weights' names and shapes without loading the weights, and raises a CheckpointError naming what is
    missing, unexpected or wrong-shaped. The ModelInfo returned (layers, width) checks --layer before Ray
    starts. New model families add their own `<family>_preflight` here."""
    if model_family(spec) == "esmc":
        return esmc_preflight(spec)
    if model_family(spec) == "esm2":
        from runner.models.esm2 import esm2_preflight

        return esm2_preflight(spec)
    from runner.models.dnabert import dnabert_preflight

    return dnabert_preflight(spec)
