"""`manifest.json`: what was run, on what, with which result. Rewritten atomically at start and end.

It also holds the job's *fingerprint* (inputs, model, output-changing settings): a rerun into the same
`--out` resumes only when its fingerprint is equal (see `runner.output.resume`).
"""

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
from runner.driver.nodes import edge_signature
from runner.models.base import ModelInfo
from runner.models.licences import licence_record
from runner.output.checksums import read_records as read_checksums

if TYPE_CHECKING:
    from runner.output.report import ActorClock, JobReport
    from runner.output.sink import OutputSpec


# Inputs are fingerprinted by size plus a SHA-256 of their first and last 64 KiB (runner.driver.nodes.edge_signature,
# which also compares checkpoints across nodes): unchanged by a copy or `touch` (which mtimes would not survive),
# while appending, truncating or rewriting either end is caught. 64 KiB rather than 1 MiB keeps the cost low for
# inputs of many small shards (reading 2 MiB of each of 100k 1-MiB shards would read the whole input at every
# start). A same-size edit in the middle is not seen.
def input_fingerprint(path: Path) -> dict[str, Any]:
    """{path, size, edges_sha256} of one input file."""
    return {"path": str(path.resolve()), **edge_signature(path)}


def job_fingerprint(paths: list[Path], info: ModelInfo, config: EmbedConfig, precision: str, spec: OutputSpec,
                    max_residues: int, inputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What decides the output rows: the inputs (in order: ordinals depend on it), the model and every
    setting that changes an embedding or which records are embedded. Throughput knobs are left out.
    `inputs`: the paths' input_fingerprint()s when already computed (runner.job does it beside Ray's start).

    Layers are recorded resolved (-1 and 33 are the same job for a 33-layer model); a one-layer, one-pooling
    job keeps the scalar `layer`/`pooling` of earlier versions, so their outputs still resume."""
    single = len(spec.layers) == 1 and len(spec.poolings) == 1
    outputs: dict[str, Any] = (
        {"layer": spec.layers[0], "pooling": spec.poolings[0]}
        if single else {"layer": list(spec.layers), "pooling": list(spec.poolings)}
    )
    if spec.per_token is not None:
        outputs["per_token"] = spec.per_token
    return {
        "inputs": inputs if inputs is not None else [input_fingerprint(p) for p in paths],
        # The weights' hash when known (so `models/x.pt` and `/abs/models/x.pt` match), else the name.
        "model": {"family": info.family, "checkpoint_sha256": info.checkpoint_sha256}
        if info.checkpoint_sha256 else {"family": info.family, "name": info.name},
        "settings": {
            **outputs,
            "precision": precision,
            "fp32_layernorm": config.fp32_layernorm,
            "exact_gelu": config.exact_gelu,
            "max_residues": max_residues,
            "long": config.long,
            "chunk_overlap": config.chunk_overlap,
            "id_column": config.id_column,
            "seq_column": config.seq_column,
        },
    }


def part_bytes(out_dir: Path, parts: list[str]) -> dict[str, int]:
    """{part name: size in bytes} of the parts that exist."""
    sizes = {}
    for name in parts:
        path = out_dir / "embeddings" / name
        if path.is_file():
            sizes[name] = path.stat().st_size
    return sizes


def checkpoint_files(checkpoint: str) -> list[dict[str, Any]]:
    """Size and mtime of a checkpoint file, or of every file directly in a checkpoint directory."""
    if not checkpoint:
        return []
    path = Path(checkpoint)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    stats = []
    for f in files:
        st = f.stat()
        stats.append({"path": str(f.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return stats


def column_map(spec: OutputSpec) -> dict[str, dict[str, str]]:
    """{layer: {pooling: column name}} of a job's pooled parts (JSON keys are strings)."""
    names = iter(spec.columns)
    return {str(layer): {pooling: next(names) for pooling in spec.poolings} for layer in spec.layers}


