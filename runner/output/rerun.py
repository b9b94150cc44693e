"""Rerunning a job that is already complete: answer in about a second, without starting Ray.

A complete job's manifest holds its fingerprint (inputs, model, settings). The same command again computes
the same fingerprint without Ray: the inputs' edges are hashed as always, and the checkpoint's SHA-256 is
taken from the manifest when the checkpoint's files have the size and mtime recorded there (hashing a
multi-GB checkpoint would take longer than the answer should). If it matches and every part the manifest
lists is still there at its recorded size (and every per-token file at the size in checksums.jsonl), nothing is
run and nothing is written: the manifest's figures and the drift files stay as the real run left them.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from runner.config import EmbedConfig, resolve_precision
from runner.models.base import ModelInfo, SequenceCodec, resolve_layers
from runner.output.checksums import read_records
from runner.output.manifest import checkpoint_files, job_fingerprint
from runner.output.report import JobReport
from runner.output.resume import fingerprint_differences, read_manifest
from runner.output.sink import OutputSpec
from runner.output.tokens import TOKENS_DIR


def output_spec(config: EmbedConfig, info: ModelInfo, codec: SequenceCodec) -> OutputSpec:
    """What the job stores per sequence (resolved layers x poolings, per-token or not): the same for the run
    (runner.job) and for this check, so that both compute the same fingerprint."""
    layers = tuple(resolve_layers(config.layer_list(), info.num_layers, config.model))
    return OutputSpec(layers, tuple(config.pooling_list(codec.default_pooling)), info.embed_dim,
                      per_token=config.per_token_dtype if config.per_token else None)


def already_complete(config: EmbedConfig, paths: list[Path], info: ModelInfo, codec: SequenceCodec) -> JobReport | None:
    """The report of the complete job `config` already holds in --out, or None when it must run."""
    out_dir = Path(config.out)
    if config.overwrite:
        return None
    previous = read_manifest(out_dir)
    if previous is None or previous.get("status") != "complete" or not isinstance(previous.get("fingerprint"), dict):
        return None
    model = previous.get("model") or {}
    sha = model.get("checkpoint_sha256") or ""
    if sha:
        if not info.checkpoint or model.get("checkpoint_files") != checkpoint_files(info.checkpoint):
            return None  # another or a changed checkpoint (or one not downloaded yet): the run decides
        info = dataclasses.replace(info, checkpoint_sha256=sha)
    old_settings = previous["fingerprint"].get("settings", {})
    if config.precision is None and config.gpus != 0:
        precision = old_settings.get("precision")  # auto: what this machine's GPUs gave the run that completed
    else:
        precision = resolve_precision(config.precision, on_gpu=bool(config.gpus))
    fingerprint = job_fingerprint(
        paths, info, config, precision, output_spec(config, info, codec), config.max_residues or codec.max_residues
    )
    if fingerprint_differences(previous["fingerprint"], fingerprint):
        return None
    parts = previous.get("parts") or []
    sizes = previous.get("part_bytes") or {}
    for name in parts:
        path = out_dir / "embeddings" / name
        if not path.is_file() or (name in sizes and os.path.getsize(path) != sizes[name]):
            return None  # a part went missing or changed: a real run finds and redoes it
    for name, record in read_records(out_dir).items():
        path = out_dir / name
        if name.startswith(f"{TOKENS_DIR}/") and (not path.is_file() or path.stat().st_size != record["bytes"]):
            return None  # so did a per-token file (a stat each: a same-size corruption needs `runner verify`)
    counts = previous.get("counts") or {}
    return JobReport(
        out_dir=out_dir,
        status="complete",
        records_read=int(counts.get("records_read", 0)),
        rows_written=int(counts.get("rows", 0)),
        rejects=int(counts.get("rejects", 0)),
        truncated=int(counts.get("truncated", 0)),
        chunked=int(counts.get("chunked", 0)),
        parts=list(parts),
        already_complete=True,
    )
