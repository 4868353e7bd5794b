"""Register: the candidate becomes a model version carrying its lineage and gate decision; a passing one is
marked `challenger` (through the registry's guarded nomination, written to the alias ledger), and the
version's description gets its review card. Registering the same run twice returns the same version."""

from __future__ import annotations

import json
from datetime import date

from pydantic import BaseModel

from pipeline import registry
from pipeline.release.review_card import log_card_inputs, refresh_cards
from pipeline.runtime import Runtime, parse_day, runtime
from pipeline.stages.evaluate import EvalResult
from pipeline.tags import Tag


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
        Tag.METRICS: json.dumps({"candidate": ev.candidate, "champion": ev.champion}),  # the one JSON tag, for code
        Tag.GATE_CHECKS: checks_line(ev),
        Tag.STATUS: "passed its gate" if ev.passed else "failed its gate: never promoted",
    }
    if ev.report_uri:
        tags[Tag.EVAL_REPORT] = ev.report_uri
    if migration := run.data.tags.get(Tag.MIGRATION):
        tags[Tag.MIGRATION] = migration  # the registry shows the spec change, not only the run
    if policy := run.data.tags.get(Tag.POLICY):
        tags[Tag.POLICY] = policy  # which training policy (warm start or a drift challenger) made this version
    if ev.auc_diff is not None:
        ci = ev.auc_diff
        tags[Tag.AUC_DIFF_CI] = f"{ci.estimate:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] ({ci.samples} bootstrap samples)"
    log_card_inputs(rt, ev.run_id, ev.model_dump(mode="json"), day.isoformat())  # the card's blobs: an artifact
    mv = registry.register(client, rt.model_name, ev.run_id, tags)
    for key in (Tag.GATE_CHECKS, Tag.EVAL_REPORT, Tag.AUC_DIFF_CI, Tag.GATE_PASSED, Tag.GATE_REASON):
        if key in tags and mv.tags.get(key) != tags[key]:  # a re-evaluated rerun refreshes the evidence
            client.set_model_version_tag(rt.model_name, mv.version, key, tags[key])
    if ev.passed:  # guarded: a rerun never re-nominates a rolled-back, rejected or timed-out version
        registry.set_challenger(client, rt.model_name, mv.version, "register",
                                rt.settings.promotion.alias_lock_stale_s, ev.report_uri)
    refresh_cards(rt, mv.version)
    return RegisterResult(version=mv.version, parent_version=ev.champion_version, passed=ev.passed)


def checks_line(ev: EvalResult) -> str:
    """The gate's checks as a person reads them in the tag list (the card and the report have the detail)."""
    failed = [c.name for c in ev.checks if not c.passed]
    head = f"{len(ev.checks) - len(failed)}/{len(ev.checks)} checks passed"
    return (head + (f"; failed: {', '.join(failed)}" if failed else ""))[:4900]
