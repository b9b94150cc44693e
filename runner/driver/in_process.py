"""A small job run in the `runner` process itself, without Ray: the same stages, one after the other.

Ray's start and an actor's (a worker process that imports torch) cost 15-25 s before the first batch: 10-14 s
and 9-10 s for the README's CPU quickstart on a 2-core machine, 9.6-13.3 s and 6.3-6.8 s on an H200 host. A job
that one device embeds in less time than that ends sooner here. `choose_engine` decides (`--engine auto`): no
cluster to join, and an input counted small (FASTA up to 64 MiB) whose tokens times the model's parameters are
under IN_PROCESS_BELOW_WORK (2M tokens at 650M).

What runs is what `runner.driver.cluster.build_dataset` wires into Ray Data (`read_blocks` -> `pack_records` ->
`EmbedStage`) and what `start_shadow` runs on FP32 actors (an `EmbedStage` in fp32), so every guarantee holds
unchanged: the driver's collect loop writes the parts (exactly once, resume, checksums), aborts on NaN/Inf and
feeds the FP32 shadow, which compares on a thread of its own. What differs: one device (the first GPU, or the CPU
with one thread per `cpu_actors`), no Ray dashboard or Ray metrics (progress, drift.arrow and the manifest are as always), and a
stop signal ends the job after the batch being embedded (a second one at once), since no actor runs it elsewhere.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from runner.config import EmbedConfig
from runner.driver.progress import InputCount
from runner.driver.signals import StopSignals
from runner.input.batch import PackedBatch
from runner.input.stream import job_stream_settings, pack_records, read_blocks
from runner.models.base import SequenceCodec
from runner.stages.embed_stage import StageSettings
from runner.stages.shadow import ShadowMonitor, ShadowSettings

log = logging.getLogger("runner")

# `--engine auto` runs a job in-process below this much work, tokens (residues plus two specials a record) times the
# model's parameters: 2M tokens at 650M, ~8 s of one H200's eager forward, less than Ray's and an actor's start; 87k
# tokens at 15B. On CPU the in-process forward has as many threads as the Ray path would run actors: no slower.
IN_PROCESS_BELOW_WORK = 2_000_000 * 650_000_000


def choose_engine(config: EmbedConfig, count: InputCount | None, parameters: int,
                  environ: dict[str, str] | None = None) -> str:
    """"ray" or "in-process": `config.engine` when given, else in-process for a small job with no cluster to join
    (no --address, no RAY_ADDRESS) whose inputs were counted (`count`: FASTA up to 64 MiB, runner.driver.cluster.
    count_small_input) at under IN_PROCESS_BELOW_WORK tokens x `parameters` (the model's)."""
    if config.engine != "auto":
        return config.engine
    environ = os.environ if environ is None else environ
    if config.address or environ.get("RAY_ADDRESS"):
        return "ray"
    tokens = count.tokens() if count is not None else None
    if tokens is None:  # large, or a table: its residues are not counted up front
        return "ray"
    return "in-process" if tokens * max(parameters, 1) < IN_PROCESS_BELOW_WORK else "ray"


def in_process_gpus(requested: int | None, cuda_devices: int) -> int:
    """GPUs an in-process job uses: 1 when any is visible (--gpus above 0, or not given), 0 for --gpus 0 or none."""
    if requested == 0 or cuda_devices == 0:
        return 0
    if requested is not None and requested > 1:
        log.info("in-process: one GPU of the %d asked for (a job this small ends sooner on one than Ray starts; "
                 "--engine ray spreads it)", requested)
    return 1


class InProcessStream:
    """The job's stream in this process: read -> tokenize/pack -> embed, one block at a time (memory: one block
    of records and its packed batches). `iter_batches` yields what an embedding actor returns to the driver."""

    def __init__(self, paths: list[Path], codec: SequenceCodec, config: EmbedConfig, budget: int,
                 stage: StageSettings, done_bits: np.ndarray, signals: StopSignals) -> None:
        self.read, self.pack = job_stream_settings(paths, codec, config, budget, config.records_per_block, done_bits)
        self.stage = dataclasses.replace(stage, announce=False)
        self.signals = signals

    def iter_batches(self, **_: Any) -> Iterator[pa.Table]:
        """Embedded rows, batch by batch (the keyword arguments of Ray Data's iter_batches are ignored)."""
        from runner.stages.embed_stage import EmbedStage

        embed = EmbedStage(self.stage)  # loaded here, as an actor's __init__: the start-up clock times it so
        for block in read_blocks(self.read):
            packed = pack_records(block, self.pack)  # packed-batch rows; the last one carries the rejects
            for i in range(packed.num_rows):
                with self.signals.deferred():  # a first stop signal waits for this batch (seconds at most)
                    table = embed(packed.slice(i, 1))
                yield table
                if self.signals.signum is not None:
                    return


def start_in_process_shadow(config: EmbedConfig, stage: StageSettings, out_dir: Path, precision: str,
                            metrics: Any, columns: tuple[str, ...]) -> ShadowMonitor | None:
    """The FP32 shadow on a thread of this process: an fp32 EmbedStage (built at the first sample, on that thread)
    embeds the sampled windows while the main stream goes on; the ShadowMonitor is the Ray path's."""
    if config.shadow_rate <= 0:
        return None
    fp32 = stage.fp32_twin(
        announce=False, compile_layers=False,
        # on a GPU the FP32 maths runs plain IEEE here: the split-precision kernels are for a shadow that keeps
        # pace with a long job on a GPU share of its own; a small job's sample is a few hundred sequences
        fp32_math="ieee",
    )
    pool = ThreadPoolExecutor(1, thread_name_prefix="runner-shadow")
    shadow_stage: list[Any] = []  # built by the pool's one thread before its first batch

    def run(packed: PackedBatch) -> np.ndarray:
        if not shadow_stage:
            from runner.stages.embed_stage import EmbedStage

            shadow_stage.append(EmbedStage(fp32))
        return shadow_stage[0].embed(packed)[0]  # [N, C*D] float32

    def wait_for(futures: list[Future], block: bool) -> tuple[list[Future], list[Future]]:
        done, pending = wait(futures, timeout=None if block else 0)
        return list(done), list(pending)

    settings = ShadowSettings(
        config.shadow_rate, config.drift_min_cosine, config.on_drift, config.shadow_queue, precision,
        batch_tokens=config.shadow_batch_tokens, fp32_math="ieee", columns=tuple(columns),
    )
    return ShadowMonitor(
        settings, out_dir,
        submit_fn=lambda packed: pool.submit(run, packed),
        wait_fn=wait_for,
        get_fn=lambda future: future.result(),
        metrics=metrics,
        startup_fn=lambda: [shadow_stage[0].startup_report()] if shadow_stage else [],
        finish_fn=lambda: pool.shutdown(wait=False, cancel_futures=True),
    )
