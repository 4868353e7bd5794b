"""Two processes under torchrun (gloo on CPU) follow the single-process loss curve: the trainer's batch split and
loss scaling make DDP a speed-up, not a different optimiser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pytest

from feature_store.spec import load_spec
from pipeline.learn.model import ModelBundle
from tests.helpers import LOANS_SPEC, loans_frame

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
