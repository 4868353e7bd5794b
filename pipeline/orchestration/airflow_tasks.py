"""The bodies of the DAGs' tasks: each runs one stage and returns its small result as a dict (XCom). The nightly's
stage tasks are made from `stages.sequence.NIGHTLY` (`nightly_stage_tasks`), not listed again here.

A `StageError` is a decision, not a glitch (no data, gate failed), so it fails the task without retries;
anything else is left to Airflow's retry policy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _stage(fn: Callable[..., Any], *args: Any) -> dict:
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    # a decision is the same on every retry: fail at once; nothing to train is not a failure: skip the rest
    from pipeline.errors import Decision, NothingToTrain

    try:
        return fn(*args).model_dump(mode="json")
    except NothingToTrain as e:
        _record_error(str(e))
        raise AirflowSkipException(str(e)) from e
    except Decision as e:
        _record_error(str(e))
        raise AirflowFailException(str(e)) from e


def _record_error(message: str) -> None:
    """Keep a stage's decision (why it stopped the night) where the run-note task can read it."""
    from airflow.sdk import get_current_context

    from pipeline.orchestration.run_note import ERROR_KEY

    try:
        get_current_context()["ti"].xcom_push(key=ERROR_KEY, value=message)
    except RuntimeError:  # called outside a running task (CLI, tests): the exception carries the message
        pass


def run_note(ti, dag_run) -> str:
    """Compose the night's one-line outcome from the stages' XComs and set it as the DAG run's note."""
    from pipeline.orchestration.run_note import ERROR_KEY, STAGES, compose, publish

    results = {s: ti.xcom_pull(task_ids=s) for s in STAGES}
    errors = {s: ti.xcom_pull(task_ids=s, key=ERROR_KEY) for s in STAGES}
    health = ti.xcom_pull(task_ids="loop_health") or {}
    alarm = ti.xcom_pull(task_ids="loop_health", key=ERROR_KEY)
    note = compose(results, errors, alarm or (health.get("message") if health.get("status") == "warn" else None))
    publish(dag_run.dag_id, dag_run.run_id, note)
    return note


def _timetable(cron: str):
    """A cron setting as a data-interval timetable (logical date = the interval's start), or None for
    manual/backfill only."""
    from airflow.sdk import CronDataIntervalTimetable

    from pipeline.config import SchedulesSettings

    return CronDataIntervalTimetable(cron, timezone="UTC") if SchedulesSettings.runs(cron) else None


def dag_defaults(doc: str | None, *tags: str, retries: int = 2, retry_delay_s: float = 30,
                 start: tuple[int, int, int] = (1970, 1, 2)) -> dict[str, Any]:
    """What every Flywheel DAG declares alike: one active run (each night builds on the last), no catch-up
    storm when a DAG is unpaused, the `flywheel` tag, the module docstring as the UI's documentation.

    The start date is far in the past because catch-up is off anyway, and a run triggered or backfilled for a
    logical date before the start date gets no task instances at all: Airflow marks it a success in
    milliseconds having run nothing (measured: a `flywheel_online_eval` run for 1994-01-03 under a 2024 start)."""
    from datetime import timedelta

    import pendulum

    default_args: dict[str, Any] = {"retries": retries, "owner": "flywheel"}
    if retries:
        default_args["retry_delay"] = timedelta(seconds=retry_delay_s)
    return {"start_date": pendulum.datetime(*start, tz="UTC"), "catchup": False, "max_active_runs": 1,
            "tags": ["flywheel", *tags], "doc_md": doc, "default_args": default_args}


def with_partition(result: dict, outlet_events, asset, day: str | None = None) -> dict:
    """Tag the task's asset event with the day it produced (partition key D)."""
    if outlet_events is not None and asset is not None:
        outlet_events[asset].add_partitions(day or result["day"])
    return result


def schedule():
    """The nightly DAG's timetable: a daily data interval (logical date = the day), or manual only."""
    from pipeline.config import get_settings

    return _timetable(get_settings().schedules.nightly)


def training_runner() -> str:
    """Where the nightly `train` task runs: `local` (the worker), `kubernetes` (the training pod) or `job` (the
    worker stages the night and submits a Kubeflow job). Read at parse time, so switching is config only."""
    from pipeline.config import get_settings

    cluster = get_settings().cluster
    return "job" if cluster.submits_job else cluster.runner


def gpu_pool() -> str:
    from pipeline.config import get_settings

    return get_settings().cluster.gpu_pool


def train_pod_operator(task_id: str = "train"):
    """The `train` task as a KubernetesPodOperator launching the rendered training pod in the GPU pool."""
    from pipeline.config import get_settings
    from pipeline.orchestration.k8s import training_pod_operator

    return training_pod_operator(get_settings(), task_id)


def label_lag_s() -> int:
    """How long after a day ends its labels may still arrive: the spec's attribution window plus lateness."""
    from feature_store.spec import load_spec
    from pipeline.config import get_settings

    s = get_settings()  # the spec alone, not a Runtime: DAG parsing must not pull in pandas
    return int(load_spec(s.spec_path).label.attribution_window.total_seconds() + s.collect.label_lateness_s)


def run_stage(name: str, ds: str | None, upstream: dict[str, dict], outlet_events=None, asset=None) -> dict:
    """The body of every nightly stage task: the day is the run's own (its logical date), never an upstream
    XCom; only the earlier results the stage declares it reads come through XCom."""
    from airflow.sdk.exceptions import AirflowSkipException

    from pipeline.stages.sequence import stage as declared

    stage = declared(name)
    if why := stage.skip_reason(upstream):
        raise AirflowSkipException(why)
    return with_partition(_stage(stage.function(), *stage.arguments(ds, upstream)), outlet_events, asset, ds)


