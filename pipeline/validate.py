"""Validate: a great-expectations suite derived from the feature spec gates each collected day.

Row-level expectations (nulls, ranges, label domain, score range, time inside the day) route failing rows to
`quarantine/dt=D` with the expectation that caught them; nothing is dropped silently. Batch-level expectations
(row count, label rate) and the quarantined share then decide whether the day may be trained on.
"""

from __future__ import annotations

import html
import json
import logging
import os
from datetime import date

import pandas as pd
import pyarrow as pa
from pydantic import BaseModel

from feature_store.spec import FeatureSpec
from pipeline.collect import TRAINING
from pipeline.config import Settings
from pipeline.runtime import GateFailed, Runtime, day_bounds, parse_day, runtime

log = logging.getLogger("flywheel.validate")
VALIDATED, QUARANTINE = "validated", "quarantine"
ROW_ID = "_row_id"


class ValidateResult(BaseModel):
    day: str
    rows: int
    good: int
    quarantined: int
    bad_fraction: float
    passed: bool
    failures: list[str]
    report: str


def _row_suite(spec: FeatureSpec, day: date) -> list:
    import great_expectations.expectations as gxe

    out = []
    for name, f in spec.features.items():
        if not f.nullable:
            out.append(gxe.ExpectColumnValuesToNotBeNull(column=name))
        if f.min is not None or f.max is not None:
            out.append(gxe.ExpectColumnValuesToBeBetween(column=name, min_value=f.min, max_value=f.max))
    start, end = day_bounds(day)
    out += [
        gxe.ExpectColumnValuesToBeInSet(column=spec.label.name, value_set=[0.0, 1.0]),
        gxe.ExpectColumnValuesToBeBetween(column="score", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToNotBeNull(column=spec.event_time),
        gxe.ExpectColumnValuesToBeBetween(column=spec.event_time, min_value=start, max_value=end,
                                          strict_max=True),
    ]
    return out


def _batch_suite(spec: FeatureSpec, s: Settings) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=s.min_rows),
        gxe.ExpectColumnMeanToBeBetween(column=spec.label.name, min_value=s.label_rate_min,
                                        max_value=s.label_rate_max),
    ]


def _run_suite(name: str, expectations: list, frame: pd.DataFrame) -> list:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = ctx.data_sources.add_pandas("flywheel").add_dataframe_asset(name) \
        .add_batch_definition_whole_dataframe("whole")
    suite = ctx.suites.add(gx.ExpectationSuite(name=name))
    for e in expectations:
        suite.add_expectation(e)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    res = vd.run(batch_parameters={"dataframe": frame},
                 result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW_ID]})
    return list(res.results)


def _describe(r) -> str:
    cfg = r.expectation_config
    kw = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",) and v is not None}
    return f"{cfg.type}({', '.join(f'{k}={v}' for k, v in kw.items())})"


def _write_report(s: Settings, day: date, result: ValidateResult, rows: list[dict]) -> str:
    directory = s.reports_dir / "validation"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{day}.json").write_text(json.dumps({"result": result.model_dump(), "expectations": rows},
                                                      indent=2, default=str))
    body = "".join(
        f"<tr class={'ok' if r['success'] else 'bad'}><td>{html.escape(r['expectation'])}</td>"
        f"<td>{'pass' if r['success'] else 'FAIL'}</td><td>{r['unexpected']}</td>"
        f"<td>{html.escape(str(r['observed']))}</td></tr>" for r in rows)
    page = (f"<html><head><meta charset=utf-8><title>Validation {day}</title><style>"
            "body{font-family:sans-serif}td{padding:2px 8px}.bad{background:#fdd}.ok{background:#efe}</style>"
            f"</head><body><h1>Validation of {day}: {'PASSED' if result.passed else 'FAILED'}</h1>"
            f"<p>{result.rows} rows, {result.good} good, {result.quarantined} quarantined "
            f"({result.bad_fraction:.2%}).</p><p>{html.escape('; '.join(result.failures))}</p>"
            "<table><tr><th>expectation</th><th>result</th><th>unexpected rows</th><th>observed</th></tr>"
            f"{body}</table></body></html>")
    path = directory / f"{day}.html"
    path.write_text(page)
    return str(path)


def validate(day: str | date, rt: Runtime | None = None) -> ValidateResult:
    rt = rt or runtime()
    day = parse_day(day)
    spec, s = rt.spec, rt.settings
    frame = rt.lake.read_partition(TRAINING, day).to_pandas()
    frame[ROW_ID] = range(len(frame))
    reasons: dict[int, list[str]] = {}
    rows: list[dict] = []
    for r in _run_suite(f"rows-{day}", _row_suite(spec, day), frame):
        bad = [int(x[ROW_ID]) for x in (r.result.get("unexpected_index_list") or [])]
        for i in bad:
            reasons.setdefault(i, []).append(_describe(r))
        rows.append({"expectation": _describe(r), "success": bool(r.success), "unexpected": len(bad),
                     "observed": r.result.get("observed_value")})
    bad_mask = frame[ROW_ID].isin(list(reasons))
    good = frame[~bad_mask].drop(columns=[ROW_ID])
    quarantined = frame[bad_mask].copy()
    quarantined["reason"] = [" | ".join(reasons[i]) for i in quarantined[ROW_ID]]
    quarantined = quarantined.drop(columns=[ROW_ID])

    failures = []
    bad_fraction = len(quarantined) / max(len(frame), 1)
    if bad_fraction > s.max_bad_fraction:
        failures.append(f"{bad_fraction:.2%} of rows quarantined, above max_bad_fraction {s.max_bad_fraction:.2%}")
    good_for_batch = good.assign(**{ROW_ID: range(len(good))})
    for r in _run_suite(f"batch-{day}", _batch_suite(spec, s), good_for_batch):
        rows.append({"expectation": _describe(r), "success": bool(r.success), "unexpected": 0,
                     "observed": r.result.get("observed_value")})
        if not r.success:
            failures.append(f"{_describe(r)} failed (observed {r.result.get('observed_value')})")

    inputs = {"training_manifest": rt.lake.read_manifest(TRAINING, day)["files"]}
    rt.lake.write_partition(QUARANTINE, day, pa.Table.from_pandas(quarantined, preserve_index=False), inputs)
    result = ValidateResult(day=day.isoformat(), rows=len(frame), good=len(good), quarantined=len(quarantined),
                            bad_fraction=round(bad_fraction, 6), passed=not failures, failures=failures, report="")
    result.report = _write_report(s, day, result, rows)
    if failures:
        log.error("validation gate failed for %s: %s (report: %s)", day, "; ".join(failures), result.report)
        raise GateFailed(f"validation gate failed for {day}: {'; '.join(failures)}. "
                         f"{len(quarantined)} rows are in quarantine/dt={day}; report: {result.report}")
    rt.lake.write_partition(VALIDATED, day, pa.Table.from_pandas(good, preserve_index=False), inputs)
    log.info("validated %s", result.model_dump_json())
    return result
