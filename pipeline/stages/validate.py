"""Validate: a great-expectations suite derived from the feature spec gates each collected day.

Row-level expectations (nulls, ranges, label domain, score range, time inside the day, and the column-map
expectations of the user's suite file) route failing rows to `quarantine/dt=D` with the expectations that caught
them; nothing is dropped silently. Batch-level checks (row count, label rate, quarantined share, unseen-category
share, the user's aggregate expectations, severe drift when `drift_action` is `block`) then decide whether the
day may be trained on. Every failure names its rule, the feature, the numbers and the setting a user can change.

Unseen categories are measured against what the model to be trained already knows (the champion's
vocabularies, read from the registry) and the recent collected days whatever their gate outcome (see
`pipeline.checks.unseen`), so one failed day can never make every later day fail too.

The day is streamed in record batches of `validate_chunk_rows`: each chunk is validated by GE on its own and its
good and bad rows go straight to streaming partition writers, while the batch-level checks read running
aggregates. Memory is thus bounded by one chunk, whatever the size of the day.
"""

from __future__ import annotations

import hashlib
import html
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from feature_store.log_schema import prediction_schema
from feature_store.spec import FeatureSpec
from feature_store.vocab import Vocabulary
from pipeline.checks import drift
from pipeline.checks.unseen import KnownCategories, UnseenCounter, describe_sources
from pipeline.config import Settings, knob
from pipeline.errors import GateFailed, StageError, SuiteFileError
from pipeline.runtime import Runtime, day_bounds, file_lock, parse_day, runtime
from pipeline.stages.collect import TRAINING

if TYPE_CHECKING:
    from great_expectations.data_context.types.base import DataContextConfig

log = logging.getLogger("flywheel.validate")
VALIDATED, QUARANTINE = "validated", "quarantine"
SUITE_ENTRY_KEYS = {"type", "kwargs", "meta", "notes", "id", "description", "severity", "rendered_content"}
COLUMN_KWARGS = ("column", "column_A", "column_B", "column_list")
# Aggregate expectations the streaming gate decides from running aggregates, by the statistic each bounds.
AGGREGATES = {
    "expect_table_row_count_to_be_between": "rows",
    "expect_table_row_count_to_equal": "rows",
    "expect_column_mean_to_be_between": "mean",
    "expect_column_min_to_be_between": "min",
    "expect_column_max_to_be_between": "max",
    "expect_column_sum_to_be_between": "sum",
    "expect_column_stdev_to_be_between": "stdev",
}


class ValidateResult(BaseModel):
    day: str
    rows: int
    good: int
    quarantined: int
    bad_fraction: float
    passed: bool
    failures: list[str]
    report: str
    data_docs: str = ""
    warnings: list[str] = []
    unseen_category_share: dict[str, float] | None = None
    unseen_reference: list[str] = []
    suite_file: str | None = None
    suite_sha256: str | None = None
    drift: dict[str, object] = {}


@dataclass
class UserSuite:
    path: Path
    sha256: str
    row: list = field(default_factory=list)
    batch: list = field(default_factory=list)


def suite_file(s: Settings) -> Path | None:
    if s.validation.suite_path is not None:
        if not s.validation.suite_path.is_file():
            raise SuiteFileError(f"{s.validation.suite_path}: validation suite file not found "
                                 "(FLYWHEEL_VALIDATION__SUITE_PATH)")
        return s.validation.suite_path
    default = s.spec_path.with_name(f"{s.spec_path.stem}.expectations.json")
    return default if default.is_file() else None


def day_columns(spec: FeatureSpec) -> list[str]:
    return [*prediction_schema(spec).names, spec.label.name, "label_time"]


