"""`flywheel init`: a draft feature spec guessed from a user's history file, each guess with its reason.

Writing a spec by hand was the slowest part of adopting Flywheel. The guesses are deliberately plain rules a
user can check in the printed notes: types from the Arrow schema and the number of distinct values, the event
time from the first timestamp column, the label from a binary 0/1 column, entities from id-like columns and the
columns that never change within one id. The draft is validated by the same model as a hand-written spec.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.types as pat
import yaml

from feature_store.spec import _IDENT, RESERVED, FeatureSpec
from pipeline.errors import SpecError

SAMPLE_ROWS = 200_000  # statistics on a uniform sample: enough to type a column, cheap on a large history
ENUM_MAX = 10  # an integer column with at most this many values (beyond 0/1) is a code, not a measure
_LABEL_NAME = re.compile(r"^(label|target|y|class|outcome|is_.+|has_.+|.*(churn|default|fraud|click|convert"
                         r"|purchase|spam|phish|bad|success|fail).*)$", re.IGNORECASE)
_ID_NAME = re.compile(r"(^id$|_id$|^id_|Id$|_key$|_no$|_num$|_number$|_code$|^uuid$)")
_TIME_NAME = re.compile(r"(time|date|_at$|^ts$|timestamp|created|when)", re.IGNORECASE)


@dataclass
class Draft:
    """The guessed spec (a plain mapping, ready for YAML) and one note per guess, saying why."""

    spec: dict
    notes: list[str] = field(default_factory=list)


def draft_spec(table: pa.Table, name: str, label: str | None = None, event_time: str | None = None) -> Draft:
    notes: list[str] = []
    sample = _sample(table)
    columns = list(table.column_names)
    for wanted, flag in ((label, "--label"), (event_time, "--event-time")):
        if wanted is not None and wanted not in columns:
            raise SpecError(f"{flag} {wanted!r}: no such column (has: {', '.join(columns)})")
    et = event_time or _guess_event_time(table, sample, notes)
    if event_time:
        notes.append(f"event time: {et!r} (--event-time)")
    if et in RESERVED or not _IDENT.match(et):
        raise SpecError(f"event-time column {et!r} is reserved or not a valid name: rename it in the file")
    lab = _choose_label(sample, [c for c in columns if c != et], label, notes)
    names = _NameMap()
    features: dict[str, dict] = {}
    for col in columns:
        if col in (et, lab):
            continue
        if (entry := _feature(table.schema.field(col).type, sample[col], col, notes)) is not None:
            fname = names.of(col, f"features.{col}", notes)
            features[fname] = {**entry, "source": col} if fname != col else entry
    if not features:
        raise SpecError("no usable feature column: every column is the label, the event time, constant or empty")
    entities = _entities(sample, features, names, notes)
    spec_name = _identifier(name) or "history"
    label_name = names.of(lab, "label", notes)
    label_entry = {"name": label_name, **({"source": lab} if label_name != lab else {}),
                   "attribution_window": "1d", "missing": "drop"}
    if any(f["type"] == "numeric" for f in features.values()):
        notes.append("numeric ranges: the values seen, widened by one observed range each way (0 for a non-negative "
                     "column, 1 for a fraction); rows outside are quarantined, so widen or drop min/max if values "
                     "may legitimately go further")
    notes.append("label.attribution_window: 1d and missing: drop are defaults, not guesses: set the window to "
                 "how long after a prediction its label can still arrive, and missing: negative if a label that "
                 "never comes means 0")
    spec = {"name": spec_name, "event_time": et, "entities": entities, "features": features, "label": label_entry}
    FeatureSpec.model_validate(spec)  # a draft that would not load is a bug here, not the user's problem
    return Draft(spec=spec, notes=notes)


def render(draft: Draft, source: str) -> str:
    """The draft as YAML, its notes as comments on top, so the file itself says what was guessed."""
    head = [f"# Drafted by `flywheel init` from {source}. Check every guess below, then bootstrap.",
            *(f"#  - {n}" for n in draft.notes)]
    body = yaml.safe_dump(draft.spec, sort_keys=False, default_flow_style=None, width=120)
    return "\n".join(head) + "\n" + body


def _sample(table: pa.Table) -> pd.DataFrame:
    if table.num_rows > SAMPLE_ROWS:
        step = table.num_rows / SAMPLE_ROWS
        table = table.take(pa.array([int(i * step) for i in range(SAMPLE_ROWS)]))
    return table.to_pandas()


class _NameMap:
    """File column -> spec name: the same name, unless it is one of Flywheel's log columns or not a valid
    identifier; then a new name that reads the column through `source:`."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def of(self, col: str, where: str, notes: list[str]) -> str:
        if col in self.names:
            return self.names[col]
        name = col
        if col in RESERVED:
            name = f"{col}_value"
            notes.append(f"{where}: the column {col!r} is named like one of Flywheel's own log columns; the spec "
                         f"calls it {name!r} and reads it from {col!r} (source: {col}), so the file keeps its column")
        elif not _IDENT.match(col):
            name = _identifier(col) or "column"
            notes.append(f"{where}: {col!r} is not a valid spec name; called {name!r}, read through source: {col!r}")
        taken = set(self.names.values())
        base, i = name, 2
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        self.names[col] = name
        return name


