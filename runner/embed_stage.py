"""The embedding stage: a callable class that holds one model on one device and embeds packed batches.

Ray Data builds one instance per actor (`__init__` loads the model once); `__call__` takes an Arrow table
of packed-batch rows (see `runner.stream`) and returns an Arrow table with one row per window. It runs
just as well without Ray, which is how the tests drive it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from runner.batch import PackedBatch
from runner.metrics import ActorMetrics
from runner.models.registry import load_model
from runner.pooling import pool_packed
from runner.shadow import shadow_sample

log = logging.getLogger("runner")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class StageSettings:
    """What an embedding actor needs to know; built once on the driver from the EmbedConfig."""

    model: str  # model spec (name or path), loaded by the actor itself
    precision: str  # "fp16" | "bf16" | "fp32"
    layer: int  # representation layer
    pooling: str  # "mean" | "mean_all" | "cls"
    device: str  # "cuda" or "cpu"
    cpu_threads: int = 1  # torch threads for a CPU actor
    fp32_layernorm: bool = False  # run LayerNorms in fp32 inside a half-precision model
    shadow_rate: float = 0.0  # fraction of ids whose tokens are returned for the FP32 shadow


def output_schema(embed_dim: int) -> pa.Schema:
    """Rows the stage returns: embedded windows and, with null embeddings, rejects passed through."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("ordinal", pa.int64()),
            ("residues", pa.int32()),
            ("truncated", pa.bool_()),
            ("chunk_index", pa.int32()),
            ("chunk_count", pa.int32()),
            ("total_residues", pa.int32()),
            ("embedding", pa.list_(pa.float32(), embed_dim)),
            ("finite", pa.bool_()),
            ("reject_reason", pa.string()),  # non-null: this row is a reject, not an embedding
            ("source", pa.string()),  # input file, set on rejects
            ("worker", pa.string()),  # host:device of the actor that embedded the row
            ("attention", pa.string()),  # attention kernel the actor used
            ("records_in", pa.int64()),  # records read that this row accounts for (block summaries)
            ("batch_tokens", pa.int64()),  # tokens of the packed batch (set on its first window)
            ("batch_budget", pa.int64()),  # token budget of that batch (set on its first window)
            ("shadow_tokens", pa.list_(pa.int32())),  # token ids of windows sampled for the shadow, else null
        ]
    )


