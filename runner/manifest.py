"""`manifest.json`: what was run, on what, with which result. Rewritten atomically at start and end."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner import __version__
from runner.config import EmbedConfig
from runner.models.base import ModelInfo

if TYPE_CHECKING:
    from runner.job import JobReport


def package_versions() -> dict[str, str | None]:
    """Versions of the packages whose numerics or behaviour the embeddings depend on."""
    versions: dict[str, str | None] = {"runner": __version__, "python": platform.python_version()}
    for dist in ("torch", "ray", "fair-esm", "transformers", "tokenizers", "pyarrow", "flash-attn"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


class Manifest:
    """Collects a job's description; `write(report)` dumps it with the report's counts."""

    def __init__(self, out_dir: Path, config: EmbedConfig, info: ModelInfo, precision: str, pooling: str,
                 token_budget: int, inputs: list[str]) -> None:
        self.path = out_dir / "manifest.json"
        self.config = config
        self.info = info
        self.precision = precision
        self.pooling = pooling
        self.token_budget = token_budget
        self.inputs = inputs
        self.dashboard_url: str | None = None
        self.reject_reasons: dict[str, int] = {}
        self.extra: dict[str, Any] = {}  # sections added by other features (e.g. "shadow")
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def as_dict(self, report: JobReport) -> dict[str, Any]:
        return {
            "status": report.status,
            "started": self.started,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {
                "name": self.info.name,
                "family": self.info.family,
                "checkpoint": self.info.checkpoint,
                "checkpoint_sha256": self.info.checkpoint_sha256,
                "embed_dim": self.info.embed_dim,
                "num_layers": self.info.num_layers,
                "parameters": self.info.parameters,
            },
            "layer": self.config.layer if self.config.layer >= 0 else self.info.num_layers,
            "pooling": self.pooling,
            "precision": self.precision,
            "attention_backend": sorted(report.attention),
            "token_budget": self.token_budget,
            "long": self.config.long,
            "max_residues": self.config.max_residues,
            "inputs": self.inputs,
            "settings": dataclasses.asdict(self.config),
            "counts": {
                "records_read": report.records_read,
                "rows": report.rows_written,
                "rejects": report.rejects,
                "truncated": report.truncated,
                "chunked": report.chunked,
                "reject_reasons": self.reject_reasons,
            },
            "throughput": {
                "tokens": report.tokens,
                "batches": report.batches,
                "tokens_per_second": round(report.tokens_per_second, 1),
                "packing_efficiency": round(report.packing_efficiency, 4),
                "wall_seconds": round(report.wall_seconds, 3),
                "windows_per_worker": report.workers,
            },
            "parts": report.parts,
            "versions": package_versions(),
            "dashboard_url": self.dashboard_url,
            **self.extra,
        }

    def write(self, report: JobReport) -> None:
        tmp = self.path.with_name(".manifest.json.tmp")
        tmp.write_text(json.dumps(self.as_dict(report), indent=2, default=str) + "\n")
        os.replace(tmp, self.path)