def _identifier(text: str) -> str:
    out = re.sub(r"\W+", "_", text).strip("_")
    return f"c_{out}" if out[:1].isdigit() else out


def _guess_event_time(table: pa.Table, sample: pd.DataFrame, notes: list[str]) -> str:
    for f in table.schema:
        if pat.is_timestamp(f.type) or pat.is_date(f.type):
            notes.append(f"event time: {f.name!r}, the first timestamp column ({f.type}); --event-time overrides")
            return f.name
    for f in table.schema:
        if _TIME_NAME.search(f.name) and (pat.is_string(f.type) or pat.is_large_string(f.type)):
            parsed = pd.to_datetime(sample[f.name].dropna().head(1000), errors="coerce", utc=True, format="mixed")
            if len(parsed) and parsed.notna().mean() > 0.95:
                notes.append(f"event time: {f.name!r}, a text column that parses as dates; --event-time overrides")
                return f.name
    for f in table.schema:
        epoch = sample[f.name].dropna()
        if _TIME_NAME.search(f.name) and (pat.is_integer(f.type) or pat.is_floating(f.type)) and len(epoch) \
                and 1e8 < float(epoch.median()) < 1e19:
            notes.append(f"event time: {f.name!r}, a number named like a time, read as epoch seconds/ms/us/ns by "
                         "magnitude; --event-time overrides")
            return f.name
    raise SpecError("no event-time column found (no timestamp or date column, no text column of dates or epoch "
                    "numbers named like a time): add one to the file, or name it with --event-time COL")


def _binary01(values: pd.Series) -> bool:
    v = values.dropna()
    if pd.api.types.is_bool_dtype(v):
        return v.nunique() == 2
    if not pd.api.types.is_numeric_dtype(v):
        return False
    return v.nunique() == 2 and set(v.unique().tolist()) <= {0, 1}


def _choose_label(sample: pd.DataFrame, columns: list[str], label: str | None, notes: list[str]) -> str:
    if label is not None:
        values = sorted(map(str, sample[label].dropna().unique().tolist()))[:5]
        if not _binary01(sample[label]):
            raise SpecError(f"--label {label!r} is not a binary 0/1 (or true/false) column (values: "
                            f"{', '.join(values)}{' ...' if sample[label].nunique() > 5 else ''}): "
                            "bootstrap needs 0/1; convert it in the file")
        notes.append(f"label: {label!r} (--label)")
        return label
    binary = [c for c in columns if _binary01(sample[c])]
    if not binary:
        raise SpecError("no binary 0/1 column to use as the label: name it with --label COL")
    named = [c for c in binary if _LABEL_NAME.match(c)]
    choice = (named or binary)[-1]
    why = "its name reads like an outcome" if named else "the last binary 0/1 column"
    others = [c for c in binary if c != choice]
    notes.append(f"label: {choice!r}, {why} (rate {sample[choice].astype(float).mean():.3f})"
                 + (f"; other binary columns stay features: {', '.join(others)}" if others else "")
                 + "; --label overrides")
    return choice