def _stage_task(stage, asset=None, **options: Any):
    """`stage` as a TaskFlow task named after it: Airflow injects `ds`, `outlet_events` and, for a stage that
    reads earlier results, `upstream` (their XComs)."""
    from airflow.sdk import task

    def body(upstream: dict | None = None, ds: str | None = None, outlet_events=None) -> dict:
        return run_stage(stage.name, ds, upstream or {}, outlet_events, asset)

    return task(task_id=stage.name, doc_md=stage.doc, **({"outlets": [asset]} if asset else {}), **options)(body)


#: The reviewer's decision (a deferrable task, Airflow only) comes right before this stage.
REVIEW_TASK, REVIEW_BEFORE = "await_approval", "promote"


def nightly_stage_tasks(after, outlets: dict[str, Any]) -> dict[str, Any]:
    """One task per stage of `stages.sequence.NIGHTLY`, each after the one before (`after` first), keyed by
    task id in creation order; a stage's XComArg doubles as its task. Two steps exist only here: with
    `training_runner=kubernetes` the `train` stage is the training pod (with a Kubeflow job kind, the worker's
    `train` task that submits the job, in the GPU pool), and `REVIEW_TASK` (the reviewer's decision, deferred)
    comes before `REVIEW_BEFORE`."""
    from pipeline.orchestration.review_trigger import AwaitApprovalOperator
    from pipeline.stages.sequence import NIGHTLY

    tasks: dict[str, Any] = {}
    previous = after
    for stage in NIGHTLY:
        if stage.name == REVIEW_BEFORE:
            previous = tasks[REVIEW_TASK] = AwaitApprovalOperator(task_id=REVIEW_TASK, registered=tasks["register"])
        if stage.name == "train" and training_runner() == "kubernetes":
            made = train_pod_operator(stage.name).output
        else:
            upstream = {name: tasks[name] for name in stage.needs()}
            options = {"pool": gpu_pool()} if stage.name == "train" and training_runner() == "job" else {}
            made = _stage_task(stage, outlets.get(stage.name), **options)(
                **({"upstream": upstream} if upstream else {}))
        previous >> made
        previous = tasks[stage.name] = made
    return tasks


def stage_task_ids() -> tuple[str, ...]:
    """The nightly's stage tasks in order, the approval included (what `nightly_stage_tasks` makes)."""
    from pipeline.stages.sequence import STAGE_NAMES

    return tuple(task for name in STAGE_NAMES
                 for task in ((REVIEW_TASK, name) if name == REVIEW_BEFORE else (name,)))


def loop_health(ds: str) -> dict:
    """The DAG run's last line: nights without training / promotion. Fails the task (and so the run) past
    `loop_health_fail_nights`; the task's on_failure_callback (`loop_health_alert`) then calls the user's hook."""
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.checks.loop_health import report
    from pipeline.config import get_settings
    from pipeline.stages.nightly import loop_health as stage

    health = stage(ds)
    report(health, get_settings(), alert=False)
    if health.status == "fail":
        _record_error(health.message)
        raise AirflowFailException(health.message)
    return health.model_dump(mode="json")


def loop_health_alert(context: dict) -> None:
    """on_failure_callback of the `loop_health` task: the Airflow context plus the counts (key `loop_health`),
    handed to the callable named by `loop_health_callback`."""
    from pipeline.checks.loop_health import callback
    from pipeline.config import get_settings
    from pipeline.stages.nightly import loop_health as stage

    try:
        health = stage(context["ds"]).model_dump(mode="json")
    except Exception as e:  # the alert must still go out
        health = {"message": f"{context.get('exception')} (loop health could not be re-read: {e})"}
    callback(get_settings())({**context, "loop_health": health})


def materialize_schedule():
    """The feature materialization DAG's timetable (`materialize_schedule`), or manual only."""
    from pipeline.config import get_settings

    return _timetable(get_settings().schedules.materialize)


def materialize(data_interval_end=None, run_id: str | None = None) -> dict:
    """A scheduled run loads values as of its interval's end; a manual run loads everything ingested."""
    from pipeline.stages.materialize import materialize as stage

    manual = run_id is not None and run_id.startswith("manual")
    return _stage(stage, None if manual or data_interval_end is None else data_interval_end)


def online_eval_schedule():
    """The online evaluation DAG's timetable (`online_eval_schedule`), or manual only."""
    from pipeline.config import get_settings

    return _timetable(get_settings().schedules.online_eval)


def run_day(ds: str | None, partition_key: str | None) -> str:
    """The day a run is about: the asset partition that triggered it (a partitioned run has no logical date),
    else its logical date."""
    day = partition_key or ds
    if not day:
        raise ValueError("this run has neither a partition key nor a logical date: trigger it with a date")
    return day


def online_eval(ds: str) -> dict:
    import logging

    from pipeline.release.online_eval import online_eval as stage

    result = _stage(stage, ds)
    if result["decision"] == "rolled_back":  # visible in the task log, beside the XCom and the registry tags
        logging.getLogger("flywheel.online_eval").warning("AUTOMATIC ROLLBACK: %s", result["reason"])
    return result


def canary_eval(ds: str) -> dict:
    from pipeline.release.canary import canary_eval as stage

    return _stage(stage, ds)


def rollback(reason: str, expected_champion: str | None = None) -> dict:
    from pipeline.release.rollback import rollback as stage

    return _stage(stage, reason, expected_champion or None, "airflow flywheel_rollback")
