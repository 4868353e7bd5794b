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
from airflow.sdk import Asset, dag, task, teardown

from pipeline.orchestration import airflow_tasks as t
from pipeline.orchestration.review_trigger import AwaitApprovalOperator

# Partitioned by day (the partition key is D): the asset view lists which days were collected, validated and
# produced a registered candidate.
TRAINING_DAY = Asset(name="flywheel_training_day", uri="file:///flywheel/lake/training")
VALIDATED_DAY = Asset(name="flywheel_validated_day", uri="file:///flywheel/lake/validated")
CANDIDATE = Asset(name="flywheel_candidate", uri="mlflow://flywheel/registered-candidate")


@dag(
    dag_id="flywheel_nightly",
    schedule=t.schedule(),
    # any historical day may be triggered or backfilled
    **t.dag_defaults(__doc__, "training", retry_delay_s=10, start=(1970, 1, 2)),
)
def flywheel_nightly():
    wait_for_labels = DateTimeSensorAsync(
        task_id="wait_for_labels",
        target_time="{{ (logical_date + macros.timedelta(days=1, seconds=LAG)).isoformat() }}".replace(
            "LAG", str(t.label_lag_s())
        ),
    )

    @task(outlets=[TRAINING_DAY], doc_md="Reads the sealed `logs/predictions` and `logs/feedback` segments of D; "
          "writes `training/dt=D` (joined, labelled, deduplicated) and lists rejected and late segments.")
    def collect(ds: str | None = None, outlet_events=None) -> dict:
        return t.with_partition(t.collect(ds), outlet_events, TRAINING_DAY)

    @task(outlets=[VALIDATED_DAY], doc_md="Reads `training/dt=D`; writes `validated/dt=D`, `quarantine/dt=D` (with the reason), "
          "`drift/dt=D` and the report in `reports/validation/dt=D`. Fails the night when the gate fails.")
    def validate(collected: dict, outlet_events=None) -> dict:
        return t.with_partition(t.validate(collected["day"]), outlet_events, VALIDATED_DAY)

    @task(doc_md="Reads `validated/dt=D`, the replay reservoir and the champion; writes one MLflow run "
          "(warm-started weights, metrics, the day's validation report) and updates the reservoir.")
    def train(validated: dict) -> dict:
        return t.train(validated["day"])

    @task(doc_md="Reads the candidate run and the champion; scores both on D's held-out slice and logs the "
          "evaluation report (paired CIs, calibration, slices) to the candidate's run.")
    def evaluate(trained: dict) -> dict:
        return t.evaluate(trained["day"], trained)

    @task(outlets=[CANDIDATE], doc_md="Registers the candidate as a model version with its lineage and gate outcome (tags); "
          "a passing candidate becomes `challenger`.")
    def register(evaluation: dict, outlet_events=None) -> dict:
        return t.with_partition(t.register(evaluation["day"], evaluation), outlet_events, CANDIDATE,
                                evaluation["day"])

    @task(doc_md="Moves `champion` to the candidate when it passed (and was approved in review mode), "
          "keeping the replaced one as `previous`; compare-and-set under the registry lock.")
    def promote(registered: dict, review: dict) -> dict:
        return t.promote(registered, review)

    @task(doc_md="Asks the model server to reload and waits until it serves the new champion.")
    def rollout(promoted: dict) -> dict:
        return t.rollout(promoted)

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
    promoted = promote(registered, review.output)
    rolled_out = rollout(promoted)
    health = loop_health()
    rolled_out >> health
    [wait_for_labels, collected, validated, trained, registered, review.output, promoted, rolled_out,
     health] >> note()


flywheel_nightly()
