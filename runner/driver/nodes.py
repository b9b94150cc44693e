"""The Ray nodes of a job: which of them may run embedding actors, and whether each can use what the job hands
its actors.

Every actor gets the same strings from the driver: the model spec (a hub name, or a local checkpoint path) and,
with per-token outputs, the --out directory it writes into. On one machine those paths are the driver's own;
on a cluster each node resolves them on its own filesystem. A node that cannot read the checkpoint would fail
only once an actor starts there (Ray Data then replaces the actor, again and again), and a node whose --out is
a local disk would write per-token files the driver never sees. So before any GPU work the driver runs one
tiny zero-CPU task on every other node that can host an actor (`NodeAffinitySchedulingStrategy`), and stops
with one line naming the node and the fix when a node cannot.

Nothing here imports torch: the probe tasks stay cheap on every node.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import RunnerError

# Files are compared by size plus a SHA-256 of their first and last 64 KiB (as the inputs' fingerprint):
# cheap on a 60 GB checkpoint, and a truncated copy, another model or another version differs at an edge.
EDGE_BYTES = 64 << 10
PROBE_TIMEOUT_SECONDS = 120  # a node whose probe does not answer in this time fails the check


@dataclass(frozen=True)
class Node:
    """One alive Ray node."""

    node_id: str  # Ray node id (hex)
    address: str  # the node's IP address, as Ray reports it

    @property
    def name(self) -> str:
        """What messages call it: the short id the actors' worker names carry, and its address."""
        return f"{self.node_id[:8]} ({self.address})"


def edge_signature(path: Path) -> dict[str, Any]:
    """{size, edges_sha256} of one file: its size and a SHA-256 of its first and last EDGE_BYTES."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            fh.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            digest.update(fh.read(EDGE_BYTES))
    return {"size": size, "edges_sha256": digest.hexdigest()}


def actor_model_spec(spec: str) -> str:
    """The model spec the actors get: a local checkpoint as an absolute path (an actor's working directory is
    not the driver's, even on the driver's node when it joined a running cluster), a hub name as it is."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def local_weight_files(spec: str) -> list[Path]:
    """The files an actor reads for a local checkpoint: the .pt file, or every file of an HF directory.
    Empty for a hub name (each node downloads it into its own cache)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path.resolve()]
    if path.is_dir():
        return sorted(p.resolve() for p in path.iterdir() if p.is_file())
    return []


def cluster_nodes(ray) -> list[Node]:
    """Every alive node (none when this process is not connected to Ray: the stages run in-process)."""
    if not ray.is_initialized():
        return []
    return [Node(n["NodeID"], n["NodeManagerAddress"]) for n in ray.nodes() if n["Alive"]]


def actor_nodes(ray, on_gpu: bool) -> list[Node]:
    """The alive nodes other than the driver's that can host an embedding actor: a GPU, or (CPU runs) a whole CPU."""
    if not ray.is_initialized():
        return []
    here = ray.get_runtime_context().get_node_id()
    need = "GPU" if on_gpu else "CPU"
    return [
        Node(n["NodeID"], n["NodeManagerAddress"])
        for n in ray.nodes()
        if n["Alive"] and n["NodeID"] != here and n["Resources"].get(need, 0) >= 1
    ]


def on_each_node(ray, nodes: list[Node], fn, *args) -> list[Any]:
    """fn(*args) run once on each node (a zero-CPU task pinned there), the results in `nodes` order."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(fn)
    futures = [
        task.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
                     max_retries=0).remote(*args)
        for node in nodes
    ]
    ready, _ = ray.wait(futures, num_returns=len(futures), timeout=PROBE_TIMEOUT_SECONDS)
    results: list[Any] = []
    for node, future in zip(nodes, futures, strict=True):
        if future not in ready:
            raise RunnerError(f"Ray node {node.name} did not answer a {PROBE_TIMEOUT_SECONDS}-s check: "
                              f"check that node (`ray status`), or stop it with `ray stop` there")
        try:
            results.append(ray.get(future))
        except ray.exceptions.RayError as e:
            raise RunnerError(f"Ray node {node.name} could not run a check task ({type(e).__name__}): check that "
                              f"runner is installed there and the node is healthy (`ray status`)") from None
    return results


def _signatures_here(paths: list[str]) -> list[dict[str, Any] | str]:
    """On a node: each file's edge_signature, or why it cannot be read there."""
    found: list[dict[str, Any] | str] = []
    for path in paths:
        try:
            found.append(edge_signature(Path(path)))
        except OSError as e:
            found.append(e.strerror or type(e).__name__)
    return found