def load_user_suite(path: Path, columns: list[str]) -> UserSuite:
    """Parse a GE 1.x suite JSON into row-level (column-map) and batch-level (aggregate) expectations, refusing
    anything the gate could not honour instead of ignoring it."""
    from great_expectations.exceptions import ExpectationNotFoundError
    from great_expectations.expectations.expectation import (
        ColumnMapExpectation,
        ColumnPairMapExpectation,
        MulticolumnMapExpectation,
    )
    from great_expectations.expectations.registry import get_expectation_impl

    data = path.read_bytes()
    try:
        raw = json.loads(data)
    except json.JSONDecodeError as e:
        raise SuiteFileError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("expectations"), list):
        raise SuiteFileError(f"{path}: expected an object with an 'expectations' list")
    out = UserSuite(path=path, sha256=hashlib.sha256(data).hexdigest())
    for i, entry in enumerate(raw["expectations"]):
        where = f"{path}: expectations[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            raise SuiteFileError(f"{where}: expected an object with a 'type'")
        where += f" ({entry['type']})"
        if extra := sorted(set(entry) - SUITE_ENTRY_KEYS):
            raise SuiteFileError(f"{where}: unknown keys {extra}")
        kwargs = entry.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise SuiteFileError(f"{where}: 'kwargs' must be an object")
        try:
            cls = get_expectation_impl(entry["type"])
        except ExpectationNotFoundError:
            raise SuiteFileError(f"{where}: unknown expectation type") from None
        for key in COLUMN_KWARGS:
            named = kwargs.get(key)
            for col in (named if isinstance(named, list) else [named] if named is not None else []):
                if col not in columns:
                    raise SuiteFileError(f"{where}: unknown column {col!r} (the day has {', '.join(columns)})")
        try:
            expectation = cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise SuiteFileError(f"{where}: invalid kwargs: {e}".replace("\n", " ")) from None
        if issubclass(cls, ColumnMapExpectation | ColumnPairMapExpectation | MulticolumnMapExpectation):
            out.row.append(expectation)
        elif entry["type"] in AGGREGATES:
            out.batch.append(expectation)
        else:
            raise SuiteFileError(f"{where}: not a column-map expectation, and not an aggregate the streaming "
                                 f"gate can compute (supported: {', '.join(sorted(AGGREGATES))})")
    return out


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


def _batch_suite(spec: FeatureSpec, s: Settings) -> list[tuple[object, str, bool]]:
    """The spec-derived aggregate expectations, each with the settings that set its bounds, and whether it
    judges the day's volume (`sized`): those two are gated only on a day of at least `min_rows` labeled rows."""
    import great_expectations.expectations as gxe

    return [
        (gxe.ExpectTableRowCountToBeBetween(min_value=s.validation.min_rows), f"lower {knob('min_rows')}", True),
        (gxe.ExpectColumnMeanToBeBetween(column=spec.label.name, min_value=s.validation.label_rate_min,
                                         max_value=s.validation.label_rate_max),
         f"widen {knob('label_rate_min')} / {knob('label_rate_max')}", True),
    ]


def _registry_unreachable(uri: str) -> str | None:
    """Why the tracking server does not answer, or None when it does (any HTTP status): asked first, because
    the MLflow client would retry for minutes before saying so."""
    if not uri.startswith(("http://", "https://")):
        return None
    from urllib.error import HTTPError, URLError
    from urllib.request import urlopen

    try:
        urlopen(f"{uri.rstrip('/')}/health", timeout=5).close()
    except HTTPError:
        return None
    except (URLError, OSError) as e:
        return str(getattr(e, "reason", e))
    return None


def champion_vocabularies(rt: Runtime, day: date) -> tuple[str, dict[str, Vocabulary]] | None:
    """The vocabularies of the model `day` will be trained from (the parent `train` picks), under the spec's
    current feature names; None before the first model is registered. Only `vocab.json` is read, from the
    bundle cache `train` then reuses."""
    from pipeline import registry

    client = rt.client()
    parent = registry.parent_for_day(client, rt.model_name, day)
    if parent is None:
        return None
    path = registry.download_bundle(client, rt.model_name, parent.version, rt.cache_dir)
    vocabs = {c: Vocabulary.from_dict(d) for c, d in json.loads((path / "vocab.json").read_text()).items()}
    for m in rt.spec.migrations:
        for old, new in m.renamed.items():
            if old in vocabs and new not in vocabs:
                vocabs[new] = vocabs.pop(old)
    return parent.version, vocabs


