"""Register: the candidate becomes a model version carrying its lineage and gate decision; a passing one is
marked `challenger`. Registering the same run twice returns the same version."""

from __future__ import annotations

import json
from datetime import date

from pydantic import BaseModel

from pipeline import registry
from pipeline.evaluate import TAG_AUC_DIFF, TAG_GATE_CHECKS, TAG_REPORT, EvalResult, tag_json
from pipeline.rollback import TAG_ROLLED_BACK
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
        registry.TAG_WINDOW: run.data.tags.get(registry.TAG_WINDOW, f"{day.isoformat()}/{day.isoformat()}"),
        registry.TAG_PARENT: ev.champion_version,
        registry.TAG_WEIGHTS: run.data.tags.get(registry.TAG_WEIGHTS, ""),
        "flywheel.gate_passed": str(ev.passed).lower(),
        "flywheel.gate_reason": ev.reason[:4900],
        "flywheel.metrics": json.dumps({"candidate": ev.candidate, "champion": ev.champion}),
        TAG_GATE_CHECKS: tag_json({c.name: c.passed for c in ev.checks}),
    }
    if ev.report_uri:
        tags[TAG_REPORT] = ev.report_uri
    if migration := run.data.tags.get(registry.TAG_MIGRATION):
        tags[registry.TAG_MIGRATION] = migration  # the registry shows the spec change, not only the run
    if ev.auc_diff is not None:
        tags[TAG_AUC_DIFF] = tag_json(ev.auc_diff.model_dump())
    mv = registry.register(client, rt.model_name, ev.run_id, tags)
    for key in (TAG_GATE_CHECKS, TAG_REPORT, TAG_AUC_DIFF, "flywheel.gate_passed", "flywheel.gate_reason"):
        if key in tags and mv.tags.get(key) != tags[key]:  # a re-evaluated rerun refreshes the evidence
            client.set_model_version_tag(rt.model_name, mv.version, key, tags[key])
    if ev.passed and mv.tags.get(TAG_ROLLED_BACK) != "true":  # a rerun never re-nominates a rolled-back version
        client.set_registered_model_alias(rt.model_name, registry.CHALLENGER, mv.version)
    return RegisterResult(version=mv.version, parent_version=ev.champion_version, passed=ev.passed)
