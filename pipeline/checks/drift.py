"""Drift: how far day D's validated rows moved from the reference window (the previous validated days).

One Population Stability Index per numeric feature (quantile bins of the reference), per categorical feature that
is not an entity key (its most frequent reference values plus "other"), for the served score (prediction drift) and for the label (label
drift, as the PSI of the click/no-click split). The reference is read column by column in record batches and
kept as a bounded sample (numerics) and value counts (categoricals); the day is binned chunk by chunk, so neither
the window nor the day is ever held whole. Unseen categories are a separate check (`checks.unseen`), measured
against what the champion knows and the recent collected days, not against this validated-only window.
"""

from __future__ import annotations

import html
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel

from feature_store.spec import FeatureSpec
from pipeline.config import Settings
from pipeline.runtime import Runtime

log = logging.getLogger("flywheel.drift")
DRIFT = "drift"
SCORE = "score"
OTHER = "(other)"
MISSING = "(null)"
SAMPLE_ROWS = 200_000
TOP_VALUES = 20
EPS = 1e-4
Severity = Literal["none", "moderate", "severe"]


class DriftItem(BaseModel):
    name: str
    kind: Literal["numeric", "categorical", "prediction", "label"]
    psi: float
    severity: Severity
    reference: float | None = None
    current: float | None = None