def known_categories(rt: Runtime, day: date) -> tuple[KnownCategories | None, list[str]]:
    """What counts as seen on `day` (None: nothing to compare with yet), and warnings on what could not be
    read. Collected days count whatever their gate outcome: a failed day is still data the loop has met."""
    s = rt.settings
    known = KnownCategories(rt.spec)
    if not known.rules:
        return None, []
    warnings = []
    if (why := _registry_unreachable(s.mlflow_tracking_uri)) is None:
        if (champion := champion_vocabularies(rt, day)) is not None:
            known.add_vocabularies(champion[1], f"champion v{champion[0]}")
    else:
        warnings.append(f"unseen categories: the champion's vocabulary was not read (MLflow at "
                        f"{s.mlflow_tracking_uri} unreachable: {why}); measured against the collected days only. "
                        "Start MLflow (`flywheel up`) or set FLYWHEEL_MLFLOW_TRACKING_URI")
    days = [d for d in rt.lake.partition_days(TRAINING) if d < day][-s.validation.unseen_reference_days:] \
        if s.validation.unseen_reference_days else []
    for d in days:
        manifest = rt.lake.read_manifest(TRAINING, d)
        if not manifest or not manifest["files"]:
            continue
        names = pq.read_schema(f"{rt.lake.partition_path(TRAINING, d)}/{manifest['files'][0]['path']}",
                               filesystem=rt.lake.fs).names
        columns = [c for c in known.columns if c in names]
        for batch in rt.lake.iter_batches(TRAINING, d, s.validation.chunk_rows, columns):
            known.add_frame(batch.to_pandas())
    if days:
        known.add_source(f"collected days {', '.join(d.isoformat() for d in days)}")
    return (known if known.sources else None), warnings


def _describe(cfg) -> str:
    kw = {k: v for k, v in cfg.kwargs.items() if k not in ("batch_id",) and v is not None}
    return f"{cfg.type}({', '.join(f'{k}={v}' for k, v in kw.items())})"


def _ephemeral_config() -> DataContextConfig:
    """The chunk validator's context config: in-memory stores, no Data Docs site, no progress bars and
    analytics off, set on the context itself rather than through `GX_ANALYTICS_ENABLED` in the process
    environment, so validating a day changes nothing for the rest of the process."""
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    return DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(), analytics_enabled=False,
                             progress_bars=ProgressBarsConfig(globally=False))


class _ChunkValidator:
    """One GE ephemeral context, suite and batch definition, run once per chunk. Failing rows are read from
    `unexpected_index_list` over the chunk's index (set to the rows' positions in the day), with unexpected
    values and the index query left out: that keeps a chunk full of bad rows about as fast as a clean one."""

    RESULT_FORMAT = {"result_format": "COMPLETE", "exclude_unexpected_values": True,
                     "return_unexpected_index_query": False}

    def __init__(self, name: str, expectations: list) -> None:
        import great_expectations as gx

        ctx = gx.get_context(mode="ephemeral", project_config=_ephemeral_config())
        batch = ctx.data_sources.add_pandas("flywheel").add_dataframe_asset(name) \
            .add_batch_definition_whole_dataframe("whole")
        self.suite = ctx.suites.add(gx.ExpectationSuite(name=name))
        for e in expectations:
            self.suite.add_expectation(e)
        self.batch = batch

    def run(self, frame: pd.DataFrame) -> list:
        # The Validator directly, not ValidationDefinition.run: that would also keep every chunk's result (and
        # its failing row ids) in the context's result store until the day is done.
        from great_expectations.validator.v1_validator import Validator

        validator = Validator(batch_definition=self.batch, batch_parameters={"dataframe": frame},
                              result_format=self.RESULT_FORMAT)
        res = validator.validate_expectation_suite(self.suite)
        for r in res.results:
            if message := _exception(r.exception_info):
                raise StageError(f"expectation {_describe(r.expectation_config)} could not run: {message}")
        return list(res.results)


def _exception(info: dict | None) -> str | None:
    """GE reports a failed metric either at the top level or keyed by metric id; an expectation that could not
    run must stop the gate, not pass with zero failing rows."""
    for entry in [info or {}, *(v for v in (info or {}).values() if isinstance(v, dict))]:
        if entry.get("raised_exception"):
            return str(entry.get("exception_message"))
    return None


@dataclass
class _RowTally:
    """Per row-level expectation, summed over chunks: what the report and Data Docs show."""

    config: object
    element_count: int = 0
    unexpected: int = 0
    missing: int = 0
    sample: list[int] = field(default_factory=list)

    def add(self, r, bad: list[int]) -> None:
        self.element_count += int(r.result.get("element_count") or 0)
        self.missing += int(r.result.get("missing_count") or 0)
        self.unexpected += len(bad)
        self.sample += bad[: max(0, 20 - len(self.sample))]


