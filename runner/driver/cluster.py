"""Ray: joining or starting a cluster, sizing the job to it, and placing the stream's stages and the shadow actors."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.config import EmbedConfig
from runner.driver.budget import (
    CPU_TOKEN_BUDGET,
    auto_token_budget,
    nvidia_smi_free_bytes,
    probe_free_gpu_memory,
)
from runner.driver.metrics import DriverMetrics
from runner.driver.progress import InputCount
from runner.errors import RunnerError
from runner.input.stream import job_stream_settings, pack_records, read_blocks
from runner.kernels.fp16x3 import half_gemm_available
from runner.models.base import ModelInfo, SequenceCodec
from runner.stages.embed_stage import DeathRetries, EmbedStage, StageSettings
from runner.stages.shadow import ShadowMonitor, ShadowSettings

log = logging.getLogger("runner")


READ_CPUS = 0.25  # CPU reserved by the single read task
SMALL_INPUT_BYTES = 64 << 20  # inputs up to this size are counted before the stream starts (block_records)
MIN_BLOCK_RECORDS = 64  # the smallest stream block block_records picks
# Below this many tokens per GPU a job runs its layers eager by default: on an H200 importing torch's compiler and
# compiling take 10-17 s per actor (650M), while compiling makes a forward ~22 % faster; at 650M's ~250k tok/s
# eager that repays itself only from ~10M tokens per GPU, and for smaller models later still.
EAGER_BELOW_TOKENS_PER_GPU = 2_000_000


def _spread() -> dict:
    return {"scheduling_strategy": "SPREAD"}


def read_cpus(ray) -> float:
    """CPUs of the read task, which runs on the driver's node (InputRecords.supports_distributed_reads): READ_CPUS,
    or 0 where that node has no CPUs to give (a head started with --num-cpus 0 still runs the reader)."""
    node_id = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["NodeID"] == node_id), 0.0)
    return READ_CPUS if cpus >= READ_CPUS else 0


def block_records(configured: int, count: InputCount | None, actors: int) -> int:
    """Records per stream block: `configured` (records_per_block), lowered for a small input so that every
    embedding actor gets about four blocks; `count` is count_small_input's (None: large or unread).

    An embedding task covers one block, and Ray Data hands the driver a task's rows only when the whole block is
    embedded: a 1,515-protein job in one 2,048-record block reached the driver only after its last batch (1.6 s
    after the first on an H200), and on 8 GPUs a 5,000-protein job kept 3 of them busy. Inputs up to
    SMALL_INPUT_BYTES are counted first (FASTA at disk speed, Parquet from its metadata); larger ones keep the
    configured size (they make blocks enough for any actor count)."""
    if count is None:
        return configured
    wanted = -(-count.records // (4 * max(actors, 1)))
    return max(min(configured, MIN_BLOCK_RECORDS), min(configured, wanted))


def count_small_input(paths: Sequence[Path]) -> InputCount | None:
    """Records (and FASTA residues) of inputs up to SMALL_INPUT_BYTES in all, counted at disk speed; None for
    larger inputs or ones that cannot be read (the reader reports the real problem)."""
    from runner.driver.progress import count_inputs

    try:
        if sum(os.path.getsize(p) for p in paths) > SMALL_INPUT_BYTES:
            return None
        return count_inputs(list(paths))
    except (OSError, EOFError, ValueError):
        return None


def compile_by_default(gpus: int, count: InputCount | None) -> bool:
    """Whether a job compiles its layers when --compile/--no-compile is not given: on GPUs, unless the input is
    known to be small (FASTA up to SMALL_INPUT_BYTES with fewer than EAGER_BELOW_TOKENS_PER_GPU tokens per GPU,
    a residue and the two special tokens per record), where compiling would take longer than it saves."""
    if gpus <= 0:
        return False
    tokens = count.tokens() if count is not None else None
    return tokens is None or tokens >= EAGER_BELOW_TOKENS_PER_GPU * gpus


def resolve_gpus(requested: int | None, ray) -> int:
    """The embedding actor count on GPUs: the request, checked against the cluster, or all of them."""
    available = int(ray.cluster_resources().get("GPU", 0))
    if requested is None:
        return available
    if requested > available:
        raise RunnerError(
            f"asked for {requested} GPU(s) but the Ray cluster has {available}: "
            f"pass --gpus {available} or fewer (--gpus 0 runs on CPU)"
        )
    return requested


def pick_token_budget(on_gpu: bool, info: ModelInfo, ray, free_here: Callable[[], int | None] | None = None) -> int:
    """CPU: a small fixed budget. GPU: sized from the free memory of one GPU: read with nvidia-smi when every
    GPU of the cluster is on this node or the job runs in-process (`ray` None; `free_here`: that reading, when
    already taken beside Ray's start), else probed by a Ray task holding a GPU."""
    if not on_gpu:
        return CPU_TOKEN_BUDGET
    # in-process (`ray` None) the GPU is this process's: nvidia-smi, else torch asked here
    free = (free_here or nvidia_smi_free_bytes)() if ray is None or gpus_all_here(ray) else None
    if free is None:
        free = probe_free_gpu_memory() if ray is None else ray.get(ray.remote(num_gpus=1)(probe_free_gpu_memory).remote())
    return auto_token_budget(free, weight_bytes=info.parameters * 2, embed_dim=info.embed_dim)


def gpus_all_here(ray) -> bool:
    """Whether the driver's node is the only live node with GPUs (a local Ray, or a one-node cluster joined
    from that node)."""
    here = ray.get_runtime_context().get_node_id()
    gpu_nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("GPU")]
    return gpu_nodes == [here]


