"""
### Flywheel online evaluation

Every hour (setting `online_eval_schedule`): compare the champion with the `previous` champion on the labeled
rows the champion served (collected days up to the run's date), scoring the previous model offline on the exact
logged features. Decides `wait` (too few labels), `keep`, or `rolled_back`: the champion is rolled back
automatically when it is worse beyond the declared margin, recorded as tags on both versions and in this log.
Then the canary: a `challenger` that served a share of traffic (server setting `canary_share`) is compared with
the champion on its own rows and promoted, retired, or left waiting for more labels.
"""

from __future__ import annotations

from airflow.sdk import dag, task

from pipeline.orchestration import airflow_tasks as t


@dag(
    dag_id="flywheel_online_eval",
    schedule=t.online_eval_schedule(),
    **t.dag_defaults(__doc__, "evaluation"),
)
def flywheel_online_eval():
    @task
    def online_eval(ds: str | None = None) -> dict:
        return t.online_eval(ds)

    @task
    def canary_eval(ds: str | None = None) -> dict:
        return t.canary_eval(ds)

    online_eval() >> canary_eval()


flywheel_online_eval()
