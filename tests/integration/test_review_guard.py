"""No path around the reviewer, against a real MLflow server: a rejected (or timed-out) candidate loses
`challenger` and never becomes champion through the canary, the nightly promote, the CLI or a direct registry
call; rollback still works; every move lands in the alias ledger; the review card and the ledger are readable
through MLflow's REST API."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import registry
from pipeline.errors import PromotionRefused
from pipeline.release.canary import canary_eval
from pipeline.release.review import APPROVED, REJECTED, decide, expire, observe, request_review
from pipeline.runtime import runtime
from pipeline.stages.evaluate import evaluate
from pipeline.stages.promote import promote
from pipeline.stages.register import register_candidate
from pipeline.tags import Alias, Tag
from tests.integration.test_canary import canary_day
from tests.integration.test_promotion import (  # noqa: F401 - the shared fixture
    DAY,
    _passing_version,
    champion_bundle,
    good,
    log_candidate,
    rt,
)

pytestmark = pytest.mark.integration


def _review(rt_):
    return runtime(rt_.settings.model_copy(update={"promotion_mode": "review", "approval_timeout_s": 3600}))


def _cli(rt_, monkeypatch, *args: str):
    from pipeline.cli import app
    from pipeline.config import get_settings

    s = rt_.settings
    for key, value in {"HOME": str(s.home), "SPEC_PATH": str(s.spec_path), "MODEL_NAME": rt_.model_name,
                       "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri, "PROMOTION_MODE": s.promotion.mode}.items():
        monkeypatch.setenv(f"FLYWHEEL_{key}", value)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, list(args))
    finally:
        get_settings.cache_clear()


def _alias(rt_, alias: str) -> str | None:
    found = registry.get_alias(rt_.client(), rt_.model_name, alias)
    return found.version if found else None


def test_a_rejected_candidate_never_becomes_champion_by_any_path(rt, monkeypatch):  # noqa: F811
    rv = _review(rt)
    same = champion_bundle(rv)  # as good as the champion: the canary alone would promote it
    v2 = _passing_version(rv, same)
    assert registry.set_challenger(rv.client(), rv.model_name, v2, "register")
    request_review(v2, rv)
    decide(v2, REJECTED, "bob", "not this one", rv)
    assert _alias(rv, Alias.CHALLENGER) is None  # the rejection takes the canary traffic away at once

    # the reported incident: the alias was left on the rejected version and half the traffic went to it
    rv.client().set_registered_model_alias(rv.model_name, Alias.CHALLENGER, v2)
    canary_day(rv, same, v2, 600)
    for mode in (rv, rt):  # review mode and auto mode alike
        result = canary_eval(DAY, mode)
        assert result.decision in ("retired", "no_canary") and _alias(rv, Alias.CHAMPION) == "1", result.reason
    assert _alias(rv, Alias.CHALLENGER) is None

    assert not promote(v2, rv).promoted and not promote(v2, rt).promoted  # nightly, either mode
    with pytest.raises(PromotionRefused, match="rejected"):
        registry.move_champion(rv.client(), rv.model_name, v2, "1", "direct")
    out = _cli(rv, monkeypatch, "promote", "--version", v2)
    assert out.exit_code == 0 and json.loads(out.stdout[out.stdout.index("{"):])["promoted"] is False
    out = _cli(rv, monkeypatch, "approve", "--version", v2, "--by", "mallory")
    assert out.exit_code == 2 and "rejection is final" in out.output
    assert _alias(rv, Alias.CHAMPION) == "1"

    tags = registry.get_version(rv.client(), rv.model_name, v2).tags
    assert "flywheel.promoted_by" not in tags
    moves = registry.history(rv.client(), rv.model_name)
    assert [(m.alias, m.version, m.why) for m in moves if m.alias == "challenger"][:2] == [
        ("challenger", v2, "nomination"), ("challenger", None, "rejection")]


def test_an_approved_canary_promotes_and_rollback_still_works_all_in_the_ledger(rt, monkeypatch):  # noqa: F811
    rv = _review(rt)
    same = champion_bundle(rv)
    v2 = _passing_version(rv, same)
    registry.set_challenger(rv.client(), rv.model_name, v2, "register")
    request_review(v2, rv)
    canary_day(rv, same, v2, 600)
    waiting = canary_eval(DAY, rv)  # as good live, but the reviewer has not decided: live evidence never decides
    assert waiting.decision == "wait" and "review mode" in waiting.reason and _alias(rv, Alias.CHAMPION) == "1"
    decide(v2, APPROVED, "alice", rt=rv)
    assert canary_eval(DAY, rv).decision == "promoted"
    assert (_alias(rv, Alias.CHAMPION), _alias(rv, Alias.PREVIOUS), _alias(rv, Alias.CHALLENGER)) == (v2, "1", None)

    out = _cli(rv, monkeypatch, "rollback", "--reason", "latency")
    assert out.exit_code == 0, out.output
    assert (_alias(rv, Alias.CHAMPION), _alias(rv, Alias.PREVIOUS)) == ("1", None)
    with pytest.raises(PromotionRefused, match="rolled back"):
        registry.move_champion(rv.client(), rv.model_name, v2, "1", "direct")

    out = _cli(rv, monkeypatch, "history", "--json")
    assert out.exit_code == 0, out.output
    moves = json.loads(out.stdout[out.stdout.index("{"):])["moves"]
    champion_moves = [(m["version"], m["why"]) for m in moves if m["alias"] == "champion"]
    assert champion_moves == [("1", "bootstrap"), (v2, "canary"), ("1", "rollback")]
    assert all(m["at"] and m["by"] for m in moves)
    served = _cli(rv, monkeypatch, "history", "--json", "--at", moves[-1]["at"])
    assert json.loads(served.stdout[served.stdout.index("{"):])["served_at"]["move"]["version"] == "1"
    human = _cli(rv, monkeypatch, "history")
    assert human.exit_code == 0 and "rollback" in human.output

    described = httpx.get(f"{rv.settings.mlflow_tracking_uri}/api/2.0/mlflow/registered-models/get",
                          params={"name": rv.model_name}).json()["registered_model"]["description"]
    assert "## Alias history" in described and "| champion | v1 |" in described and "rollback" in described


def test_the_champion_page_holds_the_review_card(rt):  # noqa: F811
    ev = evaluate(DAY, log_candidate(rt, good(rt)), rt)
    assert ev.passed, ev.reason
    reg = register_candidate(DAY, ev, rt)
    assert _alias(rt, Alias.CHALLENGER) == reg.version
    assert promote(reg.version, rt).promoted
    assert _alias(rt, Alias.CHALLENGER) is None  # challenger means "waiting"; a champion is no longer waiting
    card = httpx.get(f"{rt.settings.mlflow_tracking_uri}/api/2.0/mlflow/model-versions/get",
                     params={"name": rt.model_name, "version": reg.version}).json()["model_version"]["description"]
    assert card.startswith(f"## v{reg.version}: **Champion**")
    for needle in ("| AUC |", "| log-loss |", "| ECE |", "### Slices", "account=new", "### Data window",
                   "labelled share", "quarantined", "parent: v1", "spec digest", "/artifactPath/evaluation/report.html",
                   "training run: ["):
        assert needle in card, needle
    assert len(card) <= 5000
    tags = registry.get_version(rt.client(), rt.model_name, reg.version).tags
    person_reads = [k for k in tags if k != Tag.METRICS and k.startswith("flywheel.")]
    assert not [k for k in person_reads if tags[k].lstrip().startswith(("{", "["))]  # one JSON tag, named metrics
    assert tags[Tag.STATUS].startswith("champion since")


def test_a_review_times_out_then_waits_again_and_ui_decisions_get_a_time(rt):  # noqa: F811
    rv = runtime(rt.settings.model_copy(update={"promotion_mode": "review", "approval_timeout_s": 120}))
    from pipeline.orchestration.review_trigger import review_deadline

    v2 = _passing_version(rv, champion_bundle(rv))
    registry.set_challenger(rv.client(), rv.model_name, v2, "register")
    request_review(v2, rv)
    client = rv.client()
    old = registry.get_version(client, rv.model_name, v2).tags[Tag.REVIEW_REQUESTED_AT]
    client.set_model_version_tag(rv.model_name, v2, Tag.REVIEW_REQUESTED_AT, "2020-01-01T00:00:00+00:00")
    request_review(v2, rv)  # a retry keeps its clock: the deadline is long gone
    assert review_deadline(registry.get_version(client, rv.model_name, v2).tags[Tag.REVIEW_REQUESTED_AT],
                           120) < time.time()
    expire(v2, rv)
    assert _alias(rv, Alias.CHALLENGER) is None
    assert not promote(v2, rv).promoted
    again = request_review(v2, rv)  # clearing the task: a fresh wait, as the timeout message says
    tags = registry.get_version(client, rv.model_name, v2).tags
    assert again.decision is None and Tag.REVIEW_TIMED_OUT_AT not in tags and tags[Tag.REVIEW_REQUESTED_AT] != old
    assert review_deadline(tags[Tag.REVIEW_REQUESTED_AT], 120) - time.time() > 100
    assert _alias(rv, Alias.CHALLENGER) == v2

    client.set_model_version_tag(rv.model_name, v2, Tag.APPROVAL, "approved")  # only the tag, as in the UI
    seen = observe(v2, rv)
    assert seen.decision == APPROVED and seen.decided_at is not None and seen.decided_at != "None"
    assert registry.get_version(client, rv.model_name, v2).tags[Tag.APPROVAL_AT] == seen.decided_at
    assert promote(v2, rv).promoted
    np.testing.assert_equal(_alias(rv, Alias.CHAMPION), v2)