class EmbedStage:
    """One model on one device. Ray Data calls it with packed-batch rows; it returns embedded rows."""

    def __init__(self, settings: StageSettings) -> None:
        self.settings = settings
        if settings.device == "cpu":
            torch.set_num_threads(max(1, settings.cpu_threads))
            self.device = torch.device("cpu")
        else:
            # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU, so it is always device 0 here.
            self.device = torch.device("cuda", 0)
        started = time.perf_counter()
        model = load_model(settings.model)
        model.fp32_layernorm = settings.fp32_layernorm
        self.model = model.to(self.device, DTYPES[settings.precision]).eval()
        self.backend = self.model.select_attention(self.device)
        self.codec = self.model.codec
        self.embed_dim = self.model.info.embed_dim
        self.schema = output_schema(self.embed_dim)
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self.worker = f"{socket.gethostname()}:{'cuda' + gpu if settings.device != 'cpu' else 'cpu'}:{os.getpid()}"
        self.metrics = ActorMetrics(settings.model, settings.precision, self.worker)
        log.info(
            "embed actor %s: %s on %s in %s, attention %s (loaded in %.1fs)",
            self.worker,
            settings.model,
            self.device,
            settings.precision,
            self.backend,
            time.perf_counter() - started,
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        pieces = [self._embed_row(row) for row in table.to_pylist()]
        return pa.concat_tables(pieces) if pieces else self.schema.empty_table()

    @torch.inference_mode()
    def embed(self, batch: PackedBatch) -> tuple[np.ndarray, np.ndarray]:
        """Pooled float32 embeddings [B, D] and a finite flag per window, with one device sync."""
        dev = self.device
        pin = dev.type == "cuda"
        tokens = _to_device(batch.tokens, torch.int64, dev, pin)  # [T]
        positions = _to_device(batch.positions, torch.int64, dev, pin)  # [T]
        cu_seqlens = _to_device(batch.cu_seqlens, torch.int32, dev, pin)  # [B+1]
        hidden = self.model.forward_packed(tokens, positions, cu_seqlens, batch.max_seqlen, self.settings.layer)
        pooled = pool_packed(
            hidden, cu_seqlens, self.settings.pooling, self.codec.special_start, self.codec.special_end
        )  # [B, D] float32
        finite = torch.isfinite(pooled).all(dim=1)  # [B]
        # One transfer back (and so one sync) for the embeddings and their finite flags together.
        both = torch.cat([pooled, finite[:, None].to(pooled.dtype)], dim=1).cpu().numpy()  # [B, D+1]
        return both[:, :-1], both[:, -1].astype(bool)

    def _embed_row(self, row: dict) -> pa.Table:
        records_in = int(row.get("records_in") or 0)
        if not row["ids"]:
            return self._rejects_table(row, records_in)
        batch = PackedBatch.from_row(row)
        started = time.perf_counter()
        vectors, finite = self.embed(batch)
        n = len(batch.ids)
        self.metrics.batch(n, batch.num_tokens, batch.token_budget, time.perf_counter() - started,
                           int((~finite).sum()))
        shadow_tokens: list[np.ndarray | None] = [None] * n
        if self.settings.shadow_rate > 0:
            # Chunked windows are not sampled: their stored vector is a merge of several windows.
            sampled = shadow_sample(batch.ids, self.settings.shadow_rate) & (batch.chunk_count <= 1)
            for i in np.flatnonzero(sampled):
                shadow_tokens[i] = batch.tokens[batch.cu_seqlens[i] : batch.cu_seqlens[i + 1]]
        vectors = np.where(finite[:, None], vectors, np.float32(0))  # never ship NaN/Inf onwards
        batch_tokens = np.zeros(n, dtype=np.int64)
        batch_budget = np.zeros(n, dtype=np.int64)
        batch_tokens[0], batch_budget[0] = batch.num_tokens, batch.token_budget
        flat = pa.array(vectors.astype(np.float32).ravel(), type=pa.float32())
        table = pa.table(
            {
                "id": pa.array(batch.ids, pa.string()),
                "ordinal": pa.array(batch.ordinals, pa.int64()),
                "residues": pa.array(batch.residues, pa.int32()),
                "truncated": pa.array(batch.truncated, pa.bool_()),
                "chunk_index": pa.array(batch.chunk_index, pa.int32()),
                "chunk_count": pa.array(batch.chunk_count, pa.int32()),
                "total_residues": pa.array(batch.total_residues, pa.int32()),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, self.embed_dim),
                "finite": pa.array(finite, pa.bool_()),
                "reject_reason": pa.nulls(n, pa.string()),
                "source": pa.nulls(n, pa.string()),
                "worker": pa.array([self.worker] * n, pa.string()),
                "attention": pa.array([self.backend] * n, pa.string()),
                "records_in": pa.array(np.zeros(n, dtype=np.int64)),
                "batch_tokens": pa.array(batch_tokens),
                "batch_budget": pa.array(batch_budget),
                "shadow_tokens": pa.array(shadow_tokens, pa.list_(pa.int32())),
            },
            schema=self.schema,
        )
        if records_in:
            table = pa.concat_tables([table, self._rejects_table(row, records_in)])
        return table

    def _rejects_table(self, row: dict, records_in: int) -> pa.Table:
        """Rejects of a block pass through; an extra empty-id row carries the block's record count."""
        ids = list(row.get("reject_ids") or [])
        n = len(ids) + 1
        return pa.table(
            {
                "id": pa.array([*ids, None], pa.string()),
                "ordinal": pa.array([*(row.get("reject_ordinals") or []), -1], pa.int64()),
                "residues": pa.array([0] * n, pa.int32()),
                "truncated": pa.array([False] * n, pa.bool_()),
                "chunk_index": pa.array([0] * n, pa.int32()),
                "chunk_count": pa.array([1] * n, pa.int32()),
                "total_residues": pa.array([0] * n, pa.int32()),
                "embedding": pa.nulls(n, pa.list_(pa.float32(), self.embed_dim)),
                "finite": pa.array([True] * n, pa.bool_()),
                "reject_reason": pa.array([*(row.get("reject_reasons") or []), None], pa.string()),
                "source": pa.array([*(row.get("reject_sources") or []), None], pa.string()),
                "worker": pa.array([self.worker] * n, pa.string()),
                "attention": pa.array([self.backend] * n, pa.string()),
                "records_in": pa.array([0] * (n - 1) + [records_in], pa.int64()),
                "batch_tokens": pa.array([0] * n, pa.int64()),
                "batch_budget": pa.array([0] * n, pa.int64()),
                "shadow_tokens": pa.nulls(n, pa.list_(pa.int32())),
            },
            schema=self.schema,
        )


def _to_device(array: np.ndarray, dtype: torch.dtype, device: torch.device, pin: bool) -> torch.Tensor:
    """Host array to device; pinned and non-blocking on CUDA so the copy overlaps queued kernels."""
    t = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
    if pin:
        return t.pin_memory().to(device, non_blocking=True)
    return t
