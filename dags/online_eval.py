"""
### Flywheel online evaluation

Compare the champion with the `previous` champion on the labeled rows the champion served, scoring the
previous model offline on the exact logged features. Decides `wait` (too few labels), `keep`, or `rolled_back`:
the champion is rolled back automatically when it is worse beyond the declared margin, recorded as tags on both
versions and in this log. Then the canary: a `challenger` that served a share of traffic (server setting
`canary_share`) is compared with the champion on its own rows and promoted, retired, or left waiting for more
labels.

Two DAGs run this code:
- `flywheel_online_eval`, every hour (setting `online_eval_schedule`): the days up to the run's date, the
  current day read from its sealed log segments and the feedback that has arrived, so a bad release is judged
  within about an hour of enough labels.
- `flywheel_online_eval_day`, once per collected day: the nightly run publishes partition **D** of
  `flywheel_training_day` when it has collected D (every label joined), and this DAG's run for partition D
  judges the champion on that complete day. Its runs are listed by partition in the asset view.
"""

from __future__ import annotations

from airflow.sdk import PartitionedAssetTimetable, dag, task

from pipeline.orchestration import airflow_tasks as t
from pipeline.orchestration.assets import TRAINING_DAY


def online_evaluation(dag_id: str, schedule, *tags: str):
    @dag(dag_id=dag_id, schedule=schedule, **t.dag_defaults(__doc__, "evaluation", *tags))
    def evaluation():
        @task(doc_md="Reads the champion's served, labeled rows (lake `training/dt=D`, or today's sealed log "
              "segments + feedback); writes rollback tags and the alias move when it rolls back.")
        def online_eval(ds: str | None = None, partition_key: str | None = None) -> dict:
            return t.online_eval(t.run_day(ds, partition_key))

        @task(doc_md="Reads the challenger's canary rows; promotes, retires or leaves it waiting (guarded move).")
        def canary_eval(ds: str | None = None, partition_key: str | None = None) -> dict:
            return t.canary_eval(t.run_day(ds, partition_key))

        online_eval() >> canary_eval()

    return evaluation()


online_evaluation("flywheel_online_eval", t.online_eval_schedule(), "hourly")
online_evaluation("flywheel_online_eval_day", PartitionedAssetTimetable(assets=TRAINING_DAY), "per-day")
