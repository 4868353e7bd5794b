"""
### Flywheel rollback

Manual trigger only: put the `previous` champion back as `champion` in one step (the model server follows the
alias). Give a `reason` (recorded on both versions) and, optionally, `expected_champion`: the rollback is then
refused if the champion has moved since you decided. Same code as `flywheel rollback`.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from pipeline.orchestration import airflow_tasks as t


@dag(
    dag_id="flywheel_rollback",
    schedule=None,
    params={
        "reason": Param("manual rollback from Airflow", type="string", minLength=1),
        "expected_champion": Param("", type="string", description="Refuse unless this is still the champion."),
    },
    **t.dag_defaults(__doc__, "rollback", retries=0),
)
def flywheel_rollback():
    @task
    def rollback(params: dict | None = None) -> dict:
        return t.rollback(params["reason"], params["expected_champion"])

    rollback()


flywheel_rollback()
