"""Register: the candidate becomes a model version carrying its lineage and gate decision; a passing one is
marked `challenger`. Registering the same run twice returns the same version."""

from __future__ import annotations

import json
from datetime import date

from pydantic import BaseModel

from pipeline import registry
from pipeline.runtime import Runtime, parse_day, runtime
from pipeline.stages.evaluate import EvalResult, tag_json
from pipeline.tags import Alias, Tag


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
        Tag.DAY: day.isoformat(),
        Tag.WINDOW: run.data.tags.get(Tag.WINDOW, f"{day.isoformat()}/{day.isoformat()}"),
        Tag.PARENT: ev.champion_version,
        Tag.WEIGHTS: run.data.tags.get(Tag.WEIGHTS, ""),
        Tag.GATE_PASSED: str(ev.passed).lower(),
        Tag.GATE_REASON: ev.reason[:4900],
        Tag.METRICS: json.dumps({"candidate": ev.candidate, "champion": ev.champion}),
        Tag.GATE_CHECKS: tag_json({c.name: c.passed for c in ev.checks}),
    }
    if ev.report_uri:
        tags[Tag.EVAL_REPORT] = ev.report_uri
    if migration := run.data.tags.get(Tag.MIGRATION):
        tags[Tag.MIGRATION] = migration  # the registry shows the spec change, not only the run
    if policy := run.data.tags.get(Tag.POLICY):
        tags[Tag.POLICY] = policy  # which training policy (warm start or a drift challenger) made this version
    if ev.auc_diff is not None:
        tags[Tag.AUC_DIFF_CI] = tag_json(ev.auc_diff.model_dump())
    mv = registry.register(client, rt.model_name, ev.run_id, tags)
    for key in (Tag.GATE_CHECKS, Tag.EVAL_REPORT, Tag.AUC_DIFF_CI, Tag.GATE_PASSED, Tag.GATE_REASON):
        if key in tags and mv.tags.get(key) != tags[key]:  # a re-evaluated rerun refreshes the evidence
            client.set_model_version_tag(rt.model_name, mv.version, key, tags[key])
    if ev.passed and mv.tags.get(Tag.ROLLED_BACK) != "true":  # a rerun never re-nominates a rolled-back version
        client.set_registered_model_alias(rt.model_name, Alias.CHALLENGER, mv.version)
    return RegisterResult(version=mv.version, parent_version=ev.champion_version, passed=ev.passed)
