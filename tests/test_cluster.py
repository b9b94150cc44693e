"""A real multi-node Ray cluster on this machine: actors on several nodes, node loss, a re-added node, and the
pre-flight checks that every node reads the driver's checkpoint (and shares --out).

The cluster is `ray.cluster_utils.Cluster`: a head with no CPUs (so, as on a cluster whose head only runs the
driver, no actor and no pack task lands there; the read task runs there as a zero-CPU task) and worker nodes
of 2 CPUs each, every node its own raylet and object store. A job runs as many 1-CPU actors as there are worker
nodes: both actors would fit on one node, so one actor per node is runner's placement (Ray's SPREAD), not a
resource shortage. A node that cannot see a file is a real `ray start` worker in its own mount namespace
(`unshare`), with a tmpfs over the checkpoint's folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner
from conftest import pythonpath_with

from runner.cli import cli
from runner.driver.nodes import Node, check_out_on_nodes, check_weights_on_nodes
from runner.errors import RunnerError
from runner.input.stream import PackSettings, ReadSettings, pack_records, read_blocks
from runner.models.registry import load_codec
from runner.stages.embed_stage import EmbedStage, StageSettings

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[1]
COUNT = 240  # proteins: 12 blocks of 20
AMINO = list("ACDEFGHIKLMNPQRSTVWY")
NODE_CPUS = 2  # per worker node: room for both actors (1 CPU each) and a pack task beside one
ACTORS = 2  # as many as worker nodes
STORE = 80 << 20  # object store bytes per node


def _children() -> set[int]:
    """Pids of this process's children (from /proc)."""
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == os.getpid():
            kids.add(int(stat.parent.name))
    return kids


def add_node(cluster, **args):
    """cluster.add_node, tried up to 4 times: on a loaded machine a node's agents can miss Ray's fixed 30-s start-up
    window (the raylet then gives up); the processes a failed try started are stopped by pid before the next."""
    for attempt in range(4):
        before = _children()
        try:
            return cluster.add_node(**args)
        except Exception:
            for pid in _children() - before:
                os.kill(pid, signal.SIGKILL)
            if attempt == 3:
                raise
            time.sleep(5)


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=False)
    add_node(cluster, num_cpus=0, include_dashboard=False, object_store_memory=STORE)  # the head
    # Cluster writes its address where a plain ray.init() on this machine would join it: take it back (this
    # module passes the address explicitly), so that other Ray users here keep starting their own.
    current = Path(ray._common.utils.get_ray_address_file(None))
    if current.is_file() and current.read_text().strip() == cluster.address:
        current.unlink()
    for _ in range(2):
        add_node(cluster, num_cpus=NODE_CPUS, object_store_memory=STORE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_esm2_path: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cluster")
    rng = np.random.default_rng(18)
    fasta = base / "in.fasta"
    fasta.write_text("".join(f">s{i}\n{''.join(rng.choice(AMINO, size=int(rng.integers(20, 60))))}\n"
                             for i in range(COUNT)))
    config = base / "job.yaml"
    config.write_text(f"model: {tiny_esm2_path}\ngpus: 0\ncpu_actors: {ACTORS}\nrecords_per_block: 20\n"
                      "rows_per_part: 40\nshadow_rate: 0\nprogress: false\n")
    return {"fasta": fasta, "config": config, "base": base, "model": tiny_esm2_path}


@pytest.fixture(scope="module")
def one_node(job: dict[str, Path]) -> dict[str, np.ndarray]:
    """id -> vector as one process computes it: the same read, pack and embedding stages, without Ray."""
    model = str(job["model"])
    stage = EmbedStage(StageSettings(model, "fp32", -1, "mean", "cpu"))
    pack = PackSettings(load_codec(model), None, "truncate", 128, 4096)
    vectors: dict[str, np.ndarray] = {}
    for block in read_blocks(ReadSettings((str(job["fasta"]),), "id", "sequence", 20)):
        out = stage(pack_records(block, pack))
        out = out.filter(out.column("id").is_valid())
        dim = out.schema.field("embedding").type.list_size
        rows = out.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
        vectors.update(zip(out.column("id").to_pylist(), rows, strict=True))
    assert len(vectors) == COUNT
    return vectors


def embed_args(job: dict[str, Path], out: Path, address: str) -> list[str]:
    return ["embed", str(job["fasta"]), "--config", str(job["config"]), "--out", str(out), "--address", address]


def parts(out: Path) -> list[Path]:
    return sorted((out / "embeddings").glob("part-*.arrow"))


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def assert_same_as_one_node(out: Path, one_node: dict[str, np.ndarray]) -> None:
    """Every id exactly once, with the one-process vector; the manifest agrees."""
    table = pa.concat_tables([pa.ipc.open_file(p).read_all() for p in parts(out)])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == COUNT and set(ids) == set(one_node)
    dim = table.schema.field("embedding").type.list_size
    vectors = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, dim)
    for sid, vector in zip(ids, vectors, strict=True):
        np.testing.assert_allclose(vector, one_node[sid], rtol=0, atol=1e-6, err_msg=sid)
    m = manifest(out)
    assert m["status"] == "complete"
    assert m["counts"]["rows"] == COUNT and m["counts"]["rejects"] == 0