class DriftReport(BaseModel):
    day: str
    reference_days: list[str]
    rows: int
    items: list[DriftItem]
    skipped: str | None = None

    @property
    def severe(self) -> list[DriftItem]:
        return [i for i in self.items if i.severity == "severe"]

    def summary(self) -> dict:
        return {"reference_days": self.reference_days, "skipped": self.skipped,
                "max_psi": max((i.psi for i in self.items), default=0.0),
                "severe": [i.name for i in self.severe],
                "moderate": [i.name for i in self.items if i.severity == "moderate"]}


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """PSI of two count vectors over the same bins; empty bins are floored at EPS so one new bin is large but
    finite."""
    e = np.maximum(expected / max(expected.sum(), 1), EPS)
    a = np.maximum(actual / max(actual.sum(), 1), EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def severity(value: float, s: Settings) -> Severity:
    return "severe" if value > s.drift.psi_severe else "moderate" if value > s.drift.psi_warn else "none"


@dataclass
class _NumericBins:
    """Inner quantile edges of the reference; bin len(edges)+1 holds nulls."""

    edges: np.ndarray
    reference: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def index(self, values: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.edges, values, side="right")
        return np.where(np.isnan(values), len(self.edges) + 1, idx)

    def counts(self, values: np.ndarray) -> np.ndarray:
        return np.bincount(self.index(values), minlength=len(self.edges) + 2).astype(float)


def _numeric_bins(sample: np.ndarray, bins: int) -> _NumericBins:
    finite = sample[~np.isnan(sample)]
    edges = np.unique(np.quantile(finite, np.linspace(0, 1, bins + 1)[1:-1])) if len(finite) else np.zeros(0)
    b = _NumericBins(edges)
    b.reference = b.counts(sample)
    return b


@dataclass
class Reference:
    """What the previous validated days look like, small enough to keep: a sample per numeric column, value
    counts per categorical column, and the label's sum."""

    days: list[date]
    rows: int
    categories: dict[str, Counter]
    numeric: dict[str, _NumericBins]
    label_sum: float


def _floats(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pd.to_numeric(col.to_pandas(), errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _cat_values(series: pd.Series) -> pd.Series:
    return series.astype(object).where(series.notna(), MISSING).astype(str)


def load_reference(rt: Runtime, day: date, table: str) -> Reference | None:
    """The `drift_reference_days` validated days before `day`, streamed: None when there are none yet."""
    s, spec = rt.settings, rt.spec
    days = [d for d in rt.lake.partition_days(table) if d < day][-s.drift.reference_days:]
    if not days:
        return None
    manifests = {d: rt.lake.read_manifest(table, d) for d in days}
    total = sum(m["rows"] for m in manifests.values())
    if total == 0:
        return None
    keep = min(1.0, SAMPLE_ROWS / total)
    rng = np.random.default_rng(s.seed)
    numeric_cols = [*spec.numeric, SCORE]
    samples: dict[str, list[np.ndarray]] = {c: [] for c in numeric_cols}
    tracked = _distributional(spec)
    categories: dict[str, Counter] = {c: Counter() for c in tracked}
    label_sum = 0.0
    columns = [*tracked, *numeric_cols, spec.label.name]
    for d in days:
        for batch in rt.lake.iter_batches(table, d, s.validation.chunk_rows, columns):
            pick = rng.random(batch.num_rows) < keep
            for c in numeric_cols:
                samples[c].append(_floats(batch.column(c))[pick])
            for c in tracked:
                categories[c].update(_cat_values(batch.column(c).to_pandas()).value_counts().to_dict())
            label_sum += float(np.nansum(_floats(batch.column(spec.label.name))))
    numeric = {c: _numeric_bins(np.concatenate(v) if v else np.zeros(0), s.drift.bins) for c, v in samples.items()}
    return Reference(days=days, rows=total, categories=categories, numeric=numeric, label_sum=label_sum)


def _distributional(spec: FeatureSpec) -> list[str]:
    """Categoricals whose value mix means something: entity keys (user and item ids) are identities, and their
    top values churn every day, so a PSI or an unseen-value share on them would cry wolf nightly (new users are
    normal), and a set of every id seen in a week would grow with traffic."""
    keys = {e.key for e in spec.entities.values()}
    return [c for c in spec.categorical if c not in keys]


class DriftAccumulator:
    """Bins the day chunk by chunk against a fixed reference."""

    def __init__(self, spec: FeatureSpec, settings: Settings, reference: Reference | None) -> None:
        self.spec, self.settings, self.reference = spec, settings, reference
        self.rows = 0
        self.label_sum = 0.0
        self.numeric_counts: dict[str, np.ndarray] = {}
        self.category_counts: dict[str, Counter] = {c: Counter() for c in _distributional(spec)}
        if reference is not None:
            self._top = {c: [v for v, _ in reference.categories[c].most_common(TOP_VALUES)]
                         for c in _distributional(spec)}
            self.numeric_counts = {c: np.zeros_like(b.reference) for c, b in reference.numeric.items()}

    def update(self, frame: pd.DataFrame) -> None:
        self.rows += len(frame)
        label = pd.to_numeric(frame[self.spec.label.name], errors="coerce")
        self.label_sum += float(label.sum())
        if self.reference is None or not len(frame):
            return
        for c, b in self.reference.numeric.items():
            self.numeric_counts[c] += b.counts(pd.to_numeric(frame[c], errors="coerce").to_numpy(
                dtype=float, na_value=np.nan))
        for c, top_values in self._top.items():
            values = _cat_values(frame[c])
            top = values.where(values.isin(top_values), OTHER)
            self.category_counts[c].update(top.value_counts().to_dict())

    def report(self, day: date) -> DriftReport:
        ref, s = self.reference, self.settings
        if ref is None:
            return DriftReport(day=day.isoformat(), reference_days=[], rows=self.rows, items=[],
                               skipped="no validated day before this one to compare with")
        # PSI over a few dozen rows is mostly sampling noise (about (bins - 1) / rows when nothing moved: 0.18 for
        # 10 bins and 50 rows, near the severe threshold), so a small day is measured but not judged.
        judged = min(self.rows, ref.rows) >= s.drift.min_rows
        note = None if judged else (f"{min(self.rows, ref.rows)} rows, fewer than drift.min_rows={s.drift.min_rows}: "
                                    "PSI reported, not judged (sampling noise alone reaches the thresholds)")

        def grade(value: float) -> Severity:
            return severity(value, s) if judged else "none"

        items = []
        for c, b in ref.numeric.items():
            value = psi(b.reference, self.numeric_counts[c])
            items.append(DriftItem(name=c, kind="prediction" if c == SCORE else "numeric", psi=round(value, 6),
                                   severity=grade(value)))
        for c in self._top:
            keys = [*self._top[c], OTHER]
            other_ref = sum(n for v, n in ref.categories[c].items() if v not in set(self._top[c]))
            expected = np.array([ref.categories[c].get(v, 0) for v in self._top[c]] + [other_ref], dtype=float)
            actual = np.array([self.category_counts[c].get(v, 0) for v in keys], dtype=float)
            value = psi(expected, actual)
            items.append(DriftItem(name=c, kind="categorical", psi=round(value, 6), severity=grade(value)))
        ref_rate = ref.label_sum / ref.rows
        cur_rate = self.label_sum / self.rows if self.rows else 0.0
        value = psi(np.array([ref_rate, 1 - ref_rate]), np.array([cur_rate, 1 - cur_rate]))
        items.append(DriftItem(name=self.spec.label.name, kind="label", psi=round(value, 6),
                               severity=grade(value), reference=round(ref_rate, 6),
                               current=round(cur_rate, 6)))
        return DriftReport(day=day.isoformat(), reference_days=[d.isoformat() for d in ref.days], rows=self.rows,
                           items=items, skipped=note)


def store(rt: Runtime, report: DriftReport, inputs: dict[str, object]) -> None:
    """The day's drift as a small lake partition `drift/dt=D`, replaced whole on a re-run."""
    schema = pa.schema([("name", pa.string()), ("kind", pa.string()), ("psi", pa.float64()),
                        ("severity", pa.string()), ("reference", pa.float64()), ("current", pa.float64())])
    rows = [i.model_dump() for i in report.items]
    table = pa.Table.from_pylist(rows, schema=schema)
    rt.lake.write_partition(DRIFT, date.fromisoformat(report.day), table,
                            {**inputs, "reference_days": report.reference_days, "skipped": report.skipped})


def render(report: DriftReport, directory: Path, s: Settings) -> dict[str, str]:
    """PNG bar chart + HTML table + JSON in the day's report directory; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {"json": str(directory / "drift.json"), "html": str(directory / "drift.html")}
    (directory / "drift.json").write_text(report.model_dump_json(indent=2))
    img = ""
    if report.items:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        colors = {"none": "#6a6", "moderate": "#e90", "severe": "#c33"}
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(report.items) + 1.2))
        ax.barh([i.name for i in report.items], [i.psi for i in report.items],
                color=[colors[i.severity] for i in report.items])
        ax.axvline(s.drift.psi_warn, color="#e90", ls="--", lw=1)
        ax.axvline(s.drift.psi_severe, color="#c33", ls="--", lw=1)
        ax.set_xlabel("PSI vs reference")
        ax.set_title(f"Drift of {report.day} vs {len(report.reference_days)} reference days")
        fig.tight_layout()
        fig.savefig(directory / "drift.png", dpi=90)
        plt.close(fig)
        out["png"] = str(directory / "drift.png")
        img = "<img src='drift.png' alt='PSI per feature'>"
    body = "".join(f"<tr class={i.severity}><td>{html.escape(i.name)}</td><td>{i.kind}</td><td>{i.psi:.4f}</td>"
                   f"<td>{i.severity}</td></tr>" for i in report.items)
    note = html.escape(report.skipped or f"reference: {', '.join(report.reference_days)}")
    (directory / "drift.html").write_text(
        f"<html><head><meta charset=utf-8><title>Drift {report.day}</title><style>body{{font-family:sans-serif}}"
        "td{padding:2px 8px}.severe{background:#fdd}.moderate{background:#ffe9c0}</style></head><body>"
        f"<h1>Drift of {report.day}</h1><p>{note}</p>{img}<table><tr><th>feature</th><th>kind</th><th>PSI</th>"
        f"<th>severity</th></tr>{body}</table><pre>{html.escape(json.dumps(report.summary()))}</pre>"
        "</body></html>")
    return out
