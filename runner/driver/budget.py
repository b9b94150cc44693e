"""Token budget per packed batch, sized from free GPU memory.

Inference keeps one layer's activations alive at a time, so memory per token is a small multiple of
the hidden width; past ~64k tokens a bigger batch buys no speed (the GPU is already full) but makes
each retry and each copy larger, hence the cap.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

CPU_TOKEN_BUDGET = 4096  # CPU actors: small batches keep latency and memory low
GPU_TOKEN_BUDGET_CAP = 65536  # beyond this throughput is flat on an H200 (see benchmarks/)
GPU_TOKEN_BUDGET_FLOOR = 4096  # never below: small batches starve the GPU
ACTIVATION_BYTES_PER_TOKEN_PER_DIM = 48  # x, LN, q/k/v, attn out, 4D MLP hidden (x2 gelu), fp32 pool; 2 B each
MEMORY_FRACTION = 0.5  # of what is free after the weights: leaves room for the allocator and the shadow


def auto_token_budget(free_bytes: int, weight_bytes: int, embed_dim: int) -> int:
    """Largest budget (multiple of 1024) whose activations fit in half the memory left after the weights."""
    spare = max(free_bytes - weight_bytes, 0) * MEMORY_FRACTION
    per_token = ACTIVATION_BYTES_PER_TOKEN_PER_DIM * embed_dim
    fits = int(spare // per_token) // 1024 * 1024
    return max(GPU_TOKEN_BUDGET_FLOOR, min(GPU_TOKEN_BUDGET_CAP, fits))


def probe_free_gpu_memory() -> int:
    """Free bytes on the GPU this process sees (run inside a Ray task that holds one GPU)."""
    import torch

    free, _total = torch.cuda.mem_get_info()
    return int(free)


def parse_nvidia_smi_free(text: str, visible: str | None) -> int | None:
    """Least free bytes among the GPUs CUDA_VISIBLE_DEVICES (`visible`: indices or UUIDs; None = all) selects,
    from `nvidia-smi --query-gpu=index,uuid,memory.free --format=csv,noheader,nounits` output (MiB)."""
    rows = [[field.strip() for field in line.split(",")] for line in text.strip().splitlines() if line.strip()]
    try:
        free = {(row[0], row[1]): int(row[2]) << 20 for row in rows}
    except (IndexError, ValueError):
        return None
    if visible is not None:
        wanted = [v.strip() for v in visible.split(",") if v.strip()]
        free = {key: value for key, value in free.items() if key[0] in wanted or key[1] in wanted}
    return min(free.values()) if free else None


def nvidia_smi_free_bytes() -> int | None:
    """Least free bytes among this machine's visible GPUs, from nvidia-smi (None when it is unavailable): a
    tenth of a second, where a Ray task holding a GPU costs a worker process, torch's import and a CUDA
    context (seconds, on the start-up's critical path)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,uuid,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return parse_nvidia_smi_free(done.stdout, os.environ.get("CUDA_VISIBLE_DEVICES"))


def nvidia_gpus_here() -> bool:
    """Whether this machine has an NVIDIA GPU this process may use, without running anything: the driver's
    /proc/driver/nvidia/gpus entries or /dev/nvidiaN devices, and a CUDA_VISIBLE_DEVICES that hides none of them
    ("" or "-1" hide all). For decisions taken before Ray starts (nvidia-smi can take seconds to start)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return bool(glob.glob("/proc/driver/nvidia/gpus/*") or glob.glob("/dev/nvidia[0-9]*"))
