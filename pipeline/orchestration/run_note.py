"""What each nightly run decided, in one line on the Airflow grid (the DAG run note): a person scanning a month
of nights sees "v7 promoted: AUC 0.712 vs 0.705 ..." or "gate failed: ..." without opening task logs.

The Task SDK cannot write run notes, so the run's last (teardown) task writes it through Airflow's public REST
API with the stack's credentials; where that API is out of reach (`dag.test()`, a locked-down deployment) the
line still goes to the task log and the task's XCom."""

from __future__ import annotations

import logging

from pipeline.orchestration.airflow_tasks import stage_task_ids

log = logging.getLogger("flywheel.run_note")

#: The nightly's stage tasks, in order, whose results (XCom) or decisions (the `error` XCom of a failed stage)
#: make up the note.
STAGES = stage_task_ids()
ERROR_KEY = "error"


def _fmt(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, float) else "-"


def _comparison(evaluation: dict) -> str:
    cand, champ = evaluation.get("candidate") or {}, evaluation.get("champion") or {}
    who = f"champion v{evaluation['champion_version']}" if evaluation.get("champion_version") else "champion"
    text = f"AUC {_fmt(cand.get('auc'))} vs {who} {_fmt(champ.get('auc'))}"
    diff = evaluation.get("auc_diff") or {}
    if diff.get("estimate") is not None:
        text += f" ({diff['estimate']:+.3f}, CI [{diff['low']:+.3f}, {diff['high']:+.3f}])"
    return text


def compose(results: dict[str, dict | None], errors: dict[str, str | None], health: str | None = None) -> str:
    """The note for one run from its stages' results and errors, and the loop-health warning if any."""
    line = _outcome(results, errors)
    return (f"{line} | loop health: {health}" if health else line)[:1000]


def _outcome(results: dict[str, dict | None], errors: dict[str, str | None]) -> str:
    """The first stage that stopped the night explains it; otherwise the promotion decision with the
    comparison behind it."""
    for stage in STAGES:
        if errors.get(stage):
            return f"{stage} stopped the night: {errors[stage]}"[:1000]
    evaluation, promoted = results.get("evaluate") or {}, results.get("promote") or {}
    if promoted:
        version = promoted.get("version", "?")
        verb = "promoted" if promoted.get("promoted") else "not promoted"
        line = f"v{version} {verb}: {_comparison(evaluation)}" if evaluation else f"v{version} {verb}"
        if not promoted.get("promoted"):
            line += f"; {promoted.get('reason', '')}"
        rollout = results.get("rollout") or {}
        if rollout.get("served_version"):
            line += f"; serving v{rollout['served_version']}"
        return line[:1000]
    done = [s for s in STAGES if results.get(s)]
    return f"incomplete: last finished stage {done[-1] if done else 'none'}"


def publish(dag_id: str, run_id: str, note: str) -> bool:
    """Set the run's note through the REST API; a failure is logged, never raised (the note is a courtesy,
    the run's outcome is already decided)."""
    from pipeline.config import get_settings
    from pipeline.ops.airflow_client import AirflowClient
    from pipeline.ops.stack import airflow_password

    s = get_settings()
    log.info("run note: %s", note, extra={"dag_id": dag_id, "run_id": run_id})
    try:
        client = AirflowClient(s.airflow_url, s.airflow_user, airflow_password(s))
        r = client.request("PATCH", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", json={"note": note})
        r.raise_for_status()
        return True
    except Exception as e:  # noqa: BLE001 - any failure to reach the API leaves the note in the log only
        log.warning("could not set the run note through %s: %s", s.airflow_url, e)
        return False
