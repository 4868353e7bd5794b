"""
### Flywheel feature materialization

Every hour (setting `materialize_schedule`; `none` = manual only): copy each entity's latest feature values from
the lake's offline tables (`features/<entity>/dt=D`, fed by `flywheel features ingest`) into the online store
the model server reads (`online_store_uri`: SQLite under the home by default, or Redis). A scheduled run loads
values as of its data interval's end; a manual run loads everything ingested. Incremental: only new or
rewritten partitions are read, so a run with nothing new does nothing. Same code as `flywheel materialize`.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, task


def _schedule():
    from airflow.sdk import CronDataIntervalTimetable

    from pipeline.config import get_settings

    cron = get_settings().materialize_schedule
    return None if cron.lower() in ("none", "") else CronDataIntervalTimetable(cron, timezone="UTC")


@dag(
    dag_id="flywheel_materialize",
    schedule=_schedule(),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["flywheel", "features"],
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30), "owner": "flywheel"},
)
def flywheel_materialize():
    @task
    def materialize(data_interval_end=None, run_id: str | None = None) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from pipeline.materialize import materialize as stage
        from pipeline.runtime import StageError

        manual = run_id is not None and run_id.startswith("manual")
        try:
            return stage(None if manual or data_interval_end is None else data_interval_end).model_dump(mode="json")
        except StageError as e:
            raise AirflowFailException(str(e)) from e

    materialize()


flywheel_materialize()
