"""Gate, promotion, review and rollback against a real MLflow server on the loans spec (with declared slices):
broken candidates are never promoted, the evidence lands on the run and the version, alias moves are guarded."""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipeline import registry
from pipeline.errors import AliasConflict, StageError
from pipeline.learn.model import ModelBundle
from pipeline.learn.trainer import fit
from pipeline.release.review import APPROVED, REJECTED, decide, request_review
from pipeline.release.rollback import rollback
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap
from pipeline.stages.evaluate import evaluate
from pipeline.stages.promote import promote
from pipeline.stages.register import register_candidate
from pipeline.stages.train import experiment
from pipeline.stages.validate import VALIDATED
from pipeline.tags import Alias, Tag
from tests.helpers import LOANS_SPEC, loans_frame

pytestmark = pytest.mark.integration
DAY = date(2026, 3, 10)
SLICES = ("slices:\n  account: {feature: account_no, kind: new_vs_returning}\n"
          "  region: {feature: region, top: 3}\n")


@pytest.fixture
def rt(settings_factory, tmp_path):
    spec = tmp_path / "loans_slices.yaml"
    spec.write_text(LOANS_SPEC.read_text() + SLICES)
    r = runtime(settings_factory(spec_path=spec, batch_size=64, min_slice_rows=60, bootstrap_samples=200,
                                   bootstrap_min_steps=0, bootstrap_epochs=6))
    history = pd.concat([loans_frame(DAY - timedelta(days=d), 400, seed=1) for d in (3, 2, 1)])
    path = tmp_path / "history.parquet"
    history.to_parquet(path)
    assert bootstrap(path, r).version == "1"
    day = loans_frame(DAY, 2000, seed=2)
    day["account_no"] = [f"new{i}" if i % 5 == 0 else a for i, a in enumerate(day.account_no)]  # new accounts
    day["defaulted"] = day["defaulted"].astype(float)
    r.lake.write_partition(VALIDATED, DAY, pa.Table.from_pandas(day, preserve_index=False))
    return r


def champion_bundle(rt) -> ModelBundle:
    return registry.load_version(rt.client(), rt.model_name, "1", rt.cache_dir)


def log_candidate(rt, bundle: ModelBundle, parent: str = "1") -> str:
    """A training run as `train` leaves it: parent/day tags and the bundle as the run's model."""
    experiment(rt)
    with mlflow.start_run(run_name=f"candidate-{DAY}") as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tags({Tag.PARENT: parent, Tag.DAY: DAY.isoformat(),
                         Tag.WEIGHTS: bundle.weights_digest()})
        registry.log_bundle(bundle, rt.spec, Path(tmp))
    return run.info.run_id


def train_rows(rt) -> pd.DataFrame:
    frame = rt.lake.read_partition(VALIDATED, DAY).to_pandas().sort_values("applied_at")
    return frame.iloc[: int(len(frame) * 0.8)].reset_index(drop=True)


def good(rt) -> ModelBundle:
    b = champion_bundle(rt)
    b.grow_vocab(train_rows(rt), rt.settings.training.vocab_min_count)
    fit(b, train_rows(rt), "defaulted", epochs=1, batch_size=64, lr=1e-3, seed=0)
    return b


def labels_flipped(rt) -> ModelBundle:
    b = champion_bundle(rt)
    rows = train_rows(rt).assign(defaulted=lambda f: 1.0 - f.defaulted)
    fit(b, rows, "defaulted", epochs=15, batch_size=64, lr=3e-3, seed=0)
    return b


def features_shuffled(rt) -> ModelBundle:
    rows = train_rows(rt)
    rng = np.random.default_rng(0)
    for c in rt.spec.feature_names:  # every feature column permuted against the labels: no signal left
        rows[c] = rows[c].to_numpy()[rng.permutation(len(rows))]
    b = ModelBundle.create(rt.spec, rows, 8, (64, 32), 2, seed=0)
    fit(b, rows, "defaulted", epochs=10, batch_size=64, lr=3e-3, seed=0)
    return b