def _feature(dtype: pa.DataType, values: pd.Series, col: str, notes: list[str]) -> dict | None:
    present = values.dropna()
    distinct = int(present.nunique())
    if distinct == 0:
        notes.append(f"{col}: left out, empty in the history")
        return None
    if distinct == 1:
        notes.append(f"{col}: left out, constant ({present.iloc[0]!r}): nothing to learn from")
        return None
    if pat.is_timestamp(dtype) or pat.is_date(dtype) or pat.is_time(dtype) or pat.is_duration(dtype):
        notes.append(f"{col}: left out, a second time column ({dtype}); derive numeric features from it if useful")
        return None
    if pat.is_nested(dtype) or pat.is_binary(dtype) or pat.is_large_binary(dtype):
        notes.append(f"{col}: left out, {dtype} is neither a number nor a category")
        return None
    entry = (_categorical(col, distinct, len(present), notes) if _is_categorical(dtype, col, distinct)
             else _numeric(col, present.astype("float64"), notes))
    if entry is not None and len(present) < len(values):
        entry["nullable"] = True
        notes.append(f"{col}: nullable, {1 - len(present) / len(values):.1%} missing in the history")
    return entry


def _is_categorical(dtype: pa.DataType, col: str, distinct: int) -> bool:
    if pat.is_dictionary(dtype) or pat.is_string(dtype) or pat.is_large_string(dtype):
        return True
    if pat.is_integer(dtype):
        return bool(_ID_NAME.search(col)) or 2 < distinct <= ENUM_MAX
    return False


def _categorical(col: str, distinct: int, n: int, notes: list[str]) -> dict | None:
    if distinct == n and n > 100 and not _ID_NAME.search(col):
        notes.append(f"{col}: left out, a different value on every row (a row id or free text); a model cannot "
                     "learn from values it never sees twice")
        return None
    why = "id-like name" if _ID_NAME.search(col) else f"{distinct} distinct values"
    notes.append(f"{col}: categorical ({why})")
    return {"type": "categorical"}


def _numeric(col: str, values: pd.Series, notes: list[str]) -> dict:
    """Ranges from the data, with a margin of one observed range beyond each end (a unit change or a garbage
    value lands outside; ordinary growth does not): non-negative columns get min 0, fractions max 1."""
    finite = values[values.map(math.isfinite)]
    entry: dict = {"type": "numeric"}
    if not len(finite):
        return entry
    lo, hi = float(finite.min()), float(finite.max())
    width = hi - lo
    entry["min"] = 0 if lo >= 0 else _round(lo - width, down=True)
    entry["max"] = 1 if lo >= 0 and hi <= 1 else _round(hi + width, down=False)
    notes.append(f"{col}: numeric, seen {lo:g}..{hi:g}; range {entry['min']:g}..{entry['max']:g}")
    return entry


def _round(x: float, down: bool) -> float:
    """Outward to 3 significant digits: a readable bound that still contains x."""
    if x == 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(abs(x))) - 2)
    return float((math.floor if down else math.ceil)(x / scale) * scale)


def _entities(sample: pd.DataFrame, features: dict[str, dict], names: _NameMap, notes: list[str]) -> dict:
    """Id-like categorical columns that repeat become entities; every other column whose value never changes
    within one id (in 99% of the ids seen at least twice) becomes that entity's attribute."""
    spec_to_col = {v: k for k, v in names.names.items()}
    entities: dict[str, dict] = {}
    for fname, entry in features.items():
        col = spec_to_col[fname]
        counts = sample[col].value_counts()
        if entry["type"] != "categorical" or not _ID_NAME.search(col) or (counts >= 2).sum() < 10:
            continue
        ename = _identifier(re.sub(r"(_id|Id|_key|_no|_num|_number|_code)$", "", fname)) or fname
        if ename in entities or ename in features:
            ename = f"{ename}_entity"
        entities[ename] = {"key": fname}
        attrs = _attributes(sample, col, counts, [c for c in features if c != fname and
                                                  "entity" not in features[c]], spec_to_col)
        for a in attrs:
            features[a]["entity"] = ename
        notes.append(f"entity {ename!r}: key {fname!r} (id-like name, {len(counts)} ids, repeating)"
                     + (f"; its attributes (one value per id): {', '.join(attrs)}" if attrs else ""))
    return entities


def _attributes(sample: pd.DataFrame, key: str, counts: pd.Series, candidates: list[str],
                spec_to_col: dict[str, str]) -> list[str]:
    repeated = sample[sample[key].isin(counts[counts >= 2].index)]
    out = []
    for fname in candidates:
        per_id = repeated.groupby(key, observed=True)[spec_to_col[fname]].nunique(dropna=False)
        if len(per_id) and (per_id <= 1).mean() >= 0.99:
            out.append(fname)
    return out
