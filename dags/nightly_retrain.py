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

from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
from airflow.sdk import dag, task, teardown

from pipeline.orchestration import airflow_tasks as t
from pipeline.orchestration.assets import CANDIDATE, TRAINING_DAY, VALIDATED_DAY


@dag(
    dag_id="flywheel_nightly",
    schedule=t.schedule(),
    # any historical day may be triggered or backfilled
    **t.dag_defaults(__doc__, "training", retry_delay_s=10),
)
def flywheel_nightly():
    wait_for_labels = DateTimeSensorAsync(
        task_id="wait_for_labels",
        target_time="{{ (logical_date + macros.timedelta(days=1, seconds=LAG)).isoformat() }}".replace(
            "LAG", str(t.label_lag_s())
        ),
    )

    # A teardown: it runs whatever the stages did, does not turn a failed night into a successful run, and
    # fails the run itself when the loop has been stuck too long.
    @teardown(on_failure_fail_dagrun=True)
    @task(on_failure_callback=t.loop_health_alert, doc_md="Counts nights without training and without a "
          "promotion (registry); warns, then fails the run and calls the alert hook when the loop is stuck.")
    def loop_health(ds: str | None = None) -> dict:
        return t.loop_health(ds)

    @teardown
    @task(doc_md="Writes the night's outcome as the DAG run's note (grid view); never changes the run's state.")
    def note(ti=None, dag_run=None) -> str:
        return t.run_note(ti, dag_run)

    # One task per stage of `pipeline.stages.sequence.NIGHTLY`, in order; each reads the day from the run.
    # collect, validate and register publish partition D of their asset (the asset view lists which days exist;
    # `flywheel_online_eval_day` follows the collected day).
    stages = t.nightly_stage_tasks(after=wait_for_labels, outlets={
        "collect": TRAINING_DAY, "validate": VALIDATED_DAY, "register": CANDIDATE})
    health = loop_health()
    stages["rollout"] >> health
    [wait_for_labels, *stages.values(), health] >> note()


flywheel_nightly()
