"""The nightly `train` stage as a Kubeflow job (`job_kind` pytorchjob / trainjob): the worker prepares and stages
the night, submits the job and watches it, and logs the bundle the job left, as a local night logs its own.

The Kubernetes control plane is a FAKE (`tests/fake_kube.py`: no cluster runs here); the client calls, the staged
files, the job's command (the rendered torchrun line, on this machine) and the trainer are the real ones.
"""

from __future__ import annotations

import logging
from datetime import date, timedelta
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from pipeline.errors import TrainingFailed
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap
from pipeline.stages.train import train
from pipeline.tags import Tag
from tests.fake_kube import FakeKube
from tests.helpers import LOANS_SPEC
from tests.integration.test_drift_policies import put_day, stream_day
from tests.integration.test_resume_training import BUCKET, s3  # noqa: F401 - the S3 emulator fixture

pytestmark = [pytest.mark.integration, pytest.mark.slow]
DAY = date(2026, 6, 10)


@pytest.fixture
def home(settings_factory, tmp_path):
    """A champion bootstrapped on three days and a fourth day validated, with settings for the job runner."""
    # The job trains the warm start only (refit and challengers are not staged): the local night matches it
    # when it trains the warm start only too.
    s = settings_factory(spec_path=LOANS_SPEC, epochs=2, batch_size=64, lr_candidates=(), refit_max_rows=0)
    history = pd.concat([stream_day(DAY - timedelta(days=d), 800, seed=1) for d in (3, 2, 1)])
    history.to_parquet(tmp_path / "history.parquet")
    rt = runtime(s)
    bootstrap(tmp_path / "history.parquet", rt)
    put_day(rt, DAY, stream_day(DAY, 2000, seed=5))
    return s


def job_args(job: dict) -> list[str]:
    if job["kind"] == "PyTorchJob":
        return job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"]
    return job["spec"]["trainer"]["command"]


def as_job(s, kind: str, **cluster):
    return s.model_copy(update={"cluster": s.cluster.model_copy(update={
        "runner": "kubernetes", "job_kind": kind, "poll_s": 0.5, "kueue_queue": "flywheel-training", **cluster})})


@pytest.mark.parametrize(("kind", "procs"), [("pytorchjob", 1), ("trainjob", 1), ("pytorchjob", 2)])
def test_a_night_trained_as_a_kubeflow_job_equals_the_night_trained_locally(home, kind, procs, tmp_path,
                                                                              monkeypatch, caplog):
    """One process: the same weights as the worker's own training. Two (DDP, gloo): the same loss curve up to
    float summation order."""
    caplog.set_level(logging.INFO, logger="flywheel")
    with FakeKube(tmp_path / "kube", procs=procs, admit_after_s=1.0) as kube:
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
        s = as_job(home, kind, staging_uri=str(tmp_path / "staging"))
        rt = runtime(s)
        remote = train(DAY, rt)
    assert [j["kind"] for j in kube.created] == [{"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}[kind]]
    job = kube.created[0]
    client = rt.client()
    run = client.get_run(remote.run_id)
    assert run.data.tags[Tag.TRAINING_JOB] == f"{job['kind']}/{s.cluster.namespace}/{job['metadata']['name']}"
    assert remote.policy == "warm" and not remote.reused and remote.epochs_run == 2
    assert "waits for capacity" in caplog.text  # Kueue held it first, and the log said so
    staged = job_args(job)[-1]
    assert staged.startswith(str(tmp_path / "staging" / rt.model_name)) and not Path(staged).exists()
    # The same night trained in the worker: same weights (one process, same seed, same staged inputs).
    mlflow.delete_run(remote.run_id)
    local = train(DAY, runtime(home))
    assert not local.reused and local.run_id != remote.run_id
    here = client.get_run(local.run_id)
    assert Tag.TRAINING_JOB not in here.data.tags
    curve = [m.value for m in client.get_metric_history(remote.run_id, "train_loss")]
    assert curve == pytest.approx([m.value for m in client.get_metric_history(local.run_id, "train_loss")],
                                  rel=1e-6 if procs == 1 else 1e-3)
    assert (run.data.tags[Tag.WEIGHTS] == here.data.tags[Tag.WEIGHTS]) is (procs == 1)
    assert run.data.metrics["calibration_scale"] == pytest.approx(here.data.metrics["calibration_scale"],
                                                                  rel=1e-6 if procs == 1 else 1e-2)


def test_a_night_staged_in_object_storage_trains_on_pods_that_share_no_disk(home, tmp_path, monkeypatch, s3):  # noqa: F811
    """The production profile: the night goes through object storage (moto's S3 emulator stands in for it: the
    store is outside this machine), and the job's process gets the store's credentials, not the worker's disk."""
    environ, client = s3
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    with FakeKube(tmp_path / "kube") as kube:
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
        rt = runtime(as_job(home, "pytorchjob", staging_uri=f"s3://{BUCKET}/staging", kueue_queue=None))
        out = train(DAY, rt)
    staged = job_args(kube.created[0])[-1]
    assert staged.startswith(f"s3://{BUCKET}/staging/{rt.model_name}/")
    night = staged.removeprefix(f"s3://{BUCKET}/")
    left = client.list_objects_v2(Bucket=BUCKET, Prefix="staging/").get("Contents", [])
    assert not [o["Key"] for o in left if o["Key"].startswith(night) or o["Size"]]  # removed once logged
    assert not (tmp_path / "home" / "staging").exists()
    assert rt.client().get_run(out.run_id).data.tags[Tag.TRAINING_JOB].startswith("PyTorchJob/")


def test_a_failed_job_fails_the_night_and_its_retry_replaces_it(home, tmp_path, monkeypatch):
    with FakeKube(tmp_path / "kube") as kube:
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
        rt = runtime(as_job(home, "pytorchjob", staging_uri=str(tmp_path / "staging"), kueue_queue=None))
        kube.fail_next = True
        with pytest.raises(TrainingFailed, match=r"failed: JobFailed: worker exited with code 1.*kubectl logs"):
            train(DAY, rt)
        assert len(kube.jobs) == 1  # kept for `kubectl logs`
        retried = train(DAY, rt)  # the same name exists and failed: deleted and submitted again
        assert len(kube.created) == 2 and kube.created[0]["metadata"]["name"] == kube.created[1]["metadata"]["name"]
        assert retried.policy == "warm" and rt.client().get_run(retried.run_id).info.status == "FINISHED"
        again = train(DAY, rt)  # a finished night is reused: no third job
        assert again.reused and len(kube.created) == 2


def test_no_cluster_is_a_clear_error(home, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(Exception, match="no Kubernetes cluster to submit the training job to"):
        train(DAY, runtime(as_job(home, "pytorchjob", staging_uri=str(tmp_path / "staging"))))
