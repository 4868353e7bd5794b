"""Preemption is normal: the pod's entry point (`python -m pipeline.learn.ddp_train`) killed at several points
resumes from the newest checkpoint and ends with the same weights as a run that was never interrupted.

- SIGKILL mid-epoch with checkpoints in object storage (moto's S3 emulator standing in for the production store,
  which is outside this machine): the retry, a fresh process with a fresh disk, finds them there.
- SIGTERM (what Kubernetes sends a preempted pod first): a checkpoint is saved at the next step, the process exits
  143, the retry resumes from that step.
- A kill while a checkpoint was being written: a half-written newest file (a store without atomic writes) and a
  stray temp file are skipped, the retry resumes from the checkpoint before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

import pandas as pd
import pytest

from tests.helpers import LOANS_SPEC, free_port, loans_frame

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BUCKET = "flywheel-ckpt"
CREDS = {"AWS_ACCESS_KEY_ID": "emulator-key", "AWS_SECRET_ACCESS_KEY": "emulator-secret",
         "AWS_DEFAULT_REGION": "us-east-1"}


def command(data: Path, out: Path, ckpt: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.learn.ddp_train", "--data", str(data), "--out", str(out), "--spec",
            str(LOANS_SPEC), "--epochs", "3", "--batch-size", "32", "--lr", "0.01", "--seed", "11",
            "--checkpoint-dir", ckpt, "--checkpoint-every", "25", "--device", "cpu"]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def interrupt(cmd: list[str], environ: dict, ready: Callable[[], bool], sig: int) -> int:
    """Start the training, wait until `ready()` (a checkpoint exists), send `sig`, return the exit code."""
    proc = subprocess.Popen(cmd, env=environ, cwd=ROOT)
    deadline = time.monotonic() + 180
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    return proc.wait(timeout=60)


def ckpts(directory: Path) -> list[Path]:
    return sorted(directory.glob("ckpt-*.pt")) if directory.is_dir() else []


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    day = date(2026, 3, 1)
    frame = pd.concat([loans_frame(day + timedelta(days=i), 1000, seed=3) for i in range(3)], ignore_index=True)
    path = tmp_path_factory.mktemp("data") / "data.parquet"
    frame.to_parquet(path)
    return path


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("straight")
    subprocess.run(command(data, tmp / "out", str(tmp / "ck")), check=True, env=env(), cwd=ROOT, timeout=300)
    return json.loads((tmp / "out" / "result.json").read_text())


def resume(data: Path, out: Path, ckpt: str, environ: dict, straight: dict) -> dict:
    subprocess.run(command(data, out, ckpt), check=True, env=environ, cwd=ROOT, timeout=300)
    resumed = json.loads((out / "result.json").read_text())
    assert 0 < resumed["resumed_at_step"] < straight["steps"]
    assert resumed["steps"] == straight["steps"] and resumed["losses"] == straight["losses"]
    assert resumed["weights_digest"] == straight["weights_digest"]
    return resumed


@pytest.fixture(scope="module")
def s3():
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in CREDS.items()
                                                         if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield {**CREDS, "AWS_ENDPOINT_URL": endpoint}, client
    server.stop()


def test_sigkill_mid_epoch_resumes_from_object_storage(data, straight, s3, tmp_path):
    environ, client = s3
    prefix = "checkpoints/2026-03-01-v3"

    def keys() -> list[str]:
        found = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        return [o["Key"] for o in found if o["Key"].endswith(".pt")]

    uri = f"s3://{BUCKET}/{prefix}"
    code = interrupt(command(data, tmp_path / "out", uri), env(**environ), lambda: bool(keys()), signal.SIGKILL)
    assert code == -signal.SIGKILL, "training finished before it could be killed"
    assert keys() and not (tmp_path / "out" / "result.json").exists()
    assert not list(tmp_path.rglob("ckpt-*.pt")), "nothing a retry needs is on the local disk"
    resume(data, tmp_path / "out", uri, env(**environ), straight)
    assert keys() == [], "a finished run leaves no checkpoint to resume by mistake"


def test_sigterm_saves_a_checkpoint_and_exits_143(data, straight, tmp_path):
    ck = tmp_path / "ck"
    code = interrupt(command(data, tmp_path / "out", str(ck)), env(), lambda: bool(ckpts(ck)), signal.SIGTERM)
    assert code == 143
    saved = int(ckpts(ck)[-1].stem.split("-")[1])  # the checkpoint SIGTERM asked for, at the next step
    resumed = resume(data, tmp_path / "out", str(ck), env(), straight)
    assert resumed["resumed_at_step"] == saved
    assert ckpts(ck) == []


def test_kill_while_writing_a_checkpoint_falls_back_to_the_one_before(data, straight, tmp_path):
    ck = tmp_path / "ck"
    code = interrupt(command(data, tmp_path / "out", str(ck)), env(), lambda: len(ckpts(ck)) >= 2, signal.SIGKILL)
    assert code == -signal.SIGKILL
    older, newest = ckpts(ck)[-2:]
    blob = newest.read_bytes()
    newest.write_bytes(blob[: len(blob) // 2])  # what a kill mid-upload leaves on a store without atomic PUTs
    (ck / f".tmp-1-{newest.name}").write_bytes(blob[:100])  # a local temp file the kill left behind
    resumed = resume(data, tmp_path / "out", str(ck), env(), straight)
    assert resumed["resumed_at_step"] == int(older.stem.split("-")[1])