def package_versions() -> dict[str, str | None]:
    """Versions of the packages whose numerics or behaviour the embeddings depend on."""
    versions: dict[str, str | None] = {"runner": __version__, "python": platform.python_version()}
    for dist in ("torch", "ray", "fair-esm", "transformers", "tokenizers", "pyarrow", "flash-attn"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def actor_section(clock: ActorClock) -> dict[str, Any]:
    """One actor's clock in `throughput.actors`."""
    return {
        "batches": clock.batches,
        "tokens": clock.tokens,
        "busy_seconds": round(clock.busy_seconds, 3),
        "span_seconds": round(clock.span_seconds, 3),
        "steady_tokens_per_second": round(clock.steady_tokens_per_second, 1),
        "forward_tokens_per_second": round(clock.forward_tokens_per_second, 1),
        "busy_fraction": round(clock.busy_fraction, 4),
    }


def with_shadow_section(report: JobReport) -> dict[str, Any] | None:
    """`throughput.with_shadow`: the actor clock over the batches done while the shadow ran (from its first
    comparison on); None when the shadow compared nothing (off, or the job stopped before its first result)."""
    window = report.shadow_window
    origin = report.first_batch_start
    if window is None:
        return None
    return {
        # Seconds from the start of the job's first batch (the actor clock's origin) to the window's start.
        "from_seconds": round(window.start - origin, 3) if origin is not None else None,
        "batches": window.batches,
        "tokens": window.tokens,
        "span_seconds": round(window.span_seconds, 3),
        "tokens_per_second": round(window.tokens_per_second, 1),
    }


class Manifest:
    """Collects a job's description; `write(report)` dumps it with the report's counts."""

    def __init__(self, out_dir: Path, config: EmbedConfig, info: ModelInfo, precision: str, spec: OutputSpec,
                 token_budget: int, inputs: list[str], fingerprint: dict[str, Any] | None = None) -> None:
        self.path = out_dir / "manifest.json"
        self.config = config
        self.info = info
        self.precision = precision
        self.spec = spec
        self.per_token: dict[str, Any] | None = None  # the `outputs.per_token` section (files, bytes), if any
        self.token_budget = token_budget
        self.inputs = inputs
        self.fingerprint = fingerprint
        self.token_budget_requested: int | None = None  # a --token-budget raised to the longest window
        self.resume: dict[str, Any] = {}  # the `resume` section (runs, resumed rows, redone parts)
        self.dashboard_url: str | None = None
        self.reject_reasons: dict[str, int] = {}
        self.extra: dict[str, Any] = {}  # sections added by other features (e.g. "shadow")
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def as_dict(self, report: JobReport) -> dict[str, Any]:
        return {
            "status": report.status,
            "error": report.error,  # why it stopped when not complete: the one line printed on stderr
            "started": self.started,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": {
                "name": self.info.name,
                "family": self.info.family,
                "checkpoint": self.info.checkpoint,
                "checkpoint_sha256": self.info.checkpoint_sha256,
                # size and mtime of the checkpoint's files: a rerun of a complete job reuses the hash when
                # they are unchanged (runner.output.rerun), instead of hashing gigabytes to answer "already complete"
                "checkpoint_files": checkpoint_files(self.info.checkpoint),
                "embed_dim": self.info.embed_dim,
                "num_layers": self.info.num_layers,
                "parameters": self.info.parameters,
                # The licence of the weights when the name is a known published model (runner.models.licences).
                "licence": licence_record(self.info.name),
            },
            # `layer`/`pooling`: the first layer and pooling (the only ones of most jobs); `outputs` has them all.
            "layer": self.spec.layers[0],
            "pooling": self.spec.poolings[0],
            "outputs": {
                "layers": list(self.spec.layers),
                "poolings": list(self.spec.poolings),
                # column name per layer x pooling: {"33": {"mean": "layer33_mean"}} ("embedding" when single)
                "columns": column_map(self.spec),
                "per_token": self.per_token,
            },
            "precision": self.precision,
            "attention_backend": sorted(report.attention),
            "token_budget": self.token_budget,
            # what was asked for, when it was below the longest window and raised to it (else None)
            "token_budget_requested": self.token_budget_requested,
            "long": self.config.long,
            # resolved (the model's window when not given), as in the fingerprint
            "max_residues": (self.fingerprint or {}).get("settings", {}).get("max_residues", self.config.max_residues),
            "inputs": self.inputs,
            "settings": dataclasses.asdict(self.config),
            "counts": {
                "records_read": report.records_read,
                "rows": report.rows_written,
                "rejects": report.rejects,
                "truncated": report.truncated,
                "chunked": report.chunked,
                "reject_reasons": self.reject_reasons,
                "resumed_rows": report.resumed_rows,
                "failed_records": report.failed_records,
                "oom_splits": report.oom_splits,
                "actor_restarts": report.actor_restarts,
                "duplicates_dropped": report.duplicates_dropped,
            },
            "throughput": {
                "tokens": report.tokens,
                "batches": report.batches,
                "tokens_per_second": round(report.tokens_per_second, 1),
                "steady_tokens_per_second": round(report.steady_tokens_per_second, 1),
                "first_output_seconds": report.first_output_seconds,
                "packing_efficiency": round(report.packing_efficiency, 4),
                "wall_seconds": round(report.wall_seconds, 3),
                "windows_per_worker": report.workers,
                # The actors' own clocks (see runner.output.report.ActorClock): independent of Ray's delivery bursts.
                "actor_steady_tokens_per_second": round(report.actor_steady_tokens_per_second, 1),
                "forward_tokens_per_second": round(report.forward_tokens_per_second, 1),
                "actor_busy_fraction": round(report.actor_busy_fraction, 4),
                "with_shadow": with_shadow_section(report),
                "actors": {worker: actor_section(clock) for worker, clock in sorted(report.actors.items())},
                # Two clocks, two steady rates: they differ by how Ray delivers outputs, and neither is wrong.
                "clocks": {
                    "steady_tokens_per_second": "driver: tokens received after the first output / wall seconds "
                                                "since it (includes Ray's delivery bursts and the end of the job)",
                    "actor_steady_tokens_per_second": "actors: their own batch timestamps, tokens after each "
                                                      "actor's first batch / earliest first to latest last batch",
                },
            },
            "parts": report.parts,
            # bytes of each complete part this run wrote or kept, checked by a rerun of a complete job
            "part_bytes": part_bytes(self.path.parent, report.parts),
            # CRC-32 of every file in checksums.jsonl (path relative to --out: embeddings/part-*, tokens/<shard>/tok-*),
            # as its writer computed it
            "checksums": {name: r["crc32"] for name, r in sorted(read_checksums(self.path.parent).items())},
            "fingerprint": self.fingerprint,
            "resume": self.resume,
            "versions": package_versions(),
            "dashboard_url": self.dashboard_url,
            **self.extra,
        }

    def write(self, report: JobReport) -> None:
        """Write atomically (temp file, fsync, rename): a crash leaves the old or the new manifest, whole."""
        tmp = self.path.with_name(".manifest.json.tmp")
        with open(tmp, "w") as fh:
            fh.write(json.dumps(self.as_dict(report), indent=2, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
