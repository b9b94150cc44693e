"""The licence table of known model names, and its record in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

from runner.config import EmbedConfig
from runner.models.base import ModelInfo
from runner.models.esm2 import ESM2_MODELS
from runner.models.licences import KNOWN_LICENCES, licence_of
from runner.models.registry import DNABERT_NAMES
from runner.output.manifest import Manifest
from runner.output.report import JobReport
from runner.output.sink import OutputSpec


def test_every_known_name_has_a_licence_with_a_source() -> None:
    for name in [*ESM2_MODELS, *(f"facebook/{n}" for n in ESM2_MODELS), *DNABERT_NAMES]:
        licence = licence_of(name)
        assert licence is not None, name
        assert licence.source.startswith("https://"), name
    assert licence_of("esm2_t33_650M_UR50D").name == "MIT"
    # The 600M 2024-12 weights are non-commercial; the 300M ones are not.
    assert licence_of("EvolutionaryScale/esmc-600m-2024-12").name == "Cambrian Non-Commercial License"
    assert licence_of("EvolutionaryScale/esmc-300m-2024-12").name == "Cambrian Open License"
    assert licence_of("/data/models/esm2_t33_650M_UR50D.pt") is None  # a local file: provenance unknown
    assert all(lic.confirmed or lic.note for lic in KNOWN_LICENCES.values())  # an unconfirmed one says why


def _manifest(tmp_path: Path, name: str) -> dict:
    info = ModelInfo(name=name, family="esm2", checkpoint="", checkpoint_sha256="", embed_dim=320,
                     num_layers=6, parameters=7_000_000)
    config = EmbedConfig(inputs=["x.fasta"], out=str(tmp_path), model=name)
    manifest = Manifest(tmp_path, config, info, "fp32", OutputSpec((6,), ("mean",), 320), 1024, ["x.fasta"])
    manifest.write(JobReport(tmp_path))
    return json.loads((tmp_path / "manifest.json").read_text())


def test_manifest_records_the_licence_of_a_known_name(tmp_path: Path) -> None:
    record = _manifest(tmp_path, "facebook/esm2_t6_8M_UR50D")["model"]["licence"]
    assert record["name"] == "MIT" and record["confirmed"] is True and "facebookresearch/esm" in record["source"]
    assert _manifest(tmp_path, str(tmp_path / "tiny.pt"))["model"]["licence"] is None