def actor_node_ids(out: Path) -> set[str]:
    """Short node ids (worker names end in @node) of the actors that embedded this job's batches."""
    return {worker.rsplit("@", 1)[1] for worker in manifest(out)["throughput"]["actors"]}


def worker_nodes(cluster) -> dict[str, object]:
    """Short node id -> cluster_utils node, for the worker nodes still alive."""
    return {node.node_id[:8]: node for node in cluster.worker_nodes}


def embed_actor_nodes() -> set[str]:
    """Short node ids of the embedding actors alive now (from Ray's actor table)."""
    import ray._private.state as state

    return {a["Address"]["NodeID"][:8] for a in state.actors().values()
            if "EmbedStage" in a["ActorClassName"] and a["State"] == "ALIVE"}


def placed_nodes(out: Path) -> dict[str, int]:
    """Short node id -> embedding actors placed there, from the manifest's cluster.actors_per_node."""
    return {name.split()[0]: count for name, count in manifest(out)["cluster"]["actors_per_node"].items()}


@pytest.fixture
def all_actors_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every actor embeds batches in an in-process job: Ray Data starts feeding only once all actors are up, and a
    batch takes 0.5 s. Without it, on a loaded machine the first actor up could take every batch of this tiny job
    before the other finished loading (all the work on one node, though the actors were placed on two)."""
    from ray.data import DataContext

    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", 300)
    monkeypatch.setenv("RUNNER_TEST_BATCH_DELAY", "0.5")


def test_one_actor_per_node_match_one_node(cluster, job: dict[str, Path], one_node: dict, all_actors_work) -> None:
    out = job["base"] / "spread"
    result = CliRunner().invoke(cli, embed_args(job, out, cluster.address), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert_same_as_one_node(out, one_node)
    workers = set(worker_nodes(cluster))
    assert placed_nodes(out) == dict.fromkeys(workers, 1)  # one actor on each worker, none on the CPU-less head
    assert actor_node_ids(out) == workers  # and each of them embedded batches
    m = manifest(out)
    assert m["cluster"]["nodes_lost"] == [] and len(m["cluster"]["nodes"]) == 3
    assert m["cluster"]["checked_nodes"] == {"weights": 2}  # both workers read the checkpoint the driver hashed


def test_node_lost_mid_job_then_a_new_node_is_used(cluster, job: dict[str, Path], one_node: dict,
                                                   all_actors_work) -> None:
    """A worker node holding an actor dies mid-job: the job ends on the others, each id once, the restart and the
    lost node counted. Then a node added to the cluster runs an actor of the next job."""
    add_node(cluster, num_cpus=NODE_CPUS, object_store_memory=STORE)
    cluster.wait_for_nodes()
    out = job["base"] / "node-loss"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=pythonpath_with(REPO), RUNNER_TEST_BATCH_DELAY="1.0")
    proc = subprocess.Popen([sys.executable, "-m", "runner", *embed_args(job, out, cluster.address)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600  # a loaded 2-core machine: the driver and 3 actors start slowly
        while not parts(out):
            assert proc.poll() is None, proc.stdout.read()
            if time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"no part written in time:\n{proc.communicate()[0][-3000:]}")
            time.sleep(0.2)
        busy = embed_actor_nodes() & set(worker_nodes(cluster))
        assert busy, "no embedding actor alive on a worker node"
        victim = sorted(busy)[0]
        cluster.remove_node(worker_nodes(cluster)[victim], allow_graceful=False)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert_same_as_one_node(out, one_node)
    m = manifest(out)
    assert m["counts"]["actor_restarts"] >= 1
    assert [name.split()[0] for name in m["cluster"]["nodes_lost"]] == [victim]
    assert victim not in embed_actor_nodes() and victim not in placed_nodes(out)  # the actor re-placed elsewhere
    assert sum(placed_nodes(out).values()) == ACTORS

    # Keep one surviving worker, add a new one: the next job puts one of its two actors there.
    (survivor,) = [n for n in worker_nodes(cluster) if n != victim][:1]  # noqa: RUF015 - exactly one is expected
    for short, node in worker_nodes(cluster).items():
        if short != survivor:
            cluster.remove_node(node)
    new = add_node(cluster, num_cpus=NODE_CPUS, object_store_memory=STORE)
    cluster.wait_for_nodes()
    again = job["base"] / "re-added"
    result = CliRunner().invoke(cli, embed_args(job, again, cluster.address), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert_same_as_one_node(again, one_node)
    assert placed_nodes(again) == {survivor: 1, new.node_id[:8]: 1}
    assert actor_node_ids(again) == {survivor, new.node_id[:8]}


def start_hidden_node(address: str, hidden: Path, log: Path) -> tuple[subprocess.Popen, Node]:
    """A `ray start` worker in its own mount namespace, where `hidden` is an empty tmpfs (plus hidden/out/ and a
    different hidden/other.pt): the files the driver has there do not exist on that node. Tried up to 4 times
    (a loaded machine can miss Ray's 30-s start-up window, and `ray start` then exits)."""
    import ray

    script = (f"mount -t tmpfs none {hidden} && mkdir {hidden}/out && printf not-the-weights > {hidden}/other.pt && "
              f"exec ray start --address={address} --num-cpus=1 --object-store-memory={STORE} --block")
    for _ in range(4):
        before = {n["NodeID"] for n in ray.nodes()}
        with open(log, "wb") as sink:
            proc = subprocess.Popen(["unshare", "-rm", "sh", "-c", script], start_new_session=True, stdout=sink,
                                    stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            new = [n for n in ray.nodes() if n["NodeID"] not in before and n["Alive"]]
            if new:
                return proc, Node(new[0]["NodeID"], new[0]["NodeManagerAddress"])
            time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    pytest.fail(f"ray start in a mount namespace did not join:\n{log.read_text()[-3000:]}")


def test_node_that_cannot_see_the_checkpoint_or_out(cluster, job: dict[str, Path], tmp_path: Path) -> None:
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"]).returncode != 0:
        pytest.skip("needs unshare with user and mount namespaces, to hide a folder from one node")
    import ray

    hidden = tmp_path / "hidden"
    hidden.mkdir()
    shutil.copy(job["model"], hidden / "model.pt")
    shutil.copy(job["model"], hidden / "other.pt")
    (hidden / "out").mkdir()
    proc, node = start_hidden_node(cluster.address, hidden, tmp_path / "ray-start.log")
    try:
        # The job stops before any work, naming the node and the fix; nothing was embedded.
        config = job["base"] / "hidden.yaml"
        config.write_text(job["config"].read_text().replace(str(job["model"]), str(hidden / "model.pt")))
        out = tmp_path / "out-local"
        result = CliRunner().invoke(cli, ["embed", str(job["fasta"]), "--config", str(config), "--out", str(out),
                                          "--address", cluster.address])
        assert result.exit_code == 1, result.output
        message = result.output.strip().splitlines()[-1]
        assert f"not readable on Ray node {node.name} (No such file or directory)" in message
        assert "same path, or pass a hub name" in message
        assert not parts(out)

        with pytest.raises(RunnerError, match=rf"other.pt on Ray node {node.node_id[:8]}.* is not the driver's "
                                              rf"\(15 bytes there"):
            check_weights_on_nodes(ray, str(hidden / "other.pt"), [node])
        with pytest.raises(RunnerError, match=rf"on Ray node {node.node_id[:8]}.*: the driver's files are not there"
                                              r".*every node mounts at the same path"):
            check_out_on_nodes(ray, hidden / "out", [node])
        others = [Node(n.node_id, n.node_ip_address) for n in cluster.worker_nodes]
        assert check_out_on_nodes(ray, hidden / "out", others) == len(others)  # the shared nodes pass
        assert check_weights_on_nodes(ray, str(hidden / "model.pt"), others) == len(others)
        assert not list((hidden / "out").iterdir())  # no probe file left behind
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Until Ray marks the killed node dead (missed heartbeats), the next job's pre-flight check would still
        # pick it and stop, rightly, on a node that cannot run its check task.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            time.sleep(1)


def test_batch_that_kills_its_actor_every_time_stops_the_job(cluster, job: dict[str, Path], one_node: dict,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray retries batches without limit (a lost node must not use them up), so the bound on a batch that takes
    its actor down every time is the actors' own count: the fourth death of one batch stops the job with one line
    naming its sequences; what was written is each id once, and the rerun without the poison resumes to the end."""
    monkeypatch.setenv("RUNNER_TEST_CRASH_IDS", "s7")
    out = job["base"] / "poison"
    result = CliRunner().invoke(cli, embed_args(job, out, cluster.address))
    assert result.exit_code == 1, result.output
    # The job's one line (Ray may print its own notices about the hidden node stopped by the test before).
    (line,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "took its embedding actor's process down 4 times" in line and "s7" in line, result.output
    assert manifest(out)["status"] == "aborted"
    written = pa.concat_tables([pa.ipc.open_file(p).read_all() for p in parts(out)]) if parts(out) else None
    ids = [] if written is None else written.column("id").to_pylist()
    assert len(ids) == len(set(ids)) and "s7" not in ids

    monkeypatch.delenv("RUNNER_TEST_CRASH_IDS")
    result = CliRunner().invoke(cli, embed_args(job, out, cluster.address), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert_same_as_one_node(out, one_node)
