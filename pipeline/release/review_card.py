"""The review card: a Markdown description on each model version (MLflow renders it on the version page), so a
reviewer decides from one page instead of fifteen `flywheel.*` tags.

It says, in this order: the decision and why in one sentence; candidate vs champion on the held-out slice (AUC,
log-loss, ECE) with the paired bootstrap CI and the verdict; the per-slice table; the data window (days, rows,
labelled share, quarantined share, drift warnings); lineage (parent, spec digest, migration); links to the
evaluation report, the validation report and the training run; in review mode, what the reviewer must do and
what a timeout does. It is re-rendered from the registry whenever the version moves (registered, decided,
promoted, retired, rolled back), from the version's tags and the `flywheel/card.json` artifact that `register`
logs on the training run (the evaluation and the data window: the blobs stay out of tags a person reads).
"""

from __future__ import annotations

import json
import logging

from pipeline import registry
from pipeline.checks.gate import Interval, verdict
from pipeline.runtime import Runtime
from pipeline.tags import Alias, Tag

log = logging.getLogger("flywheel.review_card")
CARD_ARTIFACT = "flywheel/card.json"
LIMIT = 4900  # MLflow keeps a version description in a 5000-character column


def card_inputs(rt: Runtime, evaluation: dict, day: str) -> dict:
    """What the card needs beyond tags, gathered at registration: the evaluation and the data window."""
    data: dict = {"day": day}
    manifest = rt.lake.read_manifest("training", _date(day))
    if manifest is not None:
        logged = sum(int(seg.get("rows", 0)) for seg in manifest.get("inputs", {}).get("prediction_segments", []))
        labelled = _labelled_rows(rt, day, manifest)
        data |= {"logged_rows": logged, "collected_rows": manifest.get("rows"),
                 "labelled_share": round(labelled / logged, 4) if logged and labelled is not None else None}
    validated = rt.lake.read_manifest("validated", _date(day))
    report = rt.settings.reports_dir / "validation" / f"dt={day}" / "validation.json"
    if report.exists():
        result = json.loads(report.read_text()).get("result", {})
        data |= {"validated_rows": result.get("good"), "quarantined": result.get("quarantined"),
                 "quarantined_share": result.get("bad_fraction"), "drift_warnings": result.get("warnings", []),
                 "validation_report": result.get("report")}
    elif validated is not None:
        data["validated_rows"] = validated.get("rows")
    return {"evaluation": evaluation, "data": data}


def _date(day: str):
    from datetime import date

    return date.fromisoformat(day[:10])


def _labelled_rows(rt: Runtime, day: str, manifest: dict) -> int | None:
    """Rows whose feedback arrived (collect leaves `label_time` empty on a row it defaulted)."""
    import pyarrow.parquet as pq

    base = rt.lake.partition_path("training", _date(day))
    try:
        return sum(int(t.num_rows - t.column("label_time").null_count) for t in (
            pq.read_table(f"{base}/{f['path']}", columns=["label_time"], filesystem=rt.lake.fs)
            for f in manifest["files"]))
    except Exception:  # a partition without label_time: the share is unknown, not wrong
        return None


def _load_inputs(client, run_id: str | None) -> dict:
    if not run_id:
        return {}
    try:
        import mlflow

        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{CARD_ARTIFACT}")
    except Exception:  # a bootstrap version or an older run: the card shows what the tags hold
        return {}


def _fmt(v: float | None, digits: int = 4) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _ci(ci: dict | None) -> str:
    if not ci:
        return "—"
    i = Interval.model_validate(ci)
    return f"{i.estimate:+.4f} [{i.low:+.4f}, {i.high:+.4f}]"