def build_dataset(
    ray,
    paths: list[Path],
    codec: SequenceCodec,
    config: EmbedConfig,
    budget: int,
    stage: StageSettings,
    gpus: int,
    shadow_share: float,
    done_bits: np.ndarray | None = None,
    input_count: InputCount | None = None,
):
    """The Ray Data stream; nothing runs until the driver iterates it.

    `input_count` (count_small_input: a small input's records, counted once per job) sizes its blocks.

    `done_bits` (packed bitmap of ordinals already written, on resume) travels with the read task,
    which skips those records.
    """
    from ray.data import DataContext, Datasource, ReadTask
    from ray.data.block import BlockMetadata

    # runner draws its own progress display (runner.driver.progress); Ray Data's bars or logged progress would
    # interleave with it. Its execution plan and stats still go to the log (runner.driver.console.JobLog).
    DataContext.get_current().enable_progress_bars = False

    actors = gpus if gpus > 0 else config.cpu_actors
    records_per_block = block_records(config.records_per_block, input_count, actors)
    read_settings, pack_settings = job_stream_settings(
        paths, codec, config, budget, records_per_block,
        done_bits if done_bits is not None else np.zeros(0, dtype=np.uint8),
    )

    class InputRecords(Datasource):
        """All inputs read by one task, in order (dedup and ordinals need one reader)."""

        @property
        def supports_distributed_reads(self) -> bool:
            # Ray Data then runs the read task on the driver's node: the inputs are read where the driver checked
            # and fingerprinted them, so they need not be on a shared filesystem, and losing another node never
            # loses the reader (a re-run read task starts again from the first record).
            return False

        def estimate_inmemory_data_size(self) -> int | None:
            return sum(os.path.getsize(p) for p in read_settings.paths)

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            meta = BlockMetadata(
                num_rows=None, size_bytes=None, exec_stats=None, input_files=read_settings.paths
            )
            return [ReadTask(lambda: read_blocks(read_settings), meta)]

    DeathRetries.clear_counts()
    # The reader is mostly I/O: a quarter CPU leaves room for packing and a CPU actor on a 2-core machine
    # (with a whole CPU each, read + actor took both cores and the pack tasks never ran).
    ds = ray.data.read_datasource(InputRecords(), override_num_blocks=1, num_cpus=read_cpus(ray))
    # Ray Data coalesces what a read task yields into blocks of up to target_max_block_size (128 MiB):
    # cut them back to records_per_block records, so that each embedding task (and so each delivery to
    # the driver, each retry after an actor death and each stop on Ctrl-C) covers one such block.
    ds = ds.repartition(target_num_rows_per_block=records_per_block)
    # Ray 2.60 has no named parameter for the two remote-args settings below (the replacements arrive
    # with the removal in 2.64), so its deprecation notices are silenced here rather than shown to users.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        # A ray_remote_args_fn keeps Ray Data from fusing packing into the single read task or into the
        # embedding actors: packing must run as its own parallel tasks, spread over the cluster's CPUs.
        ds = ds.map_batches(
            pack_records,
            fn_kwargs={"settings": pack_settings},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=config.pack_cpus,
            ray_remote_args_fn=_spread,
        )
        ds = ds.map_batches(
            EmbedStage,
            fn_constructor_kwargs={"settings": stage},
            batch_size=1,
            batch_format="pyarrow",
            # With a shadow beside each embedder, the embedder leaves that share of its GPU free.
            num_gpus=(1 - shadow_share) if gpus > 0 else 0,
            num_cpus=1,
            # Two calls in flight per GPU actor: one batch's host work (Arrow in/out, the --per-token file's
            # build, write and fsync) overlaps the other's forward, so the GPU does not idle between batches.
            # Ray Data runs a class UDF's calls one at a time unless enable_true_multi_threading is set
            # (without it only input batching and output conversion overlapped, and the per-token write ran
            # serially with the forward: 0.60x of pooled-only on an H200); EmbedStage itself keeps one forward
            # at a time on the device (its _device_lock), so memory per GPU stays that of one forward.
            compute=ray.data.ActorPoolStrategy(
                size=actors, max_concurrent_calls_per_actor=2 if gpus > 0 else 1,
                enable_true_multi_threading=gpus > 0,
            ),
            # An actor that dies (killed process, lost node, unusable GPU) is restarted by Ray without limit,
            # and the batches it held are retried on it without limit: a lost node's batches burn retries while
            # Ray does not yet know the node is gone. A batch that kills its actor every time still ends the
            # job: the actor counts deaths per batch (embed_stage.DeathRetries, BATCH_DEATHS_ALLOWED).
            max_restarts=-1,
            max_task_retries=-1,
            # One actor per node before a second on any (Ray's SPREAD: round-robin over the nodes with room,
            # which is also Ray Data's default, stated here because the placement is a promise of docs/cluster.md).
            # Not a placement group: its reserved GPUs would keep out the shadow actor sharing each GPU, and a
            # strict one could not re-place a lost node's actor.
            scheduling_strategy="SPREAD",
        )
    return ds


