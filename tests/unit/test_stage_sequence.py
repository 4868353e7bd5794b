"""The one declaration of the nightly sequence: what each stage is called with, in-process (pydantic results)
and in Airflow (their XCom dicts) alike, and when a stage is skipped."""

from __future__ import annotations

import inspect

import pytest

from pipeline.orchestration.airflow_tasks import stage_task_ids
from pipeline.orchestration.run_note import STAGES
from pipeline.stages.promote import PromoteResult
from pipeline.stages.sequence import NIGHTLY, STAGE_NAMES, stage
from pipeline.stages.train import TrainResult


def test_every_stage_resolves_to_a_function_taking_its_declared_arguments():
    assert STAGE_NAMES == ("collect", "validate", "train", "evaluate", "register", "promote", "rollout")
    for s in NIGHTLY:
        params = list(inspect.signature(s.function()).parameters)
        assert params[int(s.dated) + len(s.inputs)] == "rt", s.name  # the in-process runner passes it next
        assert s.doc, s.name


def test_arguments_come_from_models_or_their_dicts_alike():
    trained = TrainResult.model_construct(run_id="r1", day="2026-03-10")
    assert stage("evaluate").arguments("2026-03-10", {"train": trained}) == ["2026-03-10", "r1"]
    assert stage("evaluate").arguments("2026-03-10", {"train": {"run_id": "r1"}}) == ["2026-03-10", "r1"]
    assert stage("promote").arguments("2026-03-10", {"register": {"version": "4"}}) == ["4"]
    assert stage("register").arguments("d", {"evaluate": {"x": 1}}) == ["d", {"x": 1}]
    assert stage("collect").needs() == () and stage("rollout").needs() == ("promote",)


def test_rollout_is_skipped_with_the_reason_unless_promoted():
    lost = PromoteResult(version="3", promoted=False, previous=None, reason="auc regressed")
    assert stage("rollout").skip_reason({"promote": lost}) == "promote.promoted is false: auc regressed"
    assert stage("rollout").skip_reason({"promote": {**lost.model_dump(), "promoted": True}}) is None
    assert stage("train").skip_reason({}) is None


def test_the_run_note_reads_the_tasks_the_dag_makes():
    assert STAGES == stage_task_ids() == (*STAGE_NAMES[:5], "await_approval", *STAGE_NAMES[5:])


def test_a_decision_fails_the_task_at_once_and_a_fault_is_left_to_retries():
    """Every `Decision` (a refused night, a failed training job, a passed deadline) is final; a `Fault` is not."""
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.errors import DeadlinePassed, Preempted, TrainingFailed
    from pipeline.orchestration.airflow_tasks import _stage

    def raising(error: Exception):
        def fn():
            raise error
        return fn

    for final in (TrainingFailed("PyTorchJob failed"), DeadlinePassed("too late")):
        with pytest.raises(AirflowFailException, match=str(final)):
            _stage(raising(final))
    with pytest.raises(Preempted):
        _stage(raising(Preempted("node drained")))