def decision_sentence(v: registry.VersionInfo) -> str:
    """The one sentence at the top: where the version stands and why."""
    t = v.tags
    if Alias.CHAMPION in v.aliases:
        how = t.get(Tag.PROMOTED_BY, "")
        return f"**Champion** (serving) since {t.get(Tag.PROMOTED_AT, '?')[:16]}Z, moved by {how}: " \
               f"{t.get(Tag.GATE_REASON, '')}"
    if t.get(Tag.ROLLED_BACK) == "true":
        return f"**Rolled back** at {t.get(Tag.ROLLBACK_AT, '?')[:16]}Z by {t.get(Tag.ROLLBACK_BY, '?')}: " \
               f"{t.get(Tag.ROLLBACK_REASON, '')}"
    if t.get(Tag.GATE_PASSED) != "true":
        return f"**Not promoted: failed its gate.** {t.get(Tag.GATE_REASON, 'no gate decision recorded')}"
    approval = (t.get(Tag.APPROVAL) or "").strip().lower()
    if approval == "rejected":
        return f"**Rejected** by {t.get(Tag.APPROVER) or 'the reviewer'} at {t.get(Tag.APPROVAL_AT, '?')[:16]}Z; " \
               "never promoted." + (f" Note: {t[Tag.APPROVAL_NOTE]}" if t.get(Tag.APPROVAL_NOTE) else "")
    if Tag.REVIEW_TIMED_OUT_AT in t and approval != "approved":
        return "**Review timed out**: not promoted, challenger cleared. Clear the `await_approval` task in " \
               "Airflow to wait again."
    if approval == "approved":
        return f"**Approved** by {t.get(Tag.APPROVER) or 'the reviewer'}; promoted by the waiting nightly run."
    if Tag.REVIEW_REQUESTED_AT in t or t.get(Tag.STATUS) == "waiting for review":
        return f"**Waiting for review.** Passed its gate: {t.get(Tag.GATE_REASON, '')}"
    if Tag.PROMOTED in t:
        return f"**Former champion** (promoted {t.get(Tag.PROMOTED_AT, '?')[:16]}Z), replaced since."
    state = "challenger (canary traffic when `canary_share` > 0)" if Alias.CHALLENGER in v.aliases else "candidate"
    return f"**Passed its gate**, {state}: {t.get(Tag.GATE_REASON, '')}"


def _metrics_table(ev: dict, tags: dict[str, str], metrics: dict[str, float]) -> list[str]:
    cand, champ = ev.get("candidate") or {}, ev.get("champion") or {}
    if not cand and Tag.METRICS in tags:
        m = json.loads(tags[Tag.METRICS])
        cand, champ = m.get("candidate", {}), m.get("champion", {}) or {}
    if not cand:
        return []
    parent = ev.get("champion_version") or tags.get(Tag.PARENT, "?")
    auc_ci, ll_ci = ev.get("auc_diff"), ev.get("logloss_diff")
    checks = {c["name"]: c for c in ev.get("checks", [])}
    def v(name: str) -> str:
        c = checks.get(name)
        return "—" if c is None else ("pass" if c["passed"] else "**FAIL**")
    eces = {"candidate": metrics.get("holdout_ece_candidate"), "champion": metrics.get("holdout_ece_champion")}
    return ["### Held-out slice: candidate vs champion v" + str(parent), "",
            "| metric | candidate | champion | diff, 95% paired CI | gate |", "|---|---|---|---|---|",
            f"| AUC | {_fmt(cand.get('auc'))} | {_fmt(champ.get('auc'))} | {_ci(auc_ci)} | {v('auc_vs_champion')} |",
            f"| log-loss | {_fmt(cand.get('logloss'))} | {_fmt(champ.get('logloss'))} | {_ci(ll_ci)} | "
            f"{v('logloss_vs_champion')} |",
            f"| ECE | {_fmt(eces['candidate'])} | {_fmt(eces['champion'])} | | {v('ece_ceiling')} |", ""]


def _slices_table(ev: dict) -> list[str]:
    slices = ev.get("slices") or []
    if not slices:
        return []
    rows = ["### Slices", "", "| slice | rows (pos.) | candidate AUC | champion AUC | diff, CI | verdict |",
            "|---|---|---|---|---|---|"]
    for s in slices[:20]:
        ci = s.get("auc_diff")
        ruling = verdict(Interval.model_validate(ci), 0.0) if ci else "too few rows"
        rows.append(f"| {s['slice']}={s['value']} | {s['rows']} ({s['positives']}) | {_fmt(s.get('candidate_auc'))} "
                    f"| {_fmt(s.get('champion_auc'))} | {_ci(ci)} | {ruling}{'' if s.get('gated') else ' (not gated)'} |")
    return [*rows, ""]