def nan_weights(rt) -> ModelBundle:
    import torch

    b = champion_bundle(rt)
    with torch.no_grad():
        next(b.net.mlp.parameters())[0, 0] = float("nan")
    return b


def test_a_good_candidate_passes_with_report_tags_and_is_promoted_then_rolled_back(rt):
    run_id = log_candidate(rt, good(rt))
    ev = evaluate(DAY, run_id, rt)
    assert ev.passed, ev.reason
    assert {c.name for c in ev.checks} >= {"valid_scores", "auc_floor", "auc_vs_champion", "logloss_vs_champion",
                                          "ece_ceiling", "slice:account=new", "slice:account=returning"}
    assert ev.auc_diff.low <= ev.auc_diff.estimate <= ev.auc_diff.high
    acct = {s.value: s for s in ev.slices if s.slice == "account"}
    # the 80 brand-new accounts, plus those the parent saw fewer than vocab_min_count times (no own embedding)
    assert acct["new"].rows >= 80 and acct["new"].rows + acct["returning"].rows == 400 and acct["new"].gated
    report = Path(ev.report_path).read_text()
    assert "PASSED" in report and "data:image/png;base64," in report and "slice:account=new" in report
    client = rt.client()
    logged = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert logged == {"evaluation/report.html", "evaluation/reliability.png", "evaluation/slices.png"}
    assert client.get_run(run_id).data.metrics["holdout_ece_candidate"] < 0.1

    reg = register_candidate(DAY, ev, rt)
    v = registry.get_version(client, rt.model_name, reg.version)
    assert v.tags[Tag.EVAL_REPORT] == f"runs:/{run_id}/evaluation/report.html"
    assert v.tags[Tag.GATE_CHECKS].endswith("checks passed") and "{" not in v.tags[Tag.AUC_DIFF_CI]
    assert registry.get_alias(client, rt.model_name, Alias.CHALLENGER).version == reg.version
    assert promote(reg.version, rt).promoted
    assert registry.get_alias(client, rt.model_name, Alias.CHAMPION).version == reg.version
    assert registry.get_alias(client, rt.model_name, Alias.PREVIOUS).version == "1"

    rb = rollback("bad canary", rt=rt)
    assert (rb.rolled_back, rb.restored) == (reg.version, "1")
    assert registry.get_alias(client, rt.model_name, Alias.CHAMPION).version == "1"
    assert registry.get_alias(client, rt.model_name, Alias.PREVIOUS) is None
    assert registry.get_alias(client, rt.model_name, Alias.CHALLENGER) is None
    bad = registry.get_version(client, rt.model_name, reg.version)
    assert bad.tags[Tag.ROLLED_BACK] == "true" and bad.tags["flywheel.rollback_reason"] == "bad canary"
    assert registry.get_version(client, rt.model_name, "1").tags["flywheel.restored_from"] == reg.version
    with pytest.raises(StageError, match="no 'previous' version"):
        rollback("again", rt=rt)
    again = promote(reg.version, rt)
    assert not again.promoted and "rolled back" in again.reason


@pytest.mark.parametrize("make, failing", [
    (labels_flipped, {"auc_floor", "auc_vs_champion"}),
    (features_shuffled, {"auc_vs_champion"}),
    (nan_weights, {"valid_scores"}),
])
def test_a_broken_candidate_is_never_promoted(rt, make, failing):
    run_id = log_candidate(rt, make(rt))
    ev = evaluate(DAY, run_id, rt)
    assert not ev.passed
    assert failing <= {c.name for c in ev.checks if not c.passed}, ev.reason
    assert "FAILED" in Path(ev.report_path).read_text()
    reg = register_candidate(DAY, ev, rt)
    client = rt.client()
    assert registry.get_version(client, rt.model_name, reg.version).tags["flywheel.gate_passed"] == "false"
    assert registry.get_alias(client, rt.model_name, Alias.CHALLENGER) is None
    result = promote(reg.version, rt)
    assert not result.promoted
    assert registry.get_alias(client, rt.model_name, Alias.CHAMPION).version == "1"
    with pytest.raises(StageError, match="cannot override the gate"):
        decide(reg.version, APPROVED, "mallory", rt=rt)


