"""The nightly sequence in-process, for `flywheel nightly` and for debugging a day without Airflow. The DAG
wires exactly these stages, one task each."""

from __future__ import annotations

from datetime import date

from pipeline.runtime import Runtime, runtime
from pipeline.stages.collect import collect
from pipeline.stages.evaluate import evaluate
from pipeline.stages.promote import promote
from pipeline.stages.register import register_candidate
from pipeline.stages.train import train
from pipeline.stages.validate import validate


def run_nightly(day: str | date, rt: Runtime | None = None, rollout: bool = False) -> dict:
    rt = rt or runtime()
    out: dict = {"collect": collect(day, rt), "validate": validate(day, rt)}
    trained = train(day, rt)
    ev = evaluate(day, trained.run_id, rt)
    reg = register_candidate(day, ev, rt)
    out |= {"train": trained, "evaluate": ev, "register": reg, "promote": promote(reg.version, rt)}
    if rollout and out["promote"].promoted:
        from pipeline.stages.promote import rollout as do_rollout

        out["rollout"] = do_rollout(rt)
    return {k: v.model_dump() for k, v in out.items()}
