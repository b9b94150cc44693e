"""Why GPU shadow actors are created after the embedders: Ray packs fractional GPUs.

Checked with Ray's own scheduler and logical GPUs (no CUDA needed): two 0.25-GPU actors created first
land on the same GPU, and then only one of two 0.75-GPU actors can start; created after the
embedders, they land one per GPU. `runner.driver.cluster.start_shadow` relies on the second order
(tests/test_shadow.py checks that it creates its actors only at the first shadow submission).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys
import ray

ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)

@ray.remote
class Actor:
    def gpu(self):
        return os.environ.get("CUDA_VISIBLE_DEVICES")

def make(share):
    return [Actor.options(num_gpus=share, num_cpus=0).remote() for _ in range(2)]

# Handles are kept in variables: an actor whose handles are gone is killed and frees its GPU share.
result = {}
if sys.argv[1] == "shadows_first":
    shadows = make(0.25)
    result["shadows"] = ray.get([a.gpu.remote() for a in shadows])
    embedders = make(0.75)
    ready, pending = ray.wait([a.gpu.remote() for a in embedders], num_returns=2, timeout=15)
    result["embedders"] = ray.get(ready)
    result["embedders_waiting"] = len(pending)
else:
    embedders = make(0.75)
    result["embedders"] = ray.get([a.gpu.remote() for a in embedders])
    shadows = make(0.25)
    result["shadows"] = ray.get([a.gpu.remote() for a in shadows])
    result["embedders_waiting"] = 0
print(json.dumps(result))
"""


def place(order: str) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT, order], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("order", ["shadows_first", "embedders_first"])
def test_fractional_gpu_placement_depends_on_creation_order(order: str) -> None:
    placed = place(order)
    if order == "shadows_first":
        assert placed["shadows"][0] == placed["shadows"][1]  # packed onto one GPU
        assert placed["embedders_waiting"] == 1  # the second embedder finds no GPU with 0.75 free
    else:
        assert sorted(placed["embedders"]) == ["0", "1"]  # one embedder per GPU
        assert sorted(placed["shadows"]) == ["0", "1"]  # and a shadow beside each
        assert placed["embedders_waiting"] == 0