def start_when_placed(ray, start: Callable[[], None], held: float, done: threading.Event, timeout: float = 300.0,
                      poll: float = 0.2) -> bool:
    """Call `start` once `held` more GPUs are taken than when this was called (the embedding actors hold their
    shares: Ray places an actor, and takes its resources, before its __init__ runs). False, without starting,
    when `done` is set first (the job ended: a later job's actors must not start this one's shadow) or after
    `timeout` seconds (the first sample then starts the shadow, as on CPU)."""
    free_before = ray.available_resources().get("GPU", 0.0)
    deadline = time.monotonic() + timeout
    while not done.is_set() and time.monotonic() < deadline:
        if ray.available_resources().get("GPU", 0.0) <= free_before - held + 1e-6:
            start()
            return True
        done.wait(poll)
    return False


def resolve_shadow_share(requested: float | None, on_gpu: bool, rate: float) -> float:
    """GPU share of each shadow actor: 0 (CPU) when off or on CPU runs, else the request or 0.25."""
    if rate <= 0 or not on_gpu:
        return 0.0
    return 0.25 if requested is None else requested


def start_shadow(
    ray,
    config: EmbedConfig,
    stage: StageSettings,
    gpus: int,
    share: float,
    out_dir: Path,
    precision: str,
    metrics: DriverMetrics,
    columns: Sequence[str] = ("embedding",),
) -> ShadowMonitor | None:
    """FP32 shadow actors (the same EmbedStage, in fp32) and the driver-side monitor feeding them; every stored
    pooled column (`columns`, runner.output.sink.vector_columns) is compared with its FP32 twin."""
    if config.shadow_rate <= 0:
        return None
    count = config.shadow_actors or (gpus if share > 0 else 1)
    math = config.shadow_math
    if share > 0 and math in ("fp16x3", "bf16x3") and not half_gemm_available():
        log.warning("--shadow-math %s needs torch.mm(..., out_dtype) (PyTorch 2.8 and later); this torch is %s: the shadow "
                    "uses tf32x3 instead (as accurate, slower)", math, torch.__version__)
        math = "tf32x3"
    fp32 = stage.fp32_twin(
        # The split maths are plain tensor ops and compile like the main path; 3xTF32 switches a global
        # matmul setting around each product, which a compiled graph would not see.
        compile_layers=stage.compile_layers and math in ("fp16x3", "bf16x3"),
        # The shadow compiles mid-job: with a worker per core it would starve the running stream's CPU stages,
        # with one (as it was) a 650M shadow was not ready before a 37-s stream ended; a quarter of the cores.
        compile_threads=-1,
        fp32_math=math,
        device="cuda" if share > 0 else "cpu",
    )
    actor_class = ray.remote(EmbedStage)
    actors: list[Any] = []
    turn: Iterator[Any] = iter(())
    starting = threading.Lock()  # start() runs at the first sample, or earlier in the thread below
    shadow_done = threading.Event()  # set once the monitor is closed: a start still waiting gives up

    def start() -> None:
        nonlocal turn
        with starting:
            if actors:
                return
            # Created once the embedding actors hold their (1 - share) of each GPU: Ray packs fractional
            # GPUs, so shadows created first would share one GPU and leave no GPU with room for the second
            # embedder (seen on 2 H200s: one embedder did all the work).
            # No CPU reservation: the shadow sees only the sampled fraction, and reserving a core for it
            # on a small machine would starve the reader and packers of the main stream (a hang on 2 cores).
            actors.extend(actor_class.options(num_gpus=share, num_cpus=0).remote(fp32) for _ in range(count))
            turn = itertools.cycle(actors)

    if share > 0:
        # On GPUs the FP32 actors load and compile beside the embedding actors instead of after the first
        # sample (which comes with the first embeddings): a 650M shadow takes 7 s to load and up to 15 s to
        # compile, which a short job otherwise waits for at its end. On CPU they stay lazy: they would take
        # cores from the embedding actor's start, and a small job may sample nothing.
        held = gpus * (1 - share)
        threading.Thread(target=start_when_placed, args=(ray, start, held, shadow_done), daemon=True,
                         name="runner-shadow-start").start()

    def submit(packed: Any) -> Any:
        start()
        return next(turn).embed.remote(packed)

    def wait(futures, block):
        return ray.wait(futures, num_returns=len(futures), timeout=None if block else 0)

    def startup() -> list[dict[str, float | str]]:
        """Each shadow actor's start-up seconds and kernels, for the manifest (none if the actors cannot answer)."""
        try:
            return ray.get([actor.startup_report.remote() for actor in actors], timeout=30)
        except (ray.exceptions.RayError, TimeoutError) as error:  # a dead actor must not fail a finished job
            log.warning("shadow actors' start-up times unavailable: %s", type(error).__name__)
            return []

    settings = ShadowSettings(
        config.shadow_rate, config.drift_min_cosine, config.on_drift, config.shadow_queue * count, precision,
        batch_tokens=config.shadow_batch_tokens,
        fp32_math=math if share > 0 else "ieee",
        columns=tuple(columns),
    )
    return ShadowMonitor(
        settings,
        out_dir,
        submit_fn=submit,
        wait_fn=wait,
        get_fn=lambda future: ray.get(future)[0],
        metrics=metrics,
        start_fn=start,
        startup_fn=startup,
        finish_fn=shadow_done.set,
    )
