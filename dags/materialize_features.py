"""
### Flywheel feature materialization

Every hour (setting `materialize_schedule`; `none` = manual only): copy each entity's latest feature values from
the lake's offline tables (`features/<entity>/dt=D`, fed by `flywheel features ingest`) into the online store
the model server reads (`online_store_uri`: SQLite under the home by default, or Redis). A scheduled run loads
values as of its data interval's end; a manual run loads everything ingested. Incremental: only new or
rewritten partitions are read, so a run with nothing new does nothing. Same code as `flywheel materialize`.
"""

from __future__ import annotations

from airflow.sdk import dag, task

from pipeline.orchestration import airflow_tasks as t


@dag(
    dag_id="flywheel_materialize",
    schedule=t.materialize_schedule(),
    **t.dag_defaults(__doc__, "features"),
)
def flywheel_materialize():
    @task
    def materialize(data_interval_end=None, run_id: str | None = None) -> dict:
        return t.materialize(data_interval_end, run_id)

    materialize()


flywheel_materialize()
