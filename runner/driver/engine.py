"""How a job's stream starts: on Ray (a local Ray started beside the driver's own start-up work, or a cluster
joined, its nodes checked) or in this process (runner.driver.in_process). Either gives `runner.job` an `Engine`:
the GPUs the stream uses, the model's hashed configuration and the inputs' fingerprints."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from runner.config import EmbedConfig
from runner.driver.budget import nvidia_gpus_here, nvidia_smi_free_bytes
from runner.driver.cluster import resolve_gpus
from runner.driver.console import JobLog
from runner.driver.in_process import in_process_gpus
from runner.driver.nodes import (
    actor_nodes,
    actors_write_out,
    check_out_on_nodes,
    check_weights_on_nodes,
    cluster_nodes,
)
from runner.driver.ray_session import RayStart, connect_ray, worker_preload
from runner.driver.startup import StartupClock
from runner.errors import RunnerError, first_line
from runner.models.base import ModelInfo
from runner.models.registry import model_info
from runner.output.manifest import input_fingerprint
from runner.output.staged import resolve_part_writer

log = logging.getLogger("runner")

T = TypeVar("T")


@dataclass
class Engine:
    """What the job's stream runs on, once started: Ray (a local Ray or a cluster) or this process."""

    name: str  # "ray" | "in-process" (EmbedConfig.engine, resolved)
    ray: Any  # the ray module; None in-process
    gpus: int  # embedding actors on GPUs (in-process: the one GPU used); 0 = CPU
    info: ModelInfo  # the model's configuration, its checkpoint hashed
    input_prints: list[Any]  # the inputs' resume fingerprints
    free_gpu_bytes: Callable[[], int | None] | None = None  # the free GPU memory read beside the start, if read
    dashboard: str | None = None  # Ray's dashboard address, when it runs
    nodes_at_start: list[Any] = field(default_factory=list)  # the Ray cluster's nodes (the manifest's `cluster`)
    checked: dict[str, int] = field(default_factory=dict)  # nodes each pre-flight check covered
    actor_parts: bool = False  # the embedding actors write the pooled parts (--part-writer)


def start_ray(config: EmbedConfig, paths: list[Path], out_dir: Path, clock: StartupClock, job_log: JobLog) -> Engine:
    """Join or start Ray and check the cluster's nodes; beside Ray's start, the driver's own start-up work."""
    ray = job_log.import_ray()  # imported late: `runner --help`, input errors and in-process jobs stay fast

    # Ray's start (its processes: seconds, mostly waiting on them) runs in a thread of its own (RayStart), and beside
    # it the driver's start-up work that needs no Ray: importing Ray Data, hashing the checkpoint and
    # fingerprinting the inputs. The start-up pays for the longest of them only. A signal stops the wait at once.
    clock.mark("ray_start_begin")
    preload = worker_preload(config.gpus, config.address, nvidia_gpus_here)
    clock.worker_preload = list(preload)
    ray_start = RayStart(lambda: connect_ray(config.address, config.verbose, config.dashboard, preload))
    with ThreadPoolExecutor(3, thread_name_prefix="runner-startup") as pool:
        info_future = pool.submit(timed, clock, "checkpoint_read_and_hash", model_info, config.model, compute_sha256=True)
        inputs_future = pool.submit(timed, clock, "input_fingerprint", lambda: [input_fingerprint(p) for p in paths])
        # the automatic token budget's reading of this machine's free GPU memory (nvidia-smi: 0.1 s to seconds)
        free_future = (pool.submit(timed, clock, "gpu_memory_read", nvidia_smi_free_bytes)
                       if config.token_budget is None and config.gpus != 0 and nvidia_gpus_here() else None)
        with clock.phase("driver_imports"):
            job_log.import_ray_data()
        context = ray_start.wait()
        clock.mark("ray_ready")
        engine = Engine("ray", ray, resolve_gpus(config.gpus, ray), info_future.result(), inputs_future.result(),
                        free_future and free_future.result)
    engine.dashboard = getattr(context, "dashboard_url", None) if context is not None else None
    on_gpu = engine.gpus > 0
    # Before any GPU work: every other node that may run an actor must read the same weights (and write --out
    # when the actors write there); one line naming the node otherwise.
    with clock.phase("node_checks"):
        engine.nodes_at_start = cluster_nodes(ray)
        others = actor_nodes(ray, on_gpu)
        engine.checked = {"weights": check_weights_on_nodes(ray, config.model, others)}
        # --part-writer: the actors write the pooled parts themselves (the driver commits them) from 8 actors on
        actor_parts = resolve_part_writer(config.part_writer, engine.gpus if on_gpu else config.cpu_actors)
        if actor_parts and config.part_writer == "auto" and not actors_write_out(config):
            try:  # auto: the actors write the parts only where every node shares --out; else the driver does
                engine.checked["out"] = check_out_on_nodes(ray, out_dir, others)
            except RunnerError as e:
                log.warning("--part-writer auto: the driver writes the pooled parts (%s)", first_line(e))
                actor_parts = False
        elif actors_write_out(config) or actor_parts:
            engine.checked["out"] = check_out_on_nodes(ray, out_dir, others)
        engine.actor_parts = actor_parts
    return engine


def start_in_process(config: EmbedConfig, paths: list[Path], clock: StartupClock) -> Engine:
    """No Ray: the checkpoint hashed and the inputs fingerprinted here; one GPU when any is visible, else the CPU."""
    import torch

    clock.mark("in_process_begin")
    cuda_devices = torch.cuda.device_count()  # no CUDA context: that comes with the model's load
    if config.gpus and not cuda_devices:
        raise RunnerError(f"asked for {config.gpus} GPU(s) but torch sees none here: pass --gpus 0 to run on CPU, "
                          "or --engine ray to use a cluster's GPUs")
    gpus = in_process_gpus(config.gpus, cuda_devices)
    with ThreadPoolExecutor(2, thread_name_prefix="runner-startup") as pool:
        info_future = pool.submit(timed, clock, "checkpoint_read_and_hash", model_info, config.model, compute_sha256=True)
        input_prints = timed(clock, "input_fingerprint", lambda: [input_fingerprint(p) for p in paths])
        info = info_future.result()
    return Engine("in-process", None, gpus, info, input_prints, actor_parts=config.part_writer == "actors")


def timed(clock: StartupClock, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs), timed as start-up phase `name`."""
    with clock.phase(name):
        return fn(*args, **kwargs)