@dataclass
class _Moments:
    """One column's running count, sum, mean, sum of squared deviations (M2), min and max. Chunks are merged
    with Chan et al.'s parallel update of (n, mean, M2): the sum-of-squares shortcut cancels catastrophically
    on a column whose mean is large next to its spread (an epoch timestamp, an id), reporting a standard
    deviation of noise, or zero."""

    n: int = 0
    sum: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def add(self, v: np.ndarray) -> None:
        if not len(v):
            return
        n_b, mean_b = len(v), float(v.mean())
        m2_b = float(np.square(v - mean_b).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n, self.sum = n, self.sum + float(v.sum())
        self.min, self.max = min(self.min, float(v.min())), max(self.max, float(v.max()))

    @property
    def stdev(self) -> float | None:
        """Sample standard deviation (ddof=1, as pandas and GE's stdev expectation compute it)."""
        return math.sqrt(self.m2 / (self.n - 1)) if self.n >= 2 else None


class _Aggregates:
    """Running moments per column over the good rows, enough for the batch gate."""

    def __init__(self, columns: set[str]) -> None:
        self.rows = 0
        self.stats = {c: _Moments() for c in columns}

    def update(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        for c, st in self.stats.items():
            v = pd.to_numeric(batch.column(c).to_pandas(), errors="coerce").to_numpy(dtype=float, na_value=np.nan)
            st.add(v[~np.isnan(v)])

    def statistic(self, stat: str, column: str | None) -> float | None:
        if stat == "rows":
            return float(self.rows)
        st = self.stats[column]
        if st.n == 0:
            return None
        return getattr(st, stat)


def _within(value: float | None, e) -> bool:
    if value is None:
        return False
    if getattr(e, "value", None) is not None:
        return value == e.value
    lo, hi = getattr(e, "min_value", None), getattr(e, "max_value", None)
    if lo is not None and (value <= lo if getattr(e, "strict_min", False) else value < lo):
        return False
    return not (hi is not None and (value >= hi if getattr(e, "strict_max", False) else value > hi))


def _data_docs(s: Settings, day: date, tallies: list[_RowTally], batch_rows: list[dict], passed: bool,
               directory: Path) -> str:
    """The day's results as one GE validation result in a file context under home/gx, rendered to Data Docs.
    The chunks' results are summed first, so the site shows one run per day, not one per chunk. Only this
    run's page is rendered (the site does not get slower with every past day), and a copy of it lands in the
    day's report directory, which the train step logs to MLflow. Analytics are switched off in the file
    context's own config (written once into its great_expectations.yml), not in the process environment."""
    import great_expectations as gx
    from great_expectations.core import ExpectationSuiteValidationResult, ExpectationValidationResult
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.resource_identifiers import (
        ExpectationSuiteIdentifier,
        ValidationResultIdentifier,
    )

    root = s.home_abs / "gx"  # the file context's own folder under its project root
    results = []
    for t in tallies:
        n = max(t.element_count, 1)
        results.append(ExpectationValidationResult(
            success=t.unexpected == 0, expectation_config=t.config,
            result={"element_count": t.element_count, "unexpected_count": t.unexpected,
                    "unexpected_percent": 100.0 * t.unexpected / n, "missing_count": t.missing,
                    "missing_percent": 100.0 * t.missing / n, "partial_unexpected_list": [],
                    "partial_unexpected_index_list": t.sample}))
    for b in batch_rows:
        results.append(ExpectationValidationResult(success=b["success"], expectation_config=b["config"],
                                                   result={"observed_value": b["observed"]}))
    name = "flywheel-validation"
    run_id = RunIdentifier(run_name=f"dt={day.isoformat()}", run_time=datetime.now(UTC))
    evaluated = len(results)
    ok = sum(r.success for r in results)
    suite_result = ExpectationSuiteValidationResult(
        success=passed, results=results, suite_name=name,
        statistics={"evaluated_expectations": evaluated, "successful_expectations": ok,
                    "unsuccessful_expectations": evaluated - ok,
                    "success_percent": 100.0 * ok / max(evaluated, 1)},
        meta={"run_id": run_id, "active_batch_definition": {"datasource_name": "lake",
                                                            "data_asset_name": TRAINING,
                                                            "batch_definition_name": f"dt={day.isoformat()}"}})
    with file_lock(root / "flywheel.lock"):
        ctx = gx.get_context(mode="file", project_root_dir=str(s.home_abs))
        if ctx.variables.analytics_enabled is not False:
            ctx.enable_analytics(False)
        key = ValidationResultIdentifier(expectation_suite_identifier=ExpectationSuiteIdentifier(name=name),
                                         run_id=run_id, batch_identifier=f"{TRAINING}-dt={day.isoformat()}")
        ctx.validation_results_store.set(key, suite_result)
        ctx.build_data_docs(resource_identifiers=[key])
        page = ctx.get_docs_sites_urls(resource_identifier=key)[0]["site_url"]
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(url2pathname(urlparse(page).path), directory / "data_docs.html")
    return str(next(root.rglob("data_docs/local_site/index.html")))


def _write_report(directory: Path, result: ValidateResult, rows: list[dict], drift_files: dict[str, str]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "validation.json").write_text(json.dumps({"result": result.model_dump(), "expectations": rows},
                                                          indent=2, default=str))
    body = "".join(
        f"<tr class={'ok' if r['success'] else 'bad'}><td>{html.escape(r['expectation'])}</td>"
        f"<td>{'pass' if r['success'] else 'FAIL'}</td><td>{r['unexpected']}</td>"
        f"<td>{html.escape(str(r['observed']))}</td></tr>" for r in rows)
    links = " · ".join(f"<a href='{Path(p).name}'>drift {k}</a>" for k, p in drift_files.items())
    docs = f" · <a href='file://{html.escape(result.data_docs)}'>Data Docs</a>" if result.data_docs else ""
    page = (f"<html><head><meta charset=utf-8><title>Validation {result.day}</title><style>"
            "body{font-family:sans-serif}td{padding:2px 8px}.bad{background:#fdd}.ok{background:#efe}</style>"
            f"</head><body><h1>Validation of {result.day}: {'PASSED' if result.passed else 'FAILED'}</h1>"
            f"<p>{result.rows} rows, {result.good} good, {result.quarantined} quarantined "
            f"({result.bad_fraction:.2%}).</p><p>{html.escape('; '.join(result.failures))}</p>"
            f"<p>{html.escape('; '.join(result.warnings))}</p><p>{links}{docs}</p>"
            f"<p>suite file: {html.escape(str(result.suite_file))} (sha256 {result.suite_sha256})</p>"
            "<table><tr><th>expectation</th><th>result</th><th>unexpected rows</th><th>observed</th></tr>"
            f"{body}</table>{'<img src=drift.png>' if 'png' in drift_files else ''}</body></html>")
    path = directory / "index.html"
    path.write_text(page)
    return str(path)


def _chunk(batch: pa.RecordBatch, offset: int, checker: _ChunkValidator,
           tallies: dict[str, _RowTally]) -> tuple[pd.DataFrame, np.ndarray, pa.Array | None]:
    """Row-level suite on one chunk: the chunk as pandas, the mask of its bad rows and, for those, the
    expectations that failed."""
    frame = batch.to_pandas()
    frame.index = pd.RangeIndex(offset, offset + len(frame))  # GE names failing rows by this index
    reasons: dict[int, list[str]] = {}
    for r in checker.run(frame):
        what = _describe(r.expectation_config)
        bad = [int(i) for i in (r.result.get("unexpected_index_list") or [])]
        if len(bad) != int(r.result.get("unexpected_count") or 0):
            raise StageError(f"{what}: GE reported {r.result.get('unexpected_count')} failing rows but named "
                             f"{len(bad)}; refusing to guess which rows to quarantine")
        tallies.setdefault(what, _RowTally(r.expectation_config)).add(r, bad)
        for i in bad:
            reasons.setdefault(i, []).append(what)
    mask = np.zeros(len(frame), dtype=bool)
    mask[np.fromiter(reasons, dtype=np.int64, count=len(reasons)) - offset] = True
    why = [" | ".join(reasons[int(i)]) for i in np.flatnonzero(mask) + offset] if reasons else None
    return frame, mask, (pa.array(why, pa.string()) if why else None)


def _top_reasons(tallies: dict[str, _RowTally]) -> str:
    top = sorted(((t.unexpected, what) for what, t in tallies.items() if t.unexpected), reverse=True)[:3]
    return "; ".join(f"{what}: {n} rows" for n, what in top) or "none"


def _unseen_failures(s: Settings, spec: FeatureSpec, unseen: UnseenCounter, rows: list[dict]) -> list[str]:
    shares = unseen.shares()
    if shares is None:
        rows.append({"expectation": f"unseen-category share <= {s.validation.unseen_category_share}", "success": True,
                     "unexpected": 0, "observed": "skipped: no champion and no collected day before this one"})
        return []
    failures = []
    sources = describe_sources(unseen.known.sources)
    for c, share in shares.items():
        eligible, key = unseen.eligible[c], unseen.known.rules[c]
        gated = eligible >= s.validation.unseen_min_rows
        ok = share <= s.validation.unseen_category_share or not gated
        where = f"rows of known {spec.features[c].entity} entities ({key} seen before)" if key else "rows"
        rows.append({"expectation": f"unseen-category share of {c} <= {s.validation.unseen_category_share} (on {where})",
                     "success": ok, "unexpected": unseen.unseen[c],
                     "observed": f"{share:.6f} of {eligible} rows" + ("" if gated else
                                                                     " (not gated: < unseen_min_rows)")})
        if not ok:
            failures.append(
                f"rule unseen_category_share on feature {c}: {share:.2%} of {eligible} {where} "
                f"({unseen.unseen[c]} rows) have a {c} never seen in the reference ({sources}), above "
                f"{s.validation.unseen_category_share:.2%}; e.g. {unseen.top_examples(c)}. If such values are normal for "
                f"{c}, raise {knob('unseen_category_share')}"
                + ("" if key else f", or declare {c} as an attribute of its entity (entity: ...) in the spec"))
    return failures


def _batch_gate(s: Settings, spec: FeatureSpec, expectations: list[tuple[object, str, bool]], aggregates: _Aggregates,
                unseen: UnseenCounter, report: drift.DriftReport, total: int, quarantined: int,
                tallies: dict[str, _RowTally], rows: list[dict]) -> tuple[list[str], list[str], list[dict]]:
    """Day-level decision from the running aggregates: failures block the day, warnings are logged. Each
    failure says which rule, on what, with which numbers, and what to change.

    A day with fewer labeled rows than `min_rows` is not a bad day, only a small one (a stream of a few dozen
    rows a day): its rows are judged like any day's, its volume rules are reported, not gated (seven rows
    without a positive at an 8 % label rate are what chance gives half the time), and `train` pools it with the
    next days until a night holds `min_rows`. Failing it would freeze such a stream for good."""
    failures: list[str] = []
    warnings: list[str] = []
    small = aggregates.rows < s.validation.min_rows
    if small:
        warnings.append(f"small day: {aggregates.rows} labeled rows, fewer than {knob('min_rows')}="
                        f"{s.validation.min_rows}; validated, and trained once the days since the champion's "
                        "data add up to that many (its row-count and label-rate rules are reported, not gated)")
    bad_fraction = quarantined / max(total, 1)
    if bad_fraction > s.validation.max_bad_fraction:
        failures.append(f"rule max_bad_fraction: {bad_fraction:.2%} of rows ({quarantined} of {total}) "
                        f"quarantined, above max_bad_fraction {s.validation.max_bad_fraction:.2%}; caught by "
                        f"{_top_reasons(tallies)}. Fix the upstream data, widen the spec's min/max or nullable "
                        f"for the feature, or raise {knob('max_bad_fraction')}")
    evaluated = []
    for e, hint, sized in expectations:
        cfg = e.configuration
        observed = aggregates.statistic(AGGREGATES[cfg.type], getattr(e, "column", None))
        ok = _within(observed, e)
        gated = not (sized and small)
        evaluated.append({"config": cfg, "success": ok or not gated, "observed": observed})
        rows.append({"expectation": _describe(cfg) + ("" if gated else " (not gated: a small day)"),
                     "success": ok or not gated, "unexpected": 0, "observed": observed})
        if not ok and gated:
            failures.append(f"rule {_describe(cfg)} failed (observed {observed} over {aggregates.rows} good "
                            f"rows); {hint}")
    failures += _unseen_failures(s, spec, unseen, rows)
    for item in report.severe:
        msg = (f"rule drift_psi_severe: severe drift in {item.name} ({item.kind}): PSI {item.psi:.3f} > "
               f"{s.drift.psi_severe} against the validated days {report.reference_days}")
        if s.drift.action == "block":
            failures.append(f"{msg}; with drift_action=block this fails the day: set {knob('drift_action')}=warn "
                            f"or raise {knob('drift_psi_severe')}")
        else:
            warnings.append(msg)
    return failures, warnings, evaluated


def validate(day: str | date, rt: Runtime | None = None) -> ValidateResult:
    rt = rt or runtime()
    day = parse_day(day)
    spec, s = rt.spec, rt.settings
    training = rt.lake.read_manifest(TRAINING, day)
    if training is None:
        raise StageError(f"no complete partition {TRAINING}/dt={day} in {rt.lake.root}: run collect first")
    path = suite_file(s)
    user = load_user_suite(path, day_columns(spec)) if path else None
    batch_expectations = _batch_suite(spec, s) + [(e, f"edit or remove it in {path}", False) for e in
                                                  (user.batch if user else [])]
    checker = _ChunkValidator(f"rows-{day}", _row_suite(spec, day) + (user.row if user else []))
    aggregates = _Aggregates({e.column for e, *_ in batch_expectations if getattr(e, "column", None)})
    drifting = drift.DriftAccumulator(spec, s, drift.load_reference(rt, day, VALIDATED))
    known, reference_warnings = known_categories(rt, day)
    unseen = UnseenCounter(known)
    inputs = {"training_manifest": training["files"], "suite_file": str(path) if path else None,
              "suite_sha256": user.sha256 if user else None}
    schema = pq.read_schema(f"{rt.lake.partition_path(TRAINING, day)}/{training['files'][0]['path']}",
                            filesystem=rt.lake.fs)
    good_writer = rt.lake.partition_writer(VALIDATED, day, schema)
    bad_writer = rt.lake.partition_writer(QUARANTINE, day, schema.append(pa.field("reason", pa.string())))
    open_writers = [good_writer, bad_writer]
    tallies: dict[str, _RowTally] = {}
    total = 0
    try:
        for batch in rt.lake.iter_batches(TRAINING, day, s.validation.chunk_rows):
            frame, mask, why = _chunk(batch, total, checker, tallies)
            good = batch.filter(pa.array(~mask))
            good_writer.write(good)
            if why is not None:
                bad_writer.write(batch.filter(pa.array(mask)).append_column("reason", why))
            aggregates.update(good)
            drifting.update(frame[~mask])
            unseen.update(frame[~mask])
            total += batch.num_rows
        report = drifting.report(day)
        drift.store(rt, report, {"training_manifest": inputs["training_manifest"]})
        rows = [{"expectation": what, "success": t.unexpected == 0, "unexpected": t.unexpected,
                 "observed": f"{t.unexpected}/{t.element_count} unexpected"} for what, t in tallies.items()]
        failures, warnings, evaluated = _batch_gate(s, spec, batch_expectations, aggregates, unseen, report, total,
                                                    bad_writer.rows, tallies, rows)
        warnings = reference_warnings + warnings
        for w in warnings:
            log.warning("%s: %s", day, w)
        directory = s.reports_dir / "validation" / f"dt={day.isoformat()}"
        result = ValidateResult(
            day=day.isoformat(), rows=total, good=good_writer.rows, quarantined=bad_writer.rows,
            bad_fraction=round(bad_writer.rows / max(total, 1), 6), passed=not failures, failures=failures,
            report="", warnings=warnings, unseen_category_share=unseen.shares(),
            unseen_reference=known.sources if known else [],
            suite_file=inputs["suite_file"], suite_sha256=inputs["suite_sha256"], drift=report.summary())
        result.data_docs = _data_docs(s, day, list(tallies.values()), evaluated, result.passed, directory)
        result.report = _write_report(directory, result, rows, drift.render(report, directory, s))
        bad_writer.commit(inputs)
        open_writers.remove(bad_writer)
        if failures:
            log.error("validation gate failed for %s: %s (report: %s, data docs: %s)", day, "; ".join(failures),
                      result.report, result.data_docs)
            raise GateFailed(f"validation gate failed for {day}: {'; '.join(failures)}. {result.quarantined} rows "
                             f"are in quarantine/dt={day}; report: {result.report}")
        good_writer.commit({**inputs, "drift": report.summary()})
        open_writers.remove(good_writer)
    finally:
        for w in open_writers:
            w.abort()
    log.info("validated %s (report: %s, data docs: %s)", result.model_dump_json(), result.report, result.data_docs)
    return result