def _data_window(tags: dict[str, str], data: dict, params: dict[str, str]) -> list[str]:
    def share(x) -> str:
        return "—" if x is None else f"{float(x):.1%}"
    warnings = data.get("drift_warnings") or []
    return ["### Data window", "",
            f"- days: {tags.get(Tag.WINDOW, tags.get(Tag.DAY, '?')).replace('/', ' → ')} (trained on "
            f"{tags.get(Tag.DAY, '?')}, replay reaches back to the first)",
            f"- rows: {params.get('train_rows', '?')} trained, {params.get('holdout_rows', '?')} held out, "
            f"{params.get('replay_rows', '0')} replayed; {data.get('logged_rows', '?')} predictions logged that day",
            f"- labelled share: {share(data.get('labelled_share'))}; quarantined: {data.get('quarantined', '?')} rows "
            f"({share(data.get('quarantined_share'))})",
            f"- drift warnings: {'; '.join(warnings)[:600] if warnings else 'none'}", ""]


def _links(rt: Runtime, v: registry.VersionInfo, run, data: dict) -> list[str]:
    ui = rt.settings.resolved_mlflow_ui_url()
    out = ["### Lineage and evidence", ""]
    params = run.data.params if run else {}
    out.append(f"- parent: v{v.tags.get(Tag.PARENT, '—')}; spec digest `{params.get('spec_digest', '?')[:16]}`; "
               f"migration: {v.tags.get(Tag.MIGRATION) or params.get('migration', 'none')}")
    if run is not None and ui.startswith("http"):
        base = f"{ui}/#/experiments/{run.info.experiment_id}/runs/{v.run_id}"
        out.append(f"- training run: [{v.run_id[:8]}]({base})")
        if v.tags.get(Tag.EVAL_REPORT):
            out.append(f"- evaluation report: [report.html]({base}/artifactPath/evaluation/report.html) "
                       f"(`{v.tags[Tag.EVAL_REPORT]}`)")
        validation = [a.path for a in rt.client().list_artifacts(v.run_id, "validation")]
        if any(p.endswith("index.html") for p in validation):
            out.append(f"- validation report: [index.html]({base}/artifactPath/validation/index.html)")
        elif data.get("validation_report"):
            out.append(f"- validation report: `{data['validation_report']}`")
    return [*out, ""]


def _review_help(rt: Runtime, v: registry.VersionInfo) -> list[str]:
    if rt.settings.promotion.mode != "review" or v.tags.get(Tag.GATE_PASSED) != "true":
        return []
    hours = rt.settings.promotion.approval_timeout_s / 3600
    return ["### Review", "",
            f"Decide whether v{v.version} replaces the champion. Either set the tag `{Tag.APPROVAL}` on this "
            f"version to `approved` or `rejected` (also set `{Tag.APPROVER}` to your name), or run "
            f"`flywheel approve --version {v.version}` / `flywheel reject --version {v.version} --note WHY`. "
            "Approved: the waiting nightly run promotes it. Rejected: it loses `challenger` and is never promoted. "
            f"No decision within {hours:g} h: not promoted, `challenger` cleared; clear the `await_approval` task "
            "in Airflow to wait again.", ""]


def render(rt: Runtime, v: registry.VersionInfo) -> str:
    client = rt.client()
    run = client.get_run(v.run_id) if v.run_id else None
    inputs = _load_inputs(client, v.run_id)
    ev, data = inputs.get("evaluation", {}), inputs.get("data", {})
    parts = [f"## v{v.version}: {decision_sentence(v)}", "",
             f"Aliases: {', '.join(f'`{a}`' for a in v.aliases) or 'none'}. Status tag: "
             f"{v.tags.get(Tag.STATUS, '—')}.", "",
             *_review_help(rt, v), *_metrics_table(ev, v.tags, run.data.metrics if run else {}), *_data_window(v.tags, data, run.data.params if run
                                                                              else {}),
             *_links(rt, v, run, data), *_slices_table(ev)]
    text = "\n".join(parts)
    return text if len(text) <= LIMIT else text[: LIMIT - 40] + "\n\n… (cut; see the evaluation report)"


def refresh_cards(rt: Runtime, *versions: str | None) -> None:
    """Re-render the review card of each version. Best effort: a card that cannot be written never blocks a
    promotion or a rollback (the tags and the ledger already hold the decision)."""
    client = rt.client()
    for version in dict.fromkeys(v for v in versions if v):
        try:
            v = registry.get_version(client, rt.model_name, version)
            client.update_model_version(rt.model_name, version, description=render(rt, v))
        except Exception as e:
            log.warning("could not refresh the review card of v%s: %s", version, e)


def log_card_inputs(rt: Runtime, run_id: str, evaluation: dict, day: str) -> None:
    rt.client().log_dict(run_id, card_inputs(rt, evaluation, day), CARD_ARTIFACT)
