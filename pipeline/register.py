"""Register: the candidate becomes a model version carrying its lineage and gate decision; a passing one is
marked `challenger`. Registering the same run twice returns the same version."""

from __future__ import annotations

import json
from datetime import date

from pydantic import BaseModel

from pipeline import registry
from pipeline.evaluate import EvalResult
from pipeline.runtime import Runtime, parse_day, runtime


class RegisterResult(BaseModel):
    version: str
    parent_version: str
    passed: bool


def register_candidate(day: str | date, evaluation: EvalResult | dict, rt: Runtime | None = None) -> RegisterResult:
    rt = rt or runtime()
    day = parse_day(day)
    ev = evaluation if isinstance(evaluation, EvalResult) else EvalResult.model_validate(evaluation)
    client = rt.client()
    run = client.get_run(ev.run_id)
    tags = {
        registry.TAG_DAY: day.isoformat(),
        registry.TAG_WINDOW: f"{day.isoformat()}/{day.isoformat()}",
        registry.TAG_PARENT: ev.champion_version,
        registry.TAG_WEIGHTS: run.data.tags.get(registry.TAG_WEIGHTS, ""),
        "flywheel.gate_passed": str(ev.passed).lower(),
        "flywheel.gate_reason": ev.reason,
        "flywheel.metrics": json.dumps({"candidate": ev.candidate, "champion": ev.champion}),
    }
    mv = registry.register(client, rt.model_name, ev.run_id, tags)
    if ev.passed:
        client.set_registered_model_alias(rt.model_name, registry.CHALLENGER, mv.version)
    return RegisterResult(version=mv.version, parent_version=ev.champion_version, passed=ev.passed)