def check_weights_on_nodes(ray, spec: str, nodes: list[Node]) -> int:
    """Raise RunnerError unless every node reads the same local checkpoint files as the driver; the nodes checked.

    A hub name is not checked: each node downloads it into its own cache (or finds it there).
    """
    files = local_weight_files(spec)
    if not files or not nodes:
        return 0
    expected = [edge_signature(p) for p in files]
    for node, found in zip(nodes, on_each_node(ray, nodes, _signatures_here, [str(p) for p in files]), strict=True):
        for path, want, got in zip(files, expected, found, strict=True):
            fix = ("put the checkpoint on a filesystem every node mounts at the same path, or pass a hub name "
                   "(e.g. esm2_t33_650M_UR50D) so that each node downloads it")
            if isinstance(got, str):
                raise RunnerError(f"checkpoint file {path} is not readable on Ray node {node.name} ({got}), "
                                  f"which can run an embedding actor: {fix}")
            if got != want:
                raise RunnerError(f"checkpoint file {path} on Ray node {node.name} is not the driver's "
                                  f"({got['size']} bytes there, {want['size']} here, or other bytes): {fix}")
    return len(nodes)


def _out_probe_here(out_dir: str, token_name: str, token: str) -> str | None:
    """On a node: None if it sees the driver's token file in out_dir and can write there, else what fails."""
    directory = Path(out_dir)
    try:
        seen = (directory / token_name).read_text()
    except OSError as e:
        return f"the driver's files are not there ({e.strerror}): not the same directory"
    if seen != token:
        return "it holds other files than the driver's: not the same directory"
    probe = directory / f".node-write-test-{uuid.uuid4().hex}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"ok")
            fh.flush()
            os.fsync(fh.fileno())
        probe.unlink()
    except OSError as e:
        return f"cannot write there ({e.strerror})"
    return None


def check_out_on_nodes(ray, out_dir: Path, nodes: list[Node]) -> int:
    """Raise RunnerError unless every node sees the driver's --out and can write into it; the nodes checked.

    Needed when actors write into --out themselves (per-token files): the driver writes a token file with
    random content, and each node must read the same content there and write a file of its own.
    """
    if not nodes:
        return 0
    token = uuid.uuid4().hex
    token_path = out_dir / f".node-probe-{token}"
    token_path.write_text(token)
    try:
        answers = on_each_node(ray, nodes, _out_probe_here, str(out_dir.resolve()), token_path.name, token)
    finally:
        token_path.unlink(missing_ok=True)
    for node, problem in zip(nodes, answers, strict=True):
        if problem is not None:
            raise RunnerError(
                f"--out {out_dir} on Ray node {node.name}: {problem}. Embedding actors write per-token files "
                f"into --out themselves: put it on a filesystem every node mounts at the same path (NFS, Lustre, ...)"
            )
    return len(nodes)


def actors_write_out(config: Any) -> bool:
    """Whether embedding actors write into --out themselves (per-token files), so every node must share it."""
    return bool(getattr(config, "per_token", None))


# Ray Data names an actor pool's class MapWorker(<operator>); the embedding stage's operator is
# MapBatches(EmbedStage) (runner.driver.cluster.build_dataset). The shadow actors are plain `EmbedStage`.
EMBED_ACTOR_CLASS = "MapWorker(MapBatches(EmbedStage))"


def embed_actor_placement(ray, since: float) -> dict[str, int]:
    """Node name -> how many of this job's embedding actors Ray placed there (last placement: an actor restarted
    after a node loss counts where it ran last). Actors created before `since` (time.time(); an earlier job of
    the same driver process) are left out, and so are actors never placed (no node with room).

    Read from Ray's actor table in the GCS (which keeps the actors Ray Data has already stopped), so it holds
    every actor, whether or not it embedded a batch: `throughput.windows_per_worker` says which did the work.
    """
    # The GCS actor table: ray.util.state would need the dashboard, which a cluster may run without.
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    names = {n["NodeID"]: Node(n["NodeID"], n["NodeManagerAddress"]).name for n in ray.nodes()}  # dead ones too
    placed: dict[str, int] = {}
    for actor in state.actors().values():
        node = actor["Address"]["NodeID"]
        if (actor["ActorClassName"] != EMBED_ACTOR_CLASS or actor["JobID"] != job
                or actor["StartTime"] < since * 1000 or not node.strip("0") or node not in names):
            continue
        placed[names[node]] = placed.get(names[node], 0) + 1
    return dict(sorted(placed.items()))


def cluster_section(ray, at_start: list[Node], checked: dict[str, int], since: float) -> dict[str, Any]:
    """The manifest's `cluster` section: the nodes alive when the job started, those lost since (a node whose
    actor died with it shows in counts.actor_restarts too), where the embedding actors ran (`since`: when the
    job started, time.time()), and how many nodes each pre-flight check covered."""
    try:
        alive = {node.node_id for node in cluster_nodes(ray)}
        placement = embed_actor_placement(ray, since) if ray.is_initialized() else {}
    except Exception:  # noqa: BLE001 - Ray itself may be gone on the way out of a failed job
        alive, placement = None, None
    return {
        "nodes": [node.name for node in at_start],
        "nodes_lost": None if alive is None else [node.name for node in at_start if node.node_id not in alive],
        "actors_per_node": placement,
        "checked_nodes": checked,
    }
