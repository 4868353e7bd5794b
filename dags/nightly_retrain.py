"""
### Flywheel nightly retrain

For the run's logical date **D**: wait until D's labels can have arrived, collect D's prediction log joined with
its feedback, validate it (bad rows to `quarantine/dt=D`), warm-start the champion on D, evaluate candidate vs
champion on D's latest, held-out slice (report with plots on the training run), register the candidate with its
lineage, wait for a reviewer if `promotion_mode=review` (deferred: no worker slot held; set the tag
`flywheel.approval` = `approved` | `rejected` on the version in MLflow), promote it if it passed, and roll it out
to the model server. Whatever happened before, `loop_health` ends the run with the nights without training and
without a promotion: it warns after `loop_health_warn_nights`, and after `loop_health_fail_nights` fails and calls
the alert hook named by `loop_health_callback`.

Trigger a past day with an explicit logical date (UI "Trigger DAG w/ config" or REST); backfills run days in
order (one active run at a time, so each day warm-starts from the previous day's result). Re-running a day is
idempotent. With `training_runner=kubernetes`, `train` launches the GPU training pod (pool `gpu_pool`) instead of
training in the worker; its result comes back through the pod's XCom sidecar. Every task is one call into
`pipeline/`; `flywheel <stage> --day D` runs the same code by hand.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
from airflow.sdk import Asset, dag, task, teardown

from pipeline.orchestration import airflow_tasks as t
from pipeline.orchestration.review_trigger import AwaitApprovalOperator

TRAINING_DAY = Asset(name="flywheel_training_day", uri="file:///flywheel/lake/training")


@dag(
    dag_id="flywheel_nightly",
    schedule=t.schedule(),
    start_date=pendulum.datetime(1970, 1, 2, tz="UTC"),  # any historical day may be triggered or backfilled
    catchup=False,
    max_active_runs=1,
    tags=["flywheel", "training"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=10), "owner": "flywheel"},
)
def flywheel_nightly():
    wait_for_labels = DateTimeSensorAsync(
        task_id="wait_for_labels",
        target_time="{{ (logical_date + macros.timedelta(days=1, seconds=LAG)).isoformat() }}".replace(
            "LAG", str(t.label_lag_s())
        ),
    )

    @task(outlets=[TRAINING_DAY])
    def collect(ds: str | None = None) -> dict:
        return t.collect(ds)

    @task
    def validate(collected: dict) -> dict:
        return t.validate(collected["day"])

    @task
    def train(validated: dict) -> dict:
        return t.train(validated["day"])

    @task
    def evaluate(trained: dict) -> dict:
        return t.evaluate(trained["day"], trained)

    @task
    def register(evaluation: dict) -> dict:
        return t.register(evaluation["day"], evaluation)

    @task
    def promote(registered: dict, review: dict) -> dict:
        return t.promote(registered, review)

    @task
    def rollout(promoted: dict) -> dict:
        return t.rollout(promoted)

    # A teardown: it runs whatever the stages did, does not turn a failed night into a successful run, and
    # fails the run itself when the loop has been stuck too long.
    @teardown(on_failure_fail_dagrun=True)
    @task(on_failure_callback=t.loop_health_alert)
    def loop_health(ds: str | None = None) -> dict:
        return t.loop_health(ds)

    collected = collect()
    wait_for_labels >> collected
    validated = validate(collected)
    if t.training_runner() == "kubernetes":
        pod = t.train_pod_operator("train")
        validated >> pod
        trained = pod.output
    else:
        trained = train(validated)
    registered = register(evaluate(trained))
    review = AwaitApprovalOperator(task_id="await_approval", registered=registered)
    rollout(promote(registered, review.output)) >> loop_health()


flywheel_nightly()
