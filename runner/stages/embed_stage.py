"""The embedding stage: a callable class that holds one model on one device and embeds packed batches.

Ray Data builds one instance per actor (`__init__` loads the model once); `__call__` takes an Arrow table
of packed-batch rows (see `runner.input.stream`) and returns an Arrow table with one row per window. It runs
just as well without Ray, which is how the tests drive it.

Failures inside a forward are handled here, per batch:
- CUDA out of memory: the batch is split in halves and retried, and the actor's token cap is lowered to
  half the batch that failed, so later batches are sub-batched from the start (counted: `oom_splits`).
- Any other error: the batch is bisected until the failing window is alone; that window's sequence
  becomes a reject "embedding failed: <Type>: <message>" and the rest is embedded. If every window of a
  multi-window batch fails on its own, the model or device is broken, not the data: the error is raised.
- A CUDA error that leaves the device unusable ends the process, so that Ray restarts the actor with a
  fresh CUDA context and retries its batches (`max_restarts` / `max_task_retries` on the actor pool).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from runner.driver.cache import use_compile_cache
from runner.driver.metrics import ActorMetrics
from runner.errors import RunnerError
from runner.input.batch import PackedBatch
from runner.models.base import EmbeddingModel, resolve_layers
from runner.models.registry import load_model
from runner.output.sink import (
    EmbeddedRows,
    embedding_schema,
    part_record_batch,
    unwritable_reason,
    vector_columns,
)
from runner.output.staged import open_staged_shard, write_staged_part
from runner.output.tokens import (
    TokenFile,
    shard_name,
    stitch_windows,
    token_schema,
    token_table,
    write_token_file,
)
from runner.stages.pooling import pool_layers
from runner.stages.shadow import shadow_sample

log = logging.getLogger(__name__)  # a child of "runner": actor-side, see runner.driver.console

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class StageSettings:
    """What an embedding actor needs to know; built once on the driver from the EmbedConfig."""

    model: str  # model spec (name or path), loaded by the actor itself
    precision: str  # "fp16" | "bf16" | "fp32"
    layers: tuple[int, ...]  # representation layers, as given (an int means one layer)
    poolings: tuple[str, ...]  # runner.stages.pooling.POOLINGS per layer (a str means one pooling)
    device: str  # "cuda" or "cpu"
    cpu_threads: int = 1  # torch threads for a CPU actor
    fp32_layernorm: bool = False  # run LayerNorms in fp32 inside a half-precision model
    fused_gelu: bool = False  # fc1 + tanh GELU as one GEMM in a half-precision GPU model (EmbeddingModel.fused_gelu)
    compile_layers: bool = False  # torch.compile the model's layers (eager fallback on failure)
    compile_cache: bool = True  # keep TorchInductor's caches in runner's cache dir across runs (runner.driver.cache)
    compile_cache_dir: str = ""  # the user's TORCHINDUCTOR_CACHE_DIR on the driver; "" = runner's dir on each node
    # inductor compile workers: 0 = torch's default (about one per core); -1 = a quarter of this node's cores (1 to 8)
    compile_threads: int = 0
    fp32_math: str = "ieee"  # fp32 projections on CUDA: runner.config.SHADOW_MATHS (for the shadow)
    shadow_rate: float = 0.0  # fraction of ids whose tokens are returned for the FP32 shadow
    # --per-token: the dtype of the per-token files this actor writes ("float32" | "float16"); None = pooled only
    per_token: str | None = None
    tokens_dir: str = ""  # DIR/tokens: this actor writes its token files into a folder of its own there
    chunk_overlap: int = 0  # residues shared by neighbouring windows of a chunked sequence (to stitch them)
    # --part-writer actors: DIR/embeddings/.staged; this actor writes the pooled parts of its whole sequences
    # into a folder of its own there, and the driver commits them (runner.output.staged). "": the driver writes.
    staged_dir: str = ""
    part_rows: int = 16384  # most rows in one staged part (--rows-per-part)
    # Its load and compile lines at INFO (an actor's log, in Ray's log files); in-process (runner.driver.in_process)
    # at DEBUG, since the job's first line on the terminal already says what was loaded where.
    announce: bool = True
    # --- test-only fault injection (set from RUNNER_TEST_* environment variables by runner.job) ---
    test_fail_ids: tuple[str, ...] = ()  # a forward containing a window of these ids raises RuntimeError
    test_oom_above_tokens: int = 0  # a forward of more tokens raises torch.cuda.OutOfMemoryError (0 = off)
    test_crash_after_batches: int = 0  # the first actor to claim test_crash_marker os._exit()s after N batches
    test_crash_marker: str = ""  # file created (O_EXCL) by the crashing actor, so only one actor crashes once
    test_batch_delay: float = 0.0  # seconds slept per packed batch (to make runs slow enough to interrupt)
    test_crash_ids: tuple[str, ...] = ()  # the actor os._exit()s on every batch holding one of these ids
    # the first actor to claim test_crash_marker + "-staged" os._exit()s after staging its Nth part, before the
    # batch returns (--part-writer actors: a staged part the driver never hears of; Ray retries the batch)
    test_crash_after_staging: int = 0
    # Benchmark only (RUNNER_BENCH_NO_TOKEN_CRC): per-token files are written without their CRC-32, to measure
    # the checksum's end-to-end cost (scripts/bench.py --outputs per_token_fp16_nocrc); resume then finds them
    # corrupt, so a job run this way cannot be resumed.
    bench_no_token_crc: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.layers, int):
            object.__setattr__(self, "layers", (self.layers,))
        if isinstance(self.poolings, str):
            object.__setattr__(self, "poolings", (self.poolings,))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "poolings", tuple(self.poolings))

    @property
    def columns(self) -> int:
        """Pooled vectors per window: one per layer x pooling (layer-major, as runner.stages.pooling.pool_layers)."""
        return len(self.layers) * len(self.poolings)

    def fp32_twin(self, **settings: Any) -> StageSettings:
        """The FP32 shadow's settings for this stage: the same model, layers and poolings in plain fp32, pooled
        vectors only (the main stage alone writes per-token files and staged parts), no fault injection; `settings`
        are where a shadow differs by where it runs (its device, FP32 maths, compiling)."""
        return replace(self.without_test_hooks(), precision="fp32", shadow_rate=0.0, per_token=None, staged_dir="",
                       fp32_layernorm=False, fused_gelu=False, **settings)

    def without_test_hooks(self) -> StageSettings:
        """The same settings with every fault injection off (for the shadow actors)."""
        return replace(self, test_fail_ids=(), test_oom_above_tokens=0, test_crash_after_batches=0,
                       test_crash_marker="", test_batch_delay=0.0, test_crash_ids=(), test_crash_after_staging=0,
                       bench_no_token_crc=False)


# Errors a forward may raise that are worth isolating to one window: torch reports almost everything
# (shape/kernel/CUDA errors, OOM) as RuntimeError; bad token ids give IndexError, bad values ValueError.
FORWARD_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, IndexError, ArithmeticError)


class EmbedStageBroken(RuntimeError):
    """Every window of a batch failed on its own: the model or device is broken, not a record."""


BATCH_DEATHS_ALLOWED = 3  # retries of one batch after its actor's process died; one more stops the job


class BatchKilledActor(RunnerError):
    """One batch took its actor's process down more than BATCH_DEATHS_ALLOWED times: stop instead of looping.
    A RunnerError, so the driver prints its message (the batch's ids) as the job's one line."""


class DeathRetries:
    """Counts, per batch, the retries that follow its actor's death, so that a batch killing its actor every time
    (a record that corrupts the CUDA context) ends the job instead of restarting actors forever.

    Ray retries an embedding actor's batches without limit (`max_task_retries=-1`, see runner.driver.cluster): a lost
    node's batches are retried while Ray does not yet know the node is gone, each try failing at once as "actor
    unavailable", and Ray's own bounded count (3) ran out within a second of a node loss, long before the node
    was declared dead (tests/test_cluster.py). So the bound is kept here, on deaths only. Only a restarted actor
    can run a retried batch, so only a restarted actor counts, in Ray's GCS key-value store, which outlives the
    actor and its node; the key is deleted once the batch is done. A fresh actor never touches the store.

    The key is the driver's Ray job id and the batch's ordinals and window indices: what the batch is, wherever
    it is retried. The Ray task id, used before, is not the same on every retry of Ray Data's streaming calls:
    a batch that killed its actor every time was counted once per try and the job never ended
    (tests/test_cluster.py). The driver clears its job's keys before a stream starts (clear_counts).
    """

    NAMESPACE = "runner-batch-retries"

    def __init__(self, restarted: bool, store=None) -> None:
        self.restarted = restarted  # this process replaced one that died
        self._store = store  # get/put/delete of bytes by key (tests); None: Ray's internal KV

    def begin(self, table: pa.Table) -> str | None:
        """Before a batch (a packed-batch table): count a retry when it is one; raise BatchKilledActor past the
        bound. The key to `end`."""
        if not self.restarted:
            return None
        import ray

        digest = hashlib.sha256()
        for name in ("ordinals", "chunk_index"):
            if name in table.column_names:
                digest.update(table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False).tobytes())
        key = f"{ray.get_runtime_context().get_job_id()}-{digest.hexdigest()[:32]}"
        get, put, _ = self._kv()
        tries = int(get(key) or 0) + 1
        if tries > BATCH_DEATHS_ALLOWED:
            raise BatchKilledActor(killed_actor_message(_batch_ids(table), tries))
        put(key, str(tries).encode())
        return key

    def end(self, key: str | None) -> None:
        """After a batch succeeded: forget its count."""
        if key is not None:
            self._kv()[2](key)

    @classmethod
    def clear_counts(cls) -> None:
        """On the driver, before a stream starts: forget the counts an earlier stream of this Ray job left (a job
        stopped by a batch that killed its actor leaves that batch's count behind)."""
        import ray
        from ray.experimental import internal_kv

        internal_kv._internal_kv_del(f"{ray.get_runtime_context().get_job_id()}-", del_by_prefix=True,
                                     namespace=cls.NAMESPACE)

    def _kv(self):
        if self._store is not None:
            return self._store
        from ray.experimental import internal_kv

        return (lambda k: internal_kv._internal_kv_get(k, namespace=self.NAMESPACE),
                lambda k, v: internal_kv._internal_kv_put(k, v, namespace=self.NAMESPACE),
                lambda k: internal_kv._internal_kv_del(k, namespace=self.NAMESPACE))


def killed_actor_message(ids: Sequence[str], deaths: int) -> str:
    """The job's one line when the batch holding `ids` took its actor's process down `deaths` times."""
    distinct = list(dict.fromkeys(ids))  # a chunked sequence's windows share its id
    shown = ", ".join(distinct[:20]) + (f" and {len(distinct) - 20} more" if len(distinct) > 20 else "")
    return (f"the batch holding sequence(s) {shown} took its embedding actor's process down {deaths} times "
            "(a crash of the model or device on one of them, not an exception): leave them out of the input (or "
            "embed them alone to find the one) and rerun the same command to resume; the actor's log on its node "
            "says more")


# A per-token file's checksum record (runner.output.tokens.TokenFile) as it travels with the batch's rows.
TOKENS_CHECKSUM = pa.struct([("rows", pa.int32()), ("bytes", pa.int64()), ("crc32", pa.string())])


def output_schema(embed_dim: int, columns: int = 1) -> pa.Schema:
    """Rows the stage returns: embedded windows and, with null embeddings, rejects passed through.

    `embedding` holds a window's `columns` pooled vectors back to back (layer-major, as pool_layers): the
    driver cuts them into the part's named columns."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("ordinal", pa.int64()),
            ("residues", pa.int32()),
            ("truncated", pa.bool_()),
            ("chunk_index", pa.int32()),
            ("chunk_count", pa.int32()),
            ("total_residues", pa.int32()),
            ("embedding", pa.list_(pa.float32(), embed_dim * columns)),
            ("finite", pa.bool_()),
            ("reject_reason", pa.string()),  # non-null: this row is a reject, not an embedding
            ("source", pa.string()),  # input file, set on rejects
            ("worker", pa.string()),  # host:device:pid@node of the actor that embedded the row (worker_name)
            ("attention", pa.string()),  # attention kernel the actor used
            ("records_in", pa.int64()),  # records read that this row accounts for (block summaries)
            ("batch_tokens", pa.int64()),  # tokens of the packed batch (set on its first window)
            ("batch_budget", pa.int64()),  # token budget of that batch (set on its first window)
            ("shadow_tokens", pa.list_(pa.int32())),  # token ids of windows sampled for the shadow, else null
            ("oom_splits", pa.int64()),  # OOM splits since the actor's last output (on the first row)
            ("actor_restarts", pa.int64()),  # 1 on the first output of an actor Ray restarted
            # Seconds in embed_guarded (overlap with a concurrent call counted once: BusyClock), first window.
            ("batch_seconds", pa.float64()),
            ("batch_done", pa.float64()),  # time.time() when the batch's results were on the host (first window)
            ("copy_of", pa.int64()),  # --dedup: this row is a repeat of that ordinal's sequence (no embedding)
            ("dedup_counts", pa.list_(pa.int64())),  # --dedup: a block's counts (runner.input.stream), on its summary row
            # --per-token: the token file holding this window's sequence (relative to DIR/tokens) and its row there
            ("tokens_file", pa.string()),
            ("tokens_row", pa.int32()),
            ("tokens_bytes", pa.int64()),  # size of the batch's token file (first window)
            ("tokens_seconds", pa.float64()),  # seconds spent building and writing it (first window)
            # Its checksum record, on every window pointing at it (whichever block reaches the driver first, the
            # driver journals it with the pooled part that commits those rows: runner.output.sink.PartWriter).
            ("tokens_checksum", TOKENS_CHECKSUM),
            # --part-writer actors (runner.output.staged): on a row without id, one staged part this actor wrote
            # (its path, ordinals, bytes, CRC-32, truncated rows); on a row with an id, the staged part that
            # holds that row, which came back only for the shadow (its vector), not to be written again.
            ("staged_file", pa.string()),
            ("staged_ordinals", pa.list_(pa.int64())),
            ("staged_bytes", pa.int64()),
            ("staged_crc", pa.string()),
            ("staged_truncated", pa.int64()),
        ]
    )


# Columns that describe a whole packed batch: set on one row of the batch's output (the driver sums them).
BATCH_COLUMNS = ("batch_tokens", "batch_budget", "batch_seconds", "batch_done", "tokens_bytes", "tokens_seconds")


def compile_workers(setting: int, cores: int) -> int:
    """Inductor compile workers for StageSettings.compile_threads on a node of `cores` cores."""
    return max(1, min(8, cores // 4)) if setting < 0 else setting


class BusyClock:
    """Busy seconds of one actor, whose calls may overlap (two in flight per GPU actor), credited per batch.

    Each finished batch is credited with the time since the previous credit, or since it started when no other
    batch was in flight. The credits then sum to the time at least one batch was in the forward (the union
    of the batches' intervals): the sum of two overlapping batches' own durations would count the shared GPU
    time twice. With one call at a time a batch's credit is exactly its own duration.
    """

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self._now = now  # a monotonic clock in seconds (a fake one in tests)
        self._lock = threading.Lock()  # Ray runs the concurrent calls of one actor in threads
        self._in_flight = 0
        self._credited_until = 0.0  # time up to which busy time is already credited

    def start(self) -> None:
        with self._lock:
            if self._in_flight == 0:
                self._credited_until = self._now()  # the actor was idle: a new busy stretch begins
            self._in_flight += 1

    def finish(self) -> float:
        """The seconds credited to the batch that just finished."""
        with self._lock:
            now = self._now()
            credit = now - self._credited_until
            self._credited_until = now
            self._in_flight -= 1
            return credit


class CudaStart:
    """The CUDA context of `device`, created on a thread of its own (about a second on an H200 host), so that it
    overlaps reading the checkpoint; `wait` returns the seconds it took and re-raises its error, if any."""

    def __init__(self, device: torch.device) -> None:
        self.seconds = 0.0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, args=(device,), name="cuda-start", daemon=True)
        self._thread.start()

    def _start(self, device: torch.device) -> None:
        started = time.perf_counter()
        try:
            torch.empty(1, device=device)  # creates the context; the allocator's first block
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread by wait()
            self.error = e
        self.seconds = time.perf_counter() - started

    def wait(self) -> float:
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.seconds


def move_weights(model: EmbeddingModel, device: torch.device, dtype: torch.dtype) -> EmbeddingModel:
    """`model.to(device, dtype)`, but on a GPU each tensor crosses in the dtype it was stored in and is cast there.

    torch casts a CPU tensor before copying it (`Tensor.to(cuda, half)` converts on the CPU first), on one thread
    in a Ray actor (OMP_NUM_THREADS=1): ~2.6 s for 650M's 2.6 GB of fp32 on a fast core, against ~0.3 s to copy
    them and nothing to cast on the GPU. Tensor by tensor, so the GPU holds at most one extra tensor in the
    stored dtype. Non-floating tensors keep their dtype, as Module.to does."""
    if device.type != "cuda":
        return model.to(device, dtype)

    def move(t: torch.Tensor) -> torch.Tensor:
        on_device = t.to(device)
        return on_device.to(dtype) if on_device.is_floating_point() else on_device

    return model._apply(move)


class EmbedStage:
    """One model on one device. Ray Data calls it with packed-batch rows; it returns embedded rows."""

    def __init__(self, settings: StageSettings) -> None:
        init_at = time.time()
        begun = time.perf_counter()
        self.settings = settings
        compile_cache = use_compile_cache(settings.compile_cache_dir or None) if settings.compile_layers and settings.compile_cache else None
        cuda_ready: CudaStart | None = None
        if settings.device == "cpu":
            torch.set_num_threads(max(1, settings.cpu_threads))
            self.device = torch.device("cpu")
        else:
            # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU, so it is always device 0 here.
            self.device = torch.device("cuda", 0)
            cuda_ready = CudaStart(self.device)  # the CUDA context comes up while the checkpoint is read
        started = time.perf_counter()
        model = load_model(settings.model)
        loaded = time.perf_counter()
        model.fp32_layernorm = settings.fp32_layernorm
        model.fused_gelu = settings.fused_gelu
        cuda_seconds = cuda_ready.wait() if cuda_ready is not None else 0.0
        self.model = move_weights(model, self.device, DTYPES[settings.precision]).eval()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        moved = time.perf_counter()
        self.model.select_attention(self.device)
        on_cuda = self.device.type == "cuda"
        if on_cuda and settings.precision == "fp32" and settings.fp32_math != "ieee":
            self.model.emulate_fp32(settings.fp32_math)  # may switch the attention to its split kernel too
        self.backend = self.model.attention_backend
        # Where this actor's start-up went (the FP32 shadow's can outlast a short job): see `startup_report`.
        self.startup: dict[str, float | str | None] = {
            "init_at": init_at,  # time.time() __init__ began (after the worker process started and imported us)
            "load_seconds": round(moved - started, 3),
            # within load_seconds: the checkpoint read into a CPU model, then its weights on the device (after the
            # CUDA context, started beside the read and ready after cuda_seconds of its own)
            "checkpoint_seconds": round(loaded - started, 3),
            "cuda_seconds": round(cuda_seconds, 3),
            "to_device_seconds": round(moved - loaded, 3),
            "cache_setup_seconds": round(started - begun, 3),  # before the load: the compile cache's directory
            "compile_seconds": 0.0,
            "compile_cache": str(compile_cache) if compile_cache else None,
        }
        self._startup_reported = False  # sent to the driver with the first embedded batch (`startup` column)
        self.codec = self.model.codec
        self.embed_dim = self.model.info.embed_dim
        self.layers = tuple(resolve_layers(settings.layers, self.model.num_layers, settings.model))
        self.schema = output_schema(self.embed_dim, settings.columns)
        gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        self.worker = worker_name(settings.device, gpu)
        self.metrics = ActorMetrics(settings.model, settings.precision, self.worker)
        self.max_tokens = 0  # tokens per forward after an OOM (0 = no cap): this actor's lowered budget
        self.oom_splits = 0  # total OOM splits of this actor
        self._unreported_ooms = 0  # OOM splits not yet reported to the driver
        self._unreported_restart = int(_was_restarted())
        self.death_retries = DeathRetries(bool(self._unreported_restart))
        self._batches = 0
        self._staged_parts = 0  # staged parts written (--part-writer actors; for the test-only crash hook)
        self.busy = BusyClock()
        # Ray runs two calls of a GPU actor at once (runner.driver.cluster: true multi-threading): this lock lets one
        # forward at a time on the device (a batch's token budget was sized for one forward's memory), so
        # one call's host work (per-token file write, fsync, Arrow output) overlaps the other's forward.
        self._device_lock = threading.Lock()
        self._counters_lock = threading.Lock()  # the counters both calls update (batches, OOMs, startup report)
        self.tokens_dir: Path | None = None
        self.staged_dir: Path | None = None
        if settings.staged_dir:
            self.part_columns = vector_columns(self.layers, settings.poolings)
            self.part_schema = embedding_schema(self.embed_dim, self.part_columns, per_token=bool(settings.per_token))
            self.staged_dir = self._open_staged(Path(settings.staged_dir) / shard_name(self.worker))
        if settings.per_token:
            self.token_schema = token_schema(self.layers, self.embed_dim, settings.per_token)
            self.token_shard = shard_name(self.worker)
            self.tokens_dir = open_token_shard(Path(settings.tokens_dir) / self.token_shard)
        if settings.compile_layers and settings.compile_threads:
            import torch._inductor.config as inductor_config  # this actor's process only

            inductor_config.compile_threads = compile_workers(settings.compile_threads, os.cpu_count() or 1)
        compile_setup = time.perf_counter()
        # the rest of __init__ after the load: attention choice, metrics, output folders (the phase's remainder)
        self.startup["setup_seconds"] = round(compile_setup - moved, 3)
        compiling = self.model.use_compile(settings.compile_layers)  # wraps the layers: imports torch's compiler
        self.startup["compile_setup_seconds"] = round(time.perf_counter() - compile_setup, 3)
        if compiling:
            self._warm_up()
        self.startup["ready_at"] = time.time()
        if self._unreported_restart:
            log.warning("embed actor %s: restarted by Ray; its unfinished batches are retried", self.worker)
        log.log(
            logging.INFO if settings.announce else logging.DEBUG,
            "embed actor %s: %s on %s in %s, attention %s%s (loaded in %.1fs)",
            self.worker,
            settings.model,
            self.device,
            settings.precision,
            self.backend,
            ", layers compiled" if self.model.compiling else "",
            time.perf_counter() - started,
        )

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile on a tiny batch now: before the first real batch, and before two calls can race to it."""
        started = time.perf_counter()
        tokens = torch.zeros(24, dtype=torch.int64, device=self.device)  # [T]: id 0 exists in every vocabulary
        positions = torch.arange(12, device=self.device).repeat(2)  # [T]
        cu_seqlens = torch.tensor([0, 12, 24], dtype=torch.int32, device=self.device)  # [B+1]
        self.model.forward_layers(tokens, positions, cu_seqlens, 12, self.layers)
        self.startup["compile_seconds"] = round(time.perf_counter() - started, 3)
        log.log(logging.INFO if self.settings.announce else logging.DEBUG,
                "embed actor %s: layers compiled in %.1fs%s", self.worker, self.startup["compile_seconds"],
                 "" if self.model.compiling else " (failed: eager)")

    def startup_report(self) -> dict[str, float | str]:
        """Seconds this actor's start-up took, loading (checkpoint, device, weight splits) and compiling, and the
        kernels it then runs (`kernels`): the shadow's manifest says which FP32 attention checked the job."""
        return {**self.startup, "kernels": self.kernels}

    @property
    def kernels(self) -> str:
        """What the forward runs, for the manifest: the attention backend, "+compile" while compiled,
        "+fused_gelu" while fc1 and a tanh GELU run as one GEMM."""
        return (self.backend + ("+compile" if self.model.compiling else "")
                + ("+fused_gelu" if self.model.fused_gelu_in_use else ""))

    def __call__(self, table: pa.Table) -> pa.Table:
        retry = self.death_retries.begin(table)
        pieces = [self._embed_row(row) for row in _rows(table)]
        self.death_retries.end(retry)
        out = pa.concat_tables(pieces) if pieces else self.schema.empty_table()
        with self._counters_lock:  # taken and reset at once: the other call may be counting an OOM split
            ooms, restarts = (self._unreported_ooms, self._unreported_restart) if out.num_rows else (0, 0)
            if ooms or restarts:
                self._unreported_ooms = self._unreported_restart = 0
        if ooms or restarts:
            # Counters ride on the first row: the driver sums the columns, so each event counts once.
            for name, value in (("oom_splits", ooms), ("actor_restarts", restarts)):
                column = np.zeros(out.num_rows, dtype=np.int64)
                column[0] = value
                out = out.set_column(out.schema.get_field_index(name), name, pa.array(column))
        return self._with_startup(out)

    def _with_startup(self, out: pa.Table) -> pa.Table:
        """`out` plus a `startup` column: this actor's startup_report (JSON) on the first row of its first
        output holding an embedded batch, null elsewhere (runner.driver.startup puts it in the manifest)."""
        report = [None] * out.num_rows
        with self._counters_lock:  # exactly one output carries it, whichever of two concurrent calls ends first
            if out.num_rows and not self._startup_reported and self.startup.get("first_batch_done_at"):
                report[0] = json.dumps({**self.startup_report(), "worker": self.worker})
                self._startup_reported = True
        return out.append_column("startup", pa.array(report, pa.string()))

    @torch.inference_mode()
    def embed(self, batch: PackedBatch) -> tuple[np.ndarray, np.ndarray]:
        """Pooled float32 embeddings [B, C*D] (C = layers x poolings) and a finite flag per window, with one
        device sync."""
        vectors, finite, _ = self.embed_outputs(batch, per_token=False)
        return vectors, finite

    @torch.inference_mode()
    def embed_outputs(self, batch: PackedBatch, per_token: bool) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
        """Pooled float32 embeddings [B, C*D], a finite flag per window and, with `per_token`, each layer's
        vectors of the residue tokens (specials excluded) of all windows back to back ([R, D] in the per-token
        dtype; a window's residue vectors count toward its finite flag). One device sync for all of it."""
        device = self.device
        pin = device.type == "cuda"
        tokens = _to_device(batch.tokens, torch.int64, device, pin)  # [T]
        positions = _to_device(batch.positions, torch.int64, device, pin)  # [T]
        cu_seqlens = _to_device(batch.cu_seqlens, torch.int32, device, pin)  # [B+1]
        hiddens = self.model.forward_layers(tokens, positions, cu_seqlens, batch.max_seqlen, self.layers)  # [T, D] each
        codec = self.codec
        num_windows, width = len(batch.ids), self.settings.columns * self.embed_dim
        # One buffer holds every pooled vector and then the finite flags, so ONE copy brings all of it to the host:
        # the vectors [B, C*D] contiguous (they become the Arrow column as they are), the flags [B] after them.
        out = torch.empty(num_windows * (width + 1), dtype=torch.float32, device=device)  # [B*C*D + B]
        pooled = out[: num_windows * width].view(num_windows, self.settings.columns, self.embed_dim)  # [B, C, D]
        pool_layers(hiddens, cu_seqlens, self.settings.poolings, codec.special_start, codec.special_end, out=pooled)
        finite = torch.isfinite(pooled.view(num_windows, width)).all(dim=1)  # [B]
        host_tokens = None
        if per_token:
            counts = residue_counts(batch.cu_seqlens, codec.special_start, codec.special_end)  # [B]
            index = _to_device(residue_index(batch.cu_seqlens, codec.special_start, codec.special_end), torch.int64,
                               device, pin)  # [R]
            dtype = TOKEN_DTYPES[self.settings.per_token or "float32"]
            residues = torch.stack([h.index_select(0, index) for h in hiddens]).to(dtype)  # [L, R, D]
            bad = (~torch.isfinite(residues)).any(dim=2).any(dim=0)  # [R]: what is stored, checked after the cast
            window = _to_device(np.repeat(np.arange(len(counts)), counts), torch.int64, device, pin)  # [R]
            bad_count = torch.zeros(len(counts), device=device).index_add_(0, window, bad.float())  # [B]
            finite &= bad_count == 0
            host_tokens = torch.empty(residues.shape, dtype=dtype, pin_memory=pin)
            host_tokens.copy_(residues, non_blocking=pin)
        out[num_windows * width :].copy_(finite)  # [B] as 0.0 / 1.0
        # Into page-locked memory without blocking (a pageable copy is slower and blocks at once); the one sync
        # below covers it and the per-token copy queued before it on the same stream.
        host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True) if pin else out
        if pin:
            host.copy_(out, non_blocking=True)
            torch.cuda.current_stream(device).synchronize()
        both = host.numpy()  # [B*C*D + B]; on the CPU, the pooled buffer itself
        arrays = None if host_tokens is None else list(host_tokens.numpy())  # per layer [R, D]
        return both[: num_windows * width].reshape(num_windows, width), both[num_windows * width :] != 0, arrays

    def embed_guarded(
        self, batch: PackedBatch, pieces: list[TokenPiece] | None = None
    ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """Like `embed`, but surviving OOM (split, lower the cap) and failing windows (bisect, isolate).

        Returns vectors [B, C*D], finite [B] and, per window, None or the reason it could not be embedded.
        With `pieces` (a list to fill), the per-token vectors of every window range embedded are appended to it.
        """
        n = len(batch.ids)
        done: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # (start, end, vectors, finite) per range embedded
        errors: list[str | None] = [None] * n
        for start, end in self._sub_batches(batch):
            self._embed_range(batch, start, end, done, errors, pieces)
        if len(done) == 1 and done[0][:2] == (0, n):
            _, _, vectors, finite = done[0]  # the common case, one forward: its host buffer as it came back
        else:
            vectors = np.zeros((n, self.embed_dim * self.settings.columns), dtype=np.float32)
            finite = np.ones(n, dtype=bool)
            for start, end, v, f in done:
                vectors[start:end], finite[start:end] = v, f
        failed = sum(e is not None for e in errors)
        if n > 1 and failed == n and not all(e.startswith("embedding failed: OutOfMemoryError") for e in errors if e):
            raise EmbedStageBroken(
                f"every one of the {n} windows of a batch failed on its own ({errors[0]}): the model or device "
                "is broken, not the input"
            )
        return vectors, finite, errors

    def _sub_batches(self, batch: PackedBatch) -> list[tuple[int, int]]:
        """Window ranges of at most `max_tokens` tokens each (the whole batch while there is no cap)."""
        n = len(batch.ids)
        if not self.max_tokens or batch.num_tokens <= self.max_tokens:
            return [(0, n)]
        ranges, start = [], 0
        cu = batch.cu_seqlens
        for end in range(1, n + 1):
            if end == n or cu[end + 1] - cu[start] > self.max_tokens:
                ranges.append((start, end))
                start = end
        return ranges

    def _embed_range(self, batch: PackedBatch, start: int, end: int, done: list[tuple[int, int, np.ndarray, np.ndarray]],
                     errors: list[str | None], pieces: list[TokenPiece] | None = None) -> None:
        """Embed windows [start, end), appending (start, end, vectors, finite) of each range embedded to `done`,
        splitting on failure (depth <= log2 B)."""
        sub = batch if (start, end) == (0, len(batch.ids)) else select_windows(batch, start, end)
        try:
            v, f, tok = self._forward(sub, pieces is not None)
        except torch.cuda.OutOfMemoryError as e:
            _release_cuda_cache()
            if end - start == 1:
                errors[start] = failure_reason(e)
                log.warning("embed actor %s: %s alone does not fit in memory: rejected", self.worker, batch.ids[start])
                return
            with self._counters_lock:
                self.oom_splits += 1
                self._unreported_ooms += 1
            cap = max(1, sub.num_tokens // 2)
            self.max_tokens = min(self.max_tokens, cap) if self.max_tokens else cap
            log.warning("embed actor %s: out of memory on %d tokens: splitting; at most %d tokens per forward "
                        "from now on", self.worker, sub.num_tokens, self.max_tokens)
            self._split(batch, start, end, done, errors, pieces)
            return
        except FORWARD_ERRORS as e:
            if not self._device_usable():
                log.error("embed actor %s: %s left the GPU unusable: exiting so Ray restarts this actor and "
                          "retries its batches", self.worker, failure_reason(e))
                os._exit(70)  # only a new process gets a fresh CUDA context
            if end - start == 1:
                errors[start] = failure_reason(e)
                log.warning("embed actor %s: %s: %s", self.worker, batch.ids[start], errors[start])
                return
            self._split(batch, start, end, done, errors, pieces)
            return
        done.append((start, end, v, f))
        if pieces is not None and tok is not None:
            pieces.append(TokenPiece(start, end, tok))

    def _split(self, batch: PackedBatch, start: int, end: int, done: list[tuple[int, int, np.ndarray, np.ndarray]],
               errors: list[str | None], pieces: list[TokenPiece] | None = None) -> None:
        mid = (start + end) // 2
        self._embed_range(batch, start, mid, done, errors, pieces)
        self._embed_range(batch, mid, end, done, errors, pieces)

    def _forward(self, batch: PackedBatch, per_token: bool = False) -> tuple[np.ndarray, np.ndarray, list | None]:
        """`embed_outputs`, behind the test-only fault injection of the settings."""
        s = self.settings
        if s.test_oom_above_tokens and batch.num_tokens > s.test_oom_above_tokens:
            raise torch.cuda.OutOfMemoryError(
                f"test hook: {batch.num_tokens} tokens > RUNNER_TEST_OOM_ABOVE_TOKENS={s.test_oom_above_tokens}"
            )
        if s.test_fail_ids:
            bad = sorted(set(batch.ids) & set(s.test_fail_ids))
            if bad:
                raise RuntimeError(f"test hook: injected failure for {', '.join(bad)}")
        return self.embed_outputs(batch, per_token)

    def _device_usable(self) -> bool:
        """After an error: can this device still run a kernel? (A device-side assert poisons the context.)"""
        if self.device.type != "cuda":
            return True
        try:
            torch.cuda.synchronize(self.device)
            return int(torch.ones(1, device=self.device).sum().item()) == 1
        except RuntimeError:
            return False

    def _maybe_crash(self) -> None:
        """Test-only: the first actor to create the marker file dies after N batches, like a killed process."""
        s = self.settings
        if not s.test_crash_after_batches or self._batches < s.test_crash_after_batches or not s.test_crash_marker:
            return
        try:
            fd = os.open(s.test_crash_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        log.warning("embed actor %s: test hook RUNNER_TEST_CRASH_AFTER_BATCHES: exiting now", self.worker)
        os._exit(1)

    def _maybe_crash_after_staging(self, parts: int) -> None:
        """Test-only: the first actor to create the marker dies once it has staged N parts, before returning."""
        s = self.settings
        if not s.test_crash_after_staging or not s.test_crash_marker:
            return
        with self._counters_lock:
            self._staged_parts += parts
            if self._staged_parts < s.test_crash_after_staging:
                return
        try:
            fd = os.open(s.test_crash_marker + "-staged", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        log.warning("embed actor %s: test hook RUNNER_TEST_CRASH_AFTER_STAGING: exiting now", self.worker)
        os._exit(1)

    def _embed_row(self, row: dict) -> pa.Table:
        records_in = int(row.get("records_in") or 0)
        if not row["ids"]:
            return self._rejects_table(row, records_in)
        batch = PackedBatch.from_row(row)
        with self._counters_lock:
            self._batches += 1
        self._maybe_crash()
        if set(batch.ids) & set(self.settings.test_crash_ids):
            log.warning("embed actor %s: test hook RUNNER_TEST_CRASH_IDS: exiting now", self.worker)
            os._exit(1)
        if self.settings.test_batch_delay:
            time.sleep(self.settings.test_batch_delay)
        started = time.perf_counter()
        pieces: list[TokenPiece] | None = [] if self.tokens_dir is not None else None
        # One forward at a time on the device; everything after it (the per-token write, the output table)
        # runs outside the lock, overlapping the other call's forward.
        with self._device_lock:
            self.busy.start()
            try:
                vectors, finite, errors = self.embed_guarded(batch, pieces)
            finally:
                busy_seconds = self.busy.finish()
        done = time.time()  # wall clock, not perf_counter: the driver compares it across an actor's batches
        with self._counters_lock:
            self.startup.setdefault("first_batch_done_at", done)
        n = len(batch.ids)
        tokens_file: list[str | None] = [None] * n
        tokens_row = np.full(n, -1, dtype=np.int32)
        tokens_bytes = np.zeros(n, dtype=np.int64)
        tokens_seconds = np.zeros(n, dtype=np.float64)
        tokens_checksum: list[dict | None] = [None] * n
        if pieces is not None:
            # Written (temp name, fsync, rename) before this batch's rows leave: a row the driver gets always
            # points at a complete file.
            write_started = time.perf_counter()
            name, rows, written = self._write_tokens(batch, finite, errors, pieces)
            if name is not None and written is not None:
                tokens_file = [name if r >= 0 else None for r in rows]
                tokens_row = rows
                tokens_bytes[0] = written.bytes
                record = {"rows": written.rows, "bytes": written.bytes, "crc32": written.crc32}
                tokens_checksum = [record if r >= 0 else None for r in rows]
            tokens_seconds[0] = time.perf_counter() - write_started
        self.metrics.batch(n, batch.num_tokens, batch.token_budget, time.perf_counter() - started,
                           int((~finite).sum()), busy_seconds)
        shadow_tokens: list[np.ndarray | None] = [None] * n
        if self.settings.shadow_rate > 0:
            # Chunked windows are not sampled: their stored vector is a merge of several windows.
            ok = np.array([e is None for e in errors], dtype=bool)
            sampled = shadow_sample(batch.ids, self.settings.shadow_rate) & (batch.chunk_count <= 1) & ok
            for i in np.flatnonzero(sampled):
                shadow_tokens[i] = batch.tokens[batch.cu_seqlens[i] : batch.cu_seqlens[i + 1]]
        if not finite.all():
            vectors[~finite] = 0  # never ship NaN/Inf onwards (in place: the buffer is this batch's own)
        # A window that could not be embedded leaves as a reject row (its sequence is rejected whole).
        sources = list(row.get("sources") or [""] * n)
        reasons = pa.array(errors, pa.string())
        failed_sources = pa.array([src if e is not None else None for src, e in zip(sources, errors, strict=True)],
                                  pa.string())
        batch_tokens = np.zeros(n, dtype=np.int64)
        batch_budget = np.zeros(n, dtype=np.int64)
        batch_seconds = np.zeros(n, dtype=np.float64)
        batch_done = np.zeros(n, dtype=np.float64)
        batch_tokens[0], batch_budget[0] = batch.num_tokens, batch.token_budget
        batch_seconds[0], batch_done[0] = busy_seconds, done
        staged: list[tuple[str, int, str, np.ndarray, int]] = []
        stage = np.zeros(n, dtype=bool)
        if self.staged_dir is not None:
            # Whole sequences that embedded cleanly go to this actor's staged parts; chunked windows (merged on
            # the driver), failed and non-finite ones (rejects, the abort) come back as rows, as without it.
            stage = finite & (batch.chunk_count <= 1) & np.array([e is None for e in errors], dtype=bool)
            staged = self._write_staged(batch, vectors, stage, tokens_file, tokens_row)
            self._maybe_crash_after_staging(len(staged))
        flat = pa.array(vectors.reshape(-1), type=pa.float32())  # float32 and contiguous already: no copy
        table = pa.table(
            {
                "id": pa.array(batch.ids, pa.string()),
                "ordinal": pa.array(batch.ordinals, pa.int64()),
                "residues": pa.array(batch.residues, pa.int32()),
                "truncated": pa.array(batch.truncated, pa.bool_()),
                "chunk_index": pa.array(batch.chunk_index, pa.int32()),
                "chunk_count": pa.array(batch.chunk_count, pa.int32()),
                "total_residues": pa.array(batch.total_residues, pa.int32()),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, self.embed_dim * self.settings.columns),
                "finite": pa.array(finite, pa.bool_()),
                "reject_reason": reasons,
                "source": failed_sources,
                "worker": pa.array([self.worker] * n, pa.string()),
                "attention": pa.array([self.kernels] * n, pa.string()),
                "records_in": pa.array(np.zeros(n, dtype=np.int64)),
                "batch_tokens": pa.array(batch_tokens),
                "batch_budget": pa.array(batch_budget),
                "shadow_tokens": pa.array(shadow_tokens, pa.list_(pa.int32())),
                "oom_splits": pa.array(np.zeros(n, dtype=np.int64)),
                "actor_restarts": pa.array(np.zeros(n, dtype=np.int64)),
                "batch_seconds": pa.array(batch_seconds),
                "batch_done": pa.array(batch_done),
                "copy_of": pa.nulls(n, pa.int64()),
                "dedup_counts": pa.nulls(n, pa.list_(pa.int64())),
                "tokens_file": pa.array(tokens_file, pa.string()),
                "tokens_row": pa.array(np.where(tokens_row >= 0, tokens_row, 0), pa.int32(), mask=tokens_row < 0),
                "tokens_bytes": pa.array(tokens_bytes),
                "tokens_seconds": pa.array(tokens_seconds),
                "tokens_checksum": pa.array(tokens_checksum, TOKENS_CHECKSUM),
                **_no_staged(n),
            },
            schema=self.schema,
        )
        if staged:
            table = self._staged_output(table, stage, np.array([t is not None for t in shadow_tokens], bool), staged)
        if records_in:
            table = pa.concat_tables([table, self._rejects_table(row, records_in)])
        return table

    def _rejects_table(self, row: dict, records_in: int) -> pa.Table:
        """Rejects and --dedup repeats of a block pass through; an extra empty-id row carries the block's record
        count (and dedup counts)."""
        rejects = list(row.get("reject_ids") or [])
        copies = list(row.get("copy_ids") or [])
        ids = rejects + copies
        n = len(ids) + 1
        return pa.table(
            {
                "id": pa.array([*ids, None], pa.string()),
                "ordinal": pa.array([*(row.get("reject_ordinals") or []), *(row.get("copy_ordinals") or []), -1],
                                    pa.int64()),
                "residues": pa.array([0] * n, pa.int32()),
                "truncated": pa.array([False] * n, pa.bool_()),
                "chunk_index": pa.array([0] * n, pa.int32()),
                "chunk_count": pa.array([1] * n, pa.int32()),
                "total_residues": pa.array([0] * n, pa.int32()),
                "embedding": pa.nulls(n, pa.list_(pa.float32(), self.embed_dim * self.settings.columns)),
                "finite": pa.array([True] * n, pa.bool_()),
                "reject_reason": pa.array([*(row.get("reject_reasons") or []), *[None] * len(copies), None],
                                          pa.string()),
                "source": pa.array([*(row.get("reject_sources") or []), *(row.get("copy_sources") or []), None],
                                   pa.string()),
                "worker": pa.array([self.worker] * n, pa.string()),
                "attention": pa.array([self.kernels] * n, pa.string()),
                "records_in": pa.array([0] * (n - 1) + [records_in], pa.int64()),
                "batch_tokens": pa.array([0] * n, pa.int64()),
                "batch_budget": pa.array([0] * n, pa.int64()),
                "shadow_tokens": pa.nulls(n, pa.list_(pa.int32())),
                "oom_splits": pa.array([0] * n, pa.int64()),
                "actor_restarts": pa.array([0] * n, pa.int64()),
                "batch_seconds": pa.array([0.0] * n, pa.float64()),
                "batch_done": pa.array([0.0] * n, pa.float64()),
                "copy_of": pa.array([*[None] * len(rejects), *(row.get("copy_of") or []), None], pa.int64()),
                "dedup_counts": pa.array([*[None] * (n - 1), row.get("dedup_counts")], pa.list_(pa.int64())),
                "tokens_file": pa.nulls(n, pa.string()),
                "tokens_row": pa.nulls(n, pa.int32()),
                "tokens_bytes": pa.array([0] * n, pa.int64()),
                "tokens_seconds": pa.array([0.0] * n, pa.float64()),
                "tokens_checksum": pa.nulls(n, TOKENS_CHECKSUM),
                **_no_staged(n),
            },
            schema=self.schema,
        )

    def _open_staged(self, directory: Path) -> Path:
        try:
            return open_staged_shard(directory)
        except OSError as e:
            raise RunnerError(
                f"embedding actor on {socket.gethostname()} cannot write its pooled parts to {directory} "
                f"({e.strerror or e}): --part-writer actors needs --out on a filesystem every node can write "
                "(a shared one); or use --part-writer driver"
            ) from None

    def _write_staged(self, batch: PackedBatch, vectors: np.ndarray, stage: np.ndarray,
                      tokens_file: list[str | None], tokens_row: np.ndarray) -> list[tuple[str, int, str, np.ndarray, int]]:
        """Write the rows of windows `stage` as staged parts of at most part_rows rows each (temp name, fsync,
        rename: complete before this batch's output leaves). Returns per part (path, bytes, CRC-32, ordinals,
        truncated rows)."""
        assert self.staged_dir is not None  # only called with --part-writer actors
        index = np.flatnonzero(stage)
        written = []
        for start in range(0, len(index), max(1, self.settings.part_rows)):
            sel = index[start : start + max(1, self.settings.part_rows)]
            rows = EmbeddedRows(
                ids=[batch.ids[i] for i in sel], lengths=batch.residues[sel].astype(np.int32),
                truncated=batch.truncated[sel].astype(bool), vectors=vectors[sel],
                ordinals=batch.ordinals[sel].astype(np.int64),
                tokens_file=[tokens_file[i] for i in sel] if self.settings.per_token else None,
                tokens_row=tokens_row[sel] if self.settings.per_token else None,
            )
            record = part_record_batch(rows, 0, len(sel), self.part_schema, len(self.part_columns), self.embed_dim,
                                       per_token=bool(self.settings.per_token))
            try:
                path, size, crc = write_staged_part(self.staged_dir, pa.Table.from_batches([record]))
            except OSError as e:
                raise RunnerError(
                    f"embedding actor {self.worker} cannot write a pooled part in {self.staged_dir} "
                    f"({e.strerror or e}): free disk space or make --out writable from every node, then rerun to resume"
                ) from None
            written.append((path, size, crc, rows.ordinals, int(rows.truncated.sum())))
        return written

    def _staged_output(self, table: pa.Table, stage: np.ndarray, sampled: np.ndarray,
                       staged: list[tuple[str, int, str, np.ndarray, int]]) -> pa.Table:
        """The batch's output once its whole sequences are in staged parts: one record row per staged part (which
        also carries the batch's own figures), then the windows not staged, then the staged windows the shadow
        sampled (their vectors, marked with their staged part so the driver does not write them again)."""
        first = {name: table.column(name)[0].as_py() for name in BATCH_COLUMNS}
        keep = ~stage | sampled
        rest = table.filter(pa.array(keep))
        for name in BATCH_COLUMNS:
            rest = rest.set_column(rest.schema.get_field_index(name), name, pa.array(np.zeros(rest.num_rows),
                                                                                      self.schema.field(name).type))
        if (stage & sampled).any():
            # every staged part of a batch holds consecutive staged windows: map each staged window to its file
            owner = np.repeat(np.arange(len(staged)), [len(o) for _, _, _, o, _ in staged])
            file_of = np.full(len(stage), -1, dtype=np.int64)
            file_of[np.flatnonzero(stage)] = owner
            marks = [staged[f][0] if f >= 0 else None for f in file_of[keep].tolist()]
            rest = rest.set_column(rest.schema.get_field_index("staged_file"), "staged_file", pa.array(marks, pa.string()))
        k = len(staged)
        columns = {name: pa.array([first[name]] + [0] * (k - 1), self.schema.field(name).type) for name in BATCH_COLUMNS}
        # --per-token: the staged rows point at the batch's token file; its checksum record rides on each record
        # row, so the driver journals it with the commit (runner.driver.collect.note_token_files)
        at = int(np.flatnonzero(stage)[0])
        token_file, token_checksum = table.column("tokens_file")[at].as_py(), table.column("tokens_checksum")[at].as_py()
        records = pa.table(
            {
                "id": pa.nulls(k, pa.string()),
                "ordinal": pa.array([-1] * k, pa.int64()),
                "residues": pa.array([0] * k, pa.int32()),
                "truncated": pa.array([False] * k, pa.bool_()),
                "chunk_index": pa.array([0] * k, pa.int32()),
                "chunk_count": pa.array([1] * k, pa.int32()),
                "total_residues": pa.array([0] * k, pa.int32()),
                "embedding": pa.nulls(k, self.schema.field("embedding").type),
                "finite": pa.array([True] * k, pa.bool_()),
                "reject_reason": pa.nulls(k, pa.string()),
                "source": pa.nulls(k, pa.string()),
                "worker": pa.array([self.worker] * k, pa.string()),
                "attention": pa.array([self.kernels] * k, pa.string()),
                "records_in": pa.array([0] * k, pa.int64()),
                "shadow_tokens": pa.nulls(k, pa.list_(pa.int32())),
                "oom_splits": pa.array([0] * k, pa.int64()),
                "actor_restarts": pa.array([0] * k, pa.int64()),
                "copy_of": pa.nulls(k, pa.int64()),
                "dedup_counts": pa.nulls(k, pa.list_(pa.int64())),
                "tokens_file": pa.array([token_file] * k, pa.string()),
                "tokens_row": pa.nulls(k, pa.int32()),
                "tokens_checksum": pa.array([token_checksum] * k, self.schema.field("tokens_checksum").type),
                **columns,
                "staged_file": pa.array([path for path, _, _, _, _ in staged], pa.string()),
                "staged_ordinals": pa.array([o for _, _, _, o, _ in staged], pa.list_(pa.int64())),
                "staged_bytes": pa.array([size for _, size, _, _, _ in staged], pa.int64()),
                "staged_crc": pa.array([crc for _, _, crc, _, _ in staged], pa.string()),
                "staged_truncated": pa.array([t for _, _, _, _, t in staged], pa.int64()),
            }
        ).select(self.schema.names).cast(self.schema)
        return pa.concat_tables([records, rest])

    def _write_tokens(self, batch: PackedBatch, finite: np.ndarray, errors: list[str | None],
                      pieces: list[TokenPiece]) -> tuple[str | None, np.ndarray, TokenFile | None]:
        """Write this batch's per-token file: one row per sequence that embedded cleanly (every window finite and
        without error), chunked sequences stitched. Returns (its name relative to DIR/tokens, or None when no
        sequence qualified; the row of each window's sequence, -1 for none; the file's size and checksum)."""
        assert self.tokens_dir is not None  # only called with --per-token
        n = len(batch.ids)
        counts = residue_counts(batch.cu_seqlens, self.codec.special_start, self.codec.special_end)  # [B]
        per_window: list[list[np.ndarray] | None] = [None] * n  # per window: per layer [r, D] views
        for piece in pieces:
            offsets = np.concatenate([[0], np.cumsum(counts[piece.start : piece.end])])
            for k, w in enumerate(range(piece.start, piece.end)):
                per_window[w] = [a[offsets[k] : offsets[k + 1]] for a in piece.arrays]
        rows = np.full(n, -1, dtype=np.int32)
        sequences = group_windows(batch)  # [window indices of one sequence, in chunk order]
        ids: list[str] = []
        ordinals: list[int] = []
        lengths: list[int] = []
        arrays: list[list[np.ndarray]] = [[] for _ in self.layers]
        for windows in sequences:
            if any(errors[w] is not None or not finite[w] or per_window[w] is None for w in windows):
                continue  # a reject, or a non-finite sequence the driver aborts on: nothing stored
            first = windows[0]
            if len(windows) == 1:
                layers = per_window[first]
            else:
                layers = [
                    stitch_windows([per_window[w][li] for w in windows], int(batch.total_residues[first]),
                                   int(batch.residues[first]), self.settings.chunk_overlap)
                    for li in range(len(self.layers))
                ]
            assert layers is not None
            rows[windows] = len(ids)
            ids.append(batch.ids[first])
            ordinals.append(int(batch.ordinals[first]))
            lengths.append(layers[0].shape[0])
            for li, a in enumerate(layers):
                arrays[li].append(a)
        if not ids:
            return None, rows, None
        if len(pieces) == 1 and len(ids) == n and pieces[0].start == 0 and (batch.chunk_count <= 1).all():
            # The common case: every window is a whole sequence, embedded in one forward and kept. The vectors
            # are already back to back in sequence order: write them without another copy.
            joined = pieces[0].arrays
        else:
            joined = [np.concatenate(a) for a in arrays]
        table = token_table(ids, np.array(ordinals, np.int64), joined, np.array(lengths, np.int32), self.token_schema)
        try:
            written = write_token_file(self.tokens_dir, table, summed=not self.settings.bench_no_token_crc)
        except OSError as e:
            raise RunnerError(
                f"embedding actor {self.worker} cannot write per-token file in {self.tokens_dir} "
                f"({e.strerror or e}): free disk space or make --out writable from every node, then rerun to resume"
            ) from None
        return f"{self.token_shard}/{written.name}", rows, written


def _no_staged(n: int) -> dict[str, pa.Array]:
    """The staged-part columns of `n` rows that are not staged-part records."""
    return {"staged_file": pa.nulls(n, pa.string()), "staged_ordinals": pa.nulls(n, pa.list_(pa.int64())),
            "staged_bytes": pa.nulls(n, pa.int64()), "staged_crc": pa.nulls(n, pa.string()),
            "staged_truncated": pa.nulls(n, pa.int64())}


def pooled_forward(
    model: EmbeddingModel,
    batch: PackedBatch,
    device: torch.device,
    layers: Sequence[int] | int,
    poolings: Sequence[str] | str,
) -> torch.Tensor:
    """One packed batch through the model and pooled, left on the device, no sync: float32 [B, C, D] with
    C = len(layers) * len(poolings) (layer-major); [B, D] when `layers` and `poolings` are single values.

    The one forward path of `runner embed` (EmbedStage) and `runner validate`.
    """
    single = isinstance(layers, int) and isinstance(poolings, str)
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    pooling_list = [poolings] if isinstance(poolings, str) else list(poolings)
    pin = device.type == "cuda"
    tokens = _to_device(batch.tokens, torch.int64, device, pin)  # [T]
    positions = _to_device(batch.positions, torch.int64, device, pin)  # [T]
    cu_seqlens = _to_device(batch.cu_seqlens, torch.int32, device, pin)  # [B+1]
    hiddens = model.forward_layers(tokens, positions, cu_seqlens, batch.max_seqlen, layer_list)  # [T, D] each
    codec = model.codec
    pooled = pool_layers(hiddens, cu_seqlens, pooling_list, codec.special_start, codec.special_end)  # [B, C, D]
    return pooled[:, 0] if single else pooled


TOKEN_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass
class TokenPiece:
    """Per-token vectors of windows [start, end) of a batch, from one forward (runner.stages.embed_stage, --per-token)."""

    start: int
    end: int
    arrays: list[np.ndarray]  # per layer [R, D]: the residue-token vectors of those windows back to back


def residue_counts(cu_seqlens: np.ndarray, special_start: int, special_end: int) -> np.ndarray:
    """int64 [B]: tokens of each window between its specials (residues for ESM-2, BPE tokens for DNABERT)."""
    return np.maximum(np.diff(np.asarray(cu_seqlens, dtype=np.int64)) - special_start - special_end, 0)


def residue_index(cu_seqlens: np.ndarray, special_start: int, special_end: int) -> np.ndarray:
    """int64 [R]: positions in the packed token stream of every window's residue tokens, in order."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    counts = residue_counts(cu, special_start, special_end)  # [B]
    firsts = np.repeat(cu[:-1] + special_start, counts)  # [R] the window's first residue token
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)  # [R]
    return firsts + within


def group_windows(batch: PackedBatch) -> list[list[int]]:
    """Window indices per sequence, in batch order; a chunked sequence's windows in chunk order."""
    groups: dict[int, list[int]] = {}
    for w in range(len(batch.ids)):
        groups.setdefault(int(batch.ordinals[w]), []).append(w)
    out = []
    for windows in groups.values():
        windows.sort(key=lambda w: int(batch.chunk_index[w]))
        count = int(batch.chunk_count[windows[0]])
        if len(windows) != count:
            raise RuntimeError(
                f"internal error: {len(windows)} of the {count} windows of {batch.ids[windows[0]]} are in this batch; "
                "with --per-token a chunked sequence's windows are packed together"
            )
        out.append(windows)
    return out


def open_token_shard(directory: Path) -> Path:
    """Create this actor's token folder and prove it writable from this node, or raise one clear RunnerError."""
    reason = unwritable_reason(directory, f".write-test-{os.getpid()}")
    if reason is not None:
        raise RunnerError(
            f"embedding actor on {socket.gethostname()} cannot write per-token files to {directory} "
            f"({reason}): --per-token needs --out on a filesystem every node can write (a shared one)"
        )
    return directory


def select_windows(batch: PackedBatch, start: int, end: int) -> PackedBatch:
    """Windows [start, end) of a packed batch as a packed batch of their own."""
    cu = batch.cu_seqlens
    lo, hi = int(cu[start]), int(cu[end])
    return PackedBatch(
        tokens=batch.tokens[lo:hi],
        positions=batch.positions[lo:hi],
        cu_seqlens=(cu[start : end + 1] - lo).astype(np.int32),
        ids=batch.ids[start:end],
        ordinals=batch.ordinals[start:end],
        residues=batch.residues[start:end],
        truncated=batch.truncated[start:end],
        chunk_index=batch.chunk_index[start:end],
        chunk_count=batch.chunk_count[start:end],
        total_residues=batch.total_residues[start:end],
        token_budget=batch.token_budget,
        extra={k: v[start:end] for k, v in batch.extra.items()},
    )


def failure_reason(error: BaseException) -> str:
    """The reject reason of a window that could not be embedded: one line, bounded length."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
    return f"embedding failed: {type(error).__name__}: {message[:300]}"


def _release_cuda_cache() -> None:
    """Give cached blocks back after an OOM, so the halves start from a clean allocator."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def worker_name(device: str, cuda_visible: str) -> str:
    """host:device:pid@node, e.g. `gpu-7:cuda3:41213@8f1c2a9e`: names this actor in the manifest and metrics.

    The node is the first 8 hex digits of the Ray node id (absent outside Ray): several Ray nodes can share
    a host name (containers, or a test cluster on one machine), and node loss is read off it.
    """
    name = f"{socket.gethostname()}:{'cuda' + cuda_visible if device != 'cpu' else 'cpu'}:{os.getpid()}"
    node = _ray_node_id()
    return f"{name}@{node[:8]}" if node else name


def _ray_node_id() -> str:
    """This process's Ray node id (hex), or "" outside a Ray worker (Ray is not imported for it: in-process)."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""


def _was_restarted() -> bool:
    """Whether this process is a Ray actor that Ray restarted after its previous process died."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; an in-process job never does
    if ray is None or not ray.is_initialized():
        return False
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:
        return False
    with warnings.catch_warnings():  # Ray marks the property's internals deprecated; the answer is what we need
        warnings.simplefilter("ignore")
        return bool(context.was_current_actor_reconstructed)


# Per-token and per-window columns of a packed batch, handed to PackedBatch.from_row as numpy arrays.
_NUMPY_COLUMNS = frozenset(
    ["tokens", "positions", "cu_seqlens", "ordinals", "residues", "truncated", "chunk_index", "chunk_count",
     "total_residues"]
)


def _batch_ids(table: pa.Table) -> list[str]:
    """The ids of every window of a packed-batch table, in order."""
    return [i for ids in table.column("ids").to_pylist() for i in ids] if "ids" in table.column_names else []


def _rows(table: pa.Table) -> list[dict]:
    """Rows of a packed-batch table, numeric list columns as numpy views (to_pylist boxes every token)."""
    columns: dict[str, list] = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if name in _NUMPY_COLUMNS:
            offsets = column.offsets.to_numpy()  # [rows + 1], absolute positions in the child values
            values = column.values.to_numpy(zero_copy_only=False)
            columns[name] = [values[offsets[i] : offsets[i + 1]] for i in range(len(column))]
        else:
            columns[name] = column.to_pylist()
    return [{name: values[i] for name, values in columns.items()} for i in range(table.num_rows)]


def _to_device(array: np.ndarray, dtype: torch.dtype, device: torch.device, pin: bool) -> torch.Tensor:
    """Host array to device; pinned and non-blocking on CUDA so the copy overlaps queued kernels."""
    t = torch.from_numpy(np.array(array, dtype=np.int64 if dtype == torch.int64 else np.int32)).to(dtype)
    if pin:
        return t.pin_memory().to(device, non_blocking=True)
    return t
