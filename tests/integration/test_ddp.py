"""Two processes under torchrun (gloo on CPU) follow the single-process loss curve: the trainer's batch split and
loss scaling make DDP a speed-up, not a different optimiser."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from feature_store.spec import load_spec
from pipeline.cluster.jobs import ELASTIC_ENV
from pipeline.learn.model import ModelBundle
from tests.helpers import LOANS_SPEC, free_port, loans_frame

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def run(launcher: list[str], data: Path, out: Path, init: Path) -> dict:
    args = ["-m", "pipeline.learn.ddp_train", "--data", str(data), "--out", str(out), "--spec", str(LOANS_SPEC),
            "--init", str(init),
            "--epochs", "3", "--batch-size", "64", "--lr", "0.01", "--seed", "5", "--device", "cpu",
            "--checkpoint-every", "0"]
    subprocess.run([*launcher, *args], check=True, cwd=ROOT, timeout=120,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    return json.loads((out / "result.json").read_text())


def test_two_process_ddp_matches_one_process(tmp_path):
    parent = ModelBundle.create(load_spec(LOANS_SPEC), loans_frame(date(2026, 2, 28), 500, seed=9), embedding_dim=4,
                                hidden=(16,), min_count=1, seed=1).save(tmp_path / "parent")
    data = tmp_path / "data.parquet"
    loans_frame(date(2026, 3, 1), 2000, seed=9).to_parquet(data)  # new accounts: the warm start grows tables
    single = run([sys.executable], data, tmp_path / "one", parent)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    ddp = run([torchrun, "--standalone", "--nproc_per_node=2"], data, tmp_path / "two", parent)
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["steps"] == single["steps"]
    np.testing.assert_allclose(ddp["losses"], single["losses"], rtol=1e-4)
    assert single["losses"][-1] < single["losses"][0]
    grown = ModelBundle.load(tmp_path / "two")
    assert grown.vocabs["account_no"].size > ModelBundle.load(parent).vocabs["account_no"].size
    assert grown.weights_digest() != ModelBundle.load(parent).weights_digest()


def test_standalone_warm_start_applies_a_declared_migration(tmp_path):
    import yaml

    from pipeline.learn.ddp_train import main

    spec = load_spec(LOANS_SPEC)
    parent = ModelBundle.create(spec, loans_frame(date(2026, 2, 28), 300, seed=9), embedding_dim=4, hidden=(8,),
                                min_count=1, seed=1).save(tmp_path / "parent")
    data = yaml.safe_load(LOANS_SPEC.read_text())
    data["features"]["score_v2"] = {"type": "numeric"}
    data["migrations"] = [{"added": ["score_v2"]}]
    (tmp_path / "v2.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    rows = loans_frame(date(2026, 3, 1), 400, seed=9)
    rows["score_v2"] = np.random.default_rng(0).normal(50, 5, len(rows))
    rows.to_parquet(tmp_path / "data.parquet")
    out = main(["--data", str(tmp_path / "data.parquet"), "--out", str(tmp_path / "out"), "--spec",
                str(tmp_path / "v2.yaml"), "--init", str(parent), "--epochs", "1", "--batch-size", "64",
                "--device", "cpu", "--checkpoint-every", "0"])
    migrated = ModelBundle.load(tmp_path / "out")
    assert migrated.spec_digest == load_spec(tmp_path / "v2.yaml").digest and "score_v2" in migrated.numeric
    assert abs(migrated.norm["score_v2"][0] - 50) < 2 and np.isfinite(out["losses"]).all()


def _agent(torchrun: str, port: int, host: bool, args: list[str], log: Path) -> subprocess.Popen:
    """One torchrun agent (a 'node' with one CPU worker) of an elastic 1..2-node job on a c10d rendezvous."""
    conf = f"is_host={'true' if host else 'false'},last_call_timeout=3,keep_alive_interval=1,keep_alive_max_attempt=3"
    cmd = [torchrun, "--nnodes=1:2", "--nproc_per_node=1", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=flywheel-elastic-test", f"--rdzv-conf={conf}",
           "--max-restarts=5", "--monitor-interval=1", "-m", "pipeline.learn.ddp_train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           **{e["name"]: e["value"] for e in ELASTIC_ENV}}  # what the rendered PyTorchJob/TrainJob set
    return subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env)


def _wait(cond, what: str, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert all(p.poll() in (None, 0) for p in procs), f"an agent failed while waiting for {what}"
        time.sleep(0.05)


def _kill_node(agent: subprocess.Popen) -> None:
    """SIGKILL an agent and its workers (torchrun starts each worker in its own session, so not by group)."""
    import psutil

    try:
        procs = [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _starts(out: Path) -> list[int]:
    path = out / "starts.jsonl"
    return [json.loads(line)["world_size"] for line in path.read_text().splitlines()] if path.exists() else []


def _newest_step(ck: Path) -> int:
    return max((int(p.stem.split("-")[1]) for p in ck.glob("ckpt-*.pt")), default=0)


@dataclass
class ElasticRun:
    single: dict  # the uninterrupted one-process run's result
    out: Path
    ck: Path
    host: subprocess.Popen  # agent a: hosts the c10d store, holds rank 0 (ranks follow the agents' pids)
    other: subprocess.Popen  # agent b
    port: int  # the rendezvous endpoint's
    args: list[str]  # ddp_train's, for a node that joins later

    def log(self, agent: str) -> str:
        return (self.out.parent / f"{agent}.log").read_text()[-3000:]

    def result(self) -> dict:
        return json.loads((self.out / "result.json").read_text())


@contextlib.contextmanager
def elastic_pair(tmp_path: Path, epochs: int, checkpoint_every: int, lr: str = "0.01"):
    """The one-process reference run, then the same job as two torchrun nodes (1..2) on a c10d rendezvous;
    both nodes are killed on the way out, whatever the test did to them."""
    data = tmp_path / "data.parquet"
    loans_frame(date(2026, 3, 1), 6000, seed=9).to_parquet(data)
    common = ["--data", str(data), "--spec", str(LOANS_SPEC), "--epochs", str(epochs), "--batch-size", "32",
              "--lr", lr, "--seed", "5", "--device", "cpu", "--checkpoint-every", str(checkpoint_every)]
    subprocess.run([sys.executable, "-m", "pipeline.learn.ddp_train", *common, "--out", str(tmp_path / "one")],
                   check=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    single = json.loads((tmp_path / "one" / "result.json").read_text())
    out, ck = tmp_path / "elastic", tmp_path / "ck"
    args = [*common, "--out", str(out), "--checkpoint-dir", str(ck)]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    port = free_port()
    a = _agent(torchrun, port, True, args, tmp_path / "a.log")
    b = _agent(torchrun, port, False, args, tmp_path / "b.log")
    try:
        _wait(lambda: _starts(out)[:1] == [2] and _newest_step(ck) > 0, "a 2-worker checkpoint", [a, b])
        yield ElasticRun(single, out, ck, a, b, port, args)
    finally:
        _kill_node(a)
        _kill_node(b)


@pytest.mark.slow
def test_elastic_job_survives_a_node_leaving_and_another_joining(tmp_path):
    """torchrun --nnodes=1:2 (c10d): kill one of two nodes mid-epoch, and the job restarts with world size 1 from
    the last checkpoint; a new node joins, and it restarts again with world size 2. It finishes on the
    uninterrupted loss curve because the batch is global and the split follows the world size. (Long enough for
    the join, 30 epochs; at lr 0.01 even an uninterrupted 2-process run drifts from the 1-process curve by up to 10 %
    over 30 epochs, float summation order amplified by the optimiser, so this run uses lr 0.001, where the two agree
    to 1e-6.)"""
    with elastic_pair(tmp_path, epochs=30, checkpoint_every=10, lr="0.001") as run:
        _kill_node(run.other)  # the node is gone: agent and worker, no goodbye
        run.other.wait(timeout=30)
        assert _newest_step(run.ck) < run.single["steps"] // 4, "the kill came too late to test anything"
        _wait(lambda: _starts(run.out) == [2, 1], "the job going on alone", [run.host])
        joined = _agent(str(Path(sys.executable).with_name("torchrun")), run.port, False, run.args,
                        tmp_path / "c.log")
        try:
            _wait(lambda: _starts(run.out) == [2, 1, 2], "the new node joining", [run.host, joined])
            assert run.host.wait(timeout=600) == 0, run.log("a")
            assert joined.wait(timeout=60) == 0, run.log("c")
        finally:
            _kill_node(joined)
    elastic = run.result()
    assert elastic["world_size"] == 2 and 0 < elastic["resumed_at_step"] and elastic["steps"] == run.single["steps"]
    np.testing.assert_allclose(elastic["losses"], run.single["losses"], rtol=1e-3)


def _worker(agents: list[subprocess.Popen], rank: int):
    """The worker process that holds `rank` (its environment says so), under whichever agent started it."""
    import psutil

    for agent in agents:
        try:
            children = psutil.Process(agent.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for p in children:
            try:
                if p.environ().get("RANK") == str(rank) and "ddp_train" in " ".join(p.cmdline()):
                    return p
            except psutil.Error:
                continue
    return None


@pytest.mark.slow
def test_a_preempted_node_holding_rank_1_saves_its_step_and_no_work_is_lost(tmp_path):
    """Kubernetes preempts a pod with SIGTERM and a grace period; torchrun's agent passes it to its workers, which
    need not hold rank 0. The node holding rank 1 is preempted after rank 0's first periodic checkpoint: its
    worker saves a checkpoint at its next step, and the job continues on the other node from exactly that step
    (not from the periodic one) and ends on the one-process loss curve."""
    import signal

    with elastic_pair(tmp_path, epochs=3, checkpoint_every=100) as run:
        assert _worker([run.other], 1) is not None, "ranks follow the agents' pids: agent b's worker holds rank 1"
        run.other.send_signal(signal.SIGTERM)  # the pod's main process: what the kubelet signals on preemption
        assert run.other.wait(timeout=60) != 0
        saved_at = _newest_step(run.ck)
        assert "saved after SIGTERM" in run.log("b"), run.log("b")
        assert 0 < saved_at < run.single["steps"], "the SIGTERM came too late to test anything"
        assert run.host.wait(timeout=600) == 0, run.log("a")
    assert _starts(run.out) == [2, 1]
    elastic = run.result()
    assert elastic["resumed_at_step"] == saved_at and elastic["steps"] == run.single["steps"]
    np.testing.assert_allclose(elastic["losses"], run.single["losses"], rtol=1e-3)
