"""The nightly sequence in-process, for `flywheel nightly` and for debugging a day without Airflow. The DAG
wires exactly these stages, one task each."""

from __future__ import annotations

from datetime import date

from pydantic import BaseModel

from pipeline.preflight import model_server_down, require_mlflow
from pipeline.runtime import Runtime, runtime
from pipeline.stages.collect import collect
from pipeline.stages.evaluate import evaluate
from pipeline.stages.promote import PromoteResult, promote
from pipeline.stages.register import register_candidate
from pipeline.stages.train import train
from pipeline.stages.validate import validate


def run_nightly(day: str | date, rt: Runtime | None = None, rollout: bool = False) -> dict:
    rt = rt or runtime()
    require_mlflow(rt.settings, "nightly")
    out: dict = {"collect": collect(day, rt), "validate": validate(day, rt)}
    trained = train(day, rt)
    ev = evaluate(day, trained.run_id, rt)
    reg = register_candidate(day, ev, rt)
    out |= {"train": trained, "evaluate": ev, "register": reg, "promote": promote(reg.version, rt)}
    if rollout:
        out["rollout"] = roll_out_if_served(out["promote"], rt)
    return {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in out.items()}


def roll_out_if_served(promoted: PromoteResult, rt: Runtime) -> dict:
    """The DAG's rollout step: make a running model server serve the new champion now. Without a server there
    is nothing to roll out (one started later loads the champion), which is said, not raised."""
    from pipeline.stages.promote import rollout

    if not promoted.promoted:
        return {"skipped": f"no promotion ({promoted.reason}); the server keeps its model"}
    if why := model_server_down(rt.settings):
        return {"skipped": f"{why}; champion v{promoted.version} is in the registry and a model server "
                           "loads it when it starts"}
    return rollout(rt).model_dump()