def _passing_version(rt, run_bundle: ModelBundle) -> str:
    run_id = log_candidate(rt, run_bundle)
    mv = registry.register(rt.client(), rt.model_name, run_id, {Tag.PARENT: "1",
                                                                 "flywheel.gate_passed": "true"})
    return mv.version


def test_two_runs_never_both_promote(rt):
    b = champion_bundle(rt)
    v2, v3 = _passing_version(rt, b), _passing_version(rt, b)
    barrier = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def race(version: str) -> None:
        client = registry.connect(rt.settings)
        barrier.wait()
        try:
            outcomes[version] = registry.move_champion(client, rt.model_name, version, "1", f"run-{version}")
        except AliasConflict as e:
            outcomes[version] = e

    threads = [threading.Thread(target=race, args=(v,)) for v in (v2, v3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    winners = [v for v, o in outcomes.items() if o == "1"]
    losers = [o for o in outcomes.values() if isinstance(o, AliasConflict)]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    client = rt.client()
    assert registry.get_alias(client, rt.model_name, Alias.CHAMPION).version == winners[0]
    assert registry.get_alias(client, rt.model_name, Alias.PREVIOUS).version == "1"
    # the loser, promoted later through the stage, is refused: its parent is no longer champion
    loser = v3 if winners[0] == v2 else v2
    with pytest.raises(StageError, match="another run promoted"):
        promote(loser, rt)
    with pytest.raises(StageError, match=f"not v{loser} as this rollback expected"):
        rollback("stale decision", expected_champion=loser, rt=rt)
    assert registry.get_alias(client, rt.model_name, Alias.CHAMPION).version == winners[0]


def test_review_mode_waits_for_an_approval_tag_then_promotes(settings_factory, rt):
    s = rt.settings.model_copy(update={"promotion_mode": "review", "approval_poll_interval_s": 0.2})
    rv = runtime(s)
    from pipeline.orchestration.review_trigger import ApprovalTrigger

    v2 = _passing_version(rv, champion_bundle(rv))
    first = request_review(v2, rv)
    assert first.waited and first.decision is None
    blocked = promote(v2, rv)
    assert not blocked.promoted and "review mode" in blocked.reason

    trigger = ApprovalTrigger(v2, time.time() + 30, 0.2, rv.model_name, s.mlflow_tracking_uri)
    classpath, kwargs = trigger.serialize()
    assert classpath == "pipeline.orchestration.review_trigger.ApprovalTrigger"

    async def wait_for_event():
        async def approve_later():
            await asyncio.sleep(0.8)
            await asyncio.to_thread(decide, v2, APPROVED, "alice", "looks fine", rv)

        task = asyncio.create_task(approve_later())
        start = time.monotonic()
        event = await anext(ApprovalTrigger(**kwargs).run())
        await task
        return event, time.monotonic() - start

    event, waited = asyncio.run(wait_for_event())
    assert event.payload == {"status": "decided", "version": v2, "decision": APPROVED} and waited >= 0.7
    result = promote(v2, rv)
    assert result.promoted
    tags = registry.get_version(rv.client(), rv.model_name, v2).tags
    assert tags[Tag.APPROVER] == "alice" and "flywheel.approval_at" in tags and "flywheel.promoted_at" in tags

    timeout = ApprovalTrigger(_passing_version(rv, champion_bundle(rv)), time.time() - 1, 0.1, rv.model_name,
                              s.mlflow_tracking_uri)
    assert asyncio.run(anext(timeout.run())).payload["status"] == "timeout"


def test_review_mode_rejection_and_a_malformed_tag(rt):
    rv = runtime(rt.settings.model_copy(update={"promotion_mode": "review"}))
    from pipeline.orchestration.review_trigger import ApprovalTrigger

    v2 = _passing_version(rv, champion_bundle(rv))
    decide(v2, REJECTED, "bob", rt=rv)
    assert not promote(v2, rv).promoted
    assert registry.get_alias(rv.client(), rv.model_name, Alias.CHAMPION).version == "1"
    rv.client().set_model_version_tag(rv.model_name, v2, "flywheel.approval", "yes please")
    event = asyncio.run(anext(ApprovalTrigger(v2, time.time() + 5, 0.1, rv.model_name,
                                              rv.settings.mlflow_tracking_uri).run()))
    assert event.payload["status"] == "error" and "expected 'approved' or 'rejected'" in event.payload["message"]


def test_await_approval_task_returns_at_once_in_auto_mode_and_defers_in_review_mode(rt, monkeypatch):
    from airflow.sdk.exceptions import TaskDeferred

    from pipeline.config import get_settings
    from pipeline.orchestration.review_trigger import ApprovalTrigger, AwaitApprovalOperator

    s = rt.settings
    v2 = _passing_version(rt, champion_bundle(rt))
    for key, value in {"HOME": str(s.home), "SPEC_PATH": str(s.spec_path), "MODEL_NAME": rt.model_name,
                       "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri, "APPROVAL_TIMEOUT_S": "120"}.items():
        monkeypatch.setenv(f"FLYWHEEL_{key}", value)
    op = AwaitApprovalOperator(task_id="await_approval", registered={"version": v2})
    try:
        get_settings.cache_clear()
        assert op.execute({}) == {"version": v2, "mode": "auto", "decision": None, "approver": None,
                                  "decided_at": None, "waited": False}
        monkeypatch.setenv("FLYWHEEL_PROMOTION_MODE", "review")
        get_settings.cache_clear()
        with pytest.raises(TaskDeferred) as deferred:
            op.execute({})
        trigger = deferred.value.trigger
        assert isinstance(trigger, ApprovalTrigger) and trigger.version == v2
        assert 100 < trigger.deadline - time.time() <= 120 and deferred.value.method_name == "execute_complete"
        decide(v2, APPROVED, "carol", rt=rt)
        done = op.execute_complete({}, {"status": "decided", "version": v2, "decision": APPROVED})
        assert done["decision"] == APPROVED and done["approver"] == "carol"
        tags = registry.get_version(rt.client(), rt.model_name, v2).tags
        assert "flywheel.approval_observed_at" in tags and "flywheel.review_requested_at" in tags
        from airflow.sdk.exceptions import AirflowFailException

        late = op.execute_complete({}, {"status": "timeout", "version": v2})  # decided in the last poll: it wins
        assert late["decision"] == APPROVED
        v3 = _passing_version(rt, champion_bundle(rt))
        with pytest.raises(AirflowFailException, match="clear this task to wait again"):
            op.execute_complete({}, {"status": "timeout", "version": v3})
        assert Tag.REVIEW_TIMED_OUT_AT in registry.get_version(rt.client(), rt.model_name, v3).tags
    finally:
        get_settings.cache_clear()


def test_flywheel_rollback_command_restores_previous_in_one_step(rt, monkeypatch):
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.config import get_settings

    s = rt.settings
    v2 = _passing_version(rt, champion_bundle(rt))
    registry.move_champion(rt.client(), rt.model_name, v2, "1", "test")
    for key, value in {"HOME": str(s.home), "SPEC_PATH": str(s.spec_path), "MODEL_NAME": rt.model_name,
                       "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri}.items():
        monkeypatch.setenv(f"FLYWHEEL_{key}", value)
    try:
        runner = CliRunner()
        stale = runner.invoke(app, ["rollback", "--reason", "x", "--expected-champion", "7"])
        assert stale.exit_code == 2 and "not v7" in stale.output
        done = runner.invoke(app, ["rollback", "--reason", "latency regression"])
        assert done.exit_code == 0, done.output
        body = json.loads(done.stdout[done.stdout.index("{"):])
        assert (body["rolled_back"], body["restored"], body["reason"]) == (v2, "1", "latency regression")
        assert registry.get_alias(rt.client(), rt.model_name, Alias.CHAMPION).version == "1"
        again = runner.invoke(app, ["rollback"])
        assert again.exit_code == 2 and "no 'previous' version" in again.output
    finally:
        get_settings.cache_clear()
