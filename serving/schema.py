"""Request parsing against the feature spec, hand-written because it is on the hot path and its errors must
name the exact field (`rows[3].price: ...`) so a client can fix its payload."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pandas as pd

from feature_store.spec import Feature, FeatureSpec, FeatureType
from feature_store.vocab import canonical_value
from pipeline.config import Settings
from pipeline.errors import RequestError


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on what a client chooses: ids and string values are repeated on every logged row (an uncapped id
    grew the spool by 49 MB for one 256 KB request), and event times pick lake partitions (year 1 or 9999 would
    create partitions no night ever collects)."""

    max_id_chars: int = 128
    max_string_chars: int = 1024
    past: timedelta = timedelta(days=18262)
    future: timedelta = timedelta(days=366)

    @classmethod
    def from_settings(cls, s: Settings) -> RequestLimits:
        v = s.serving
        return cls(max_id_chars=v.max_request_id_chars, max_string_chars=v.max_string_chars,
                   past=timedelta(days=v.event_time_past_days), future=timedelta(days=v.event_time_future_days))


DEFAULT_LIMITS = RequestLimits()


def parse_request_id(value: object, where: str, limits: RequestLimits = DEFAULT_LIMITS) -> str | None:
    """A client-chosen id (None when not sent): a non-empty string of at most `max_id_chars`."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RequestError(f"{where}: expected a non-empty string")
    if len(value) > limits.max_id_chars:
        raise RequestError(f"{where}: {len(value)} characters exceed the limit of {limits.max_id_chars}")
    return value


def _in_window(ts: datetime, where: str, limits: RequestLimits, now: datetime) -> datetime:
    if not now - limits.past <= ts <= now + limits.future:
        raise RequestError(f"{where}: {ts.isoformat()} is outside the accepted window of server time "
                           f"-{limits.past.days} to +{limits.future.days} days")
    return ts


def _parse_time(value: object, where: str) -> datetime:
    try:
        if isinstance(value, str):
            ts = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            ts = datetime.fromtimestamp(float(value), tz=UTC)
        else:
            raise RequestError(f"{where}: expected an ISO-8601 string or epoch seconds, got {type(value).__name__}")
        return ts.astimezone(UTC) if ts.tzinfo else ts.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError) as e:
        raise RequestError(f"{where}: not a usable time: {value!r} ({e})") from e


@dataclass(frozen=True)
class RowNames:
    """The names a row may use, built once per spec so that parsing a row builds no dicts: each feature under
    its spec name or, when the spec declares `source:`, under that source name too, because live rows often
    keep the column names of the user's history file. A source name that is also a spec name (of another
    feature or the event time) keeps its spec meaning: rows already sent under spec names never change."""

    fields: tuple[tuple[str, str | None, Feature], ...]  # spec name, the source name also accepted, feature
    allowed: frozenset[str]

    @classmethod
    def of(cls, spec: FeatureSpec) -> RowNames:
        own = {*spec.features, spec.event_time}
        fields = []
        for name, f in spec.features.items():
            source = spec.source_columns[name]
            fields.append((name, source if source != name and source not in own else None, f))
        return cls(tuple(fields), frozenset(own | {a for _, a, _ in fields if a is not None}))

    @property
    def sources(self) -> dict[str, str]:
        """Spec name -> the source name a row may use instead."""
        return {name: alias for name, alias, _ in self.fields if alias is not None}


_ROW_NAMES: dict[int, tuple[FeatureSpec, RowNames]] = {}


def row_names(spec: FeatureSpec) -> RowNames:
    """`RowNames.of(spec)`, computed once per spec object (the server has one; the spec is frozen)."""
    hit = _ROW_NAMES.get(id(spec))
    if hit is not None and hit[0] is spec:
        return hit[1]
    if len(_ROW_NAMES) >= 64:  # many short-lived specs (tests, tools): bound the cache, never the server's one
        _ROW_NAMES.clear()
    names = RowNames.of(spec)
    _ROW_NAMES[id(spec)] = (spec, names)
    return names


def parse_rows(body: object, spec: FeatureSpec, max_rows: int, fillable: frozenset[str] = frozenset(),
               limits: RequestLimits = DEFAULT_LIMITS) -> tuple[dict[str, list], list[datetime | None]]:
    """Column lists for the spec's features (under their spec names, as they are logged), and each row's event
    time (None when not sent). A feature may come under its spec name or its declared source name, not both.
    Features in `fillable` (entity features the online store can supply) may be absent: they are left None
    for `fill_from_store`, which enforces non-nullability once the store had its say."""
    if not isinstance(body, dict):
        raise RequestError("body: expected a JSON object with a 'rows' list")
    unknown_top = set(body) - {"rows", "request_id"}
    if unknown_top:
        raise RequestError(f"body: unknown field(s) {sorted(unknown_top)}; expected 'rows' and optional 'request_id'")
    rows = body.get("rows")
    if not isinstance(rows, list) or not rows:
        raise RequestError("rows: expected a non-empty list of objects")
    if len(rows) > max_rows:
        raise RequestError(f"rows: {len(rows)} rows exceed the limit of {max_rows} per request", status=413)
    names = row_names(spec)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise RequestError(f"rows[{i}]: expected an object")
        if not row.keys() <= names.allowed:
            raise RequestError(f"rows[{i}]: unknown field(s) {sorted(row.keys() - names.allowed)}")
    cols = {name: _column(rows, name, alias, f, name in fillable, limits) for name, alias, f in names.fields}
    now, where = datetime.now(UTC), spec.event_time
    times = [None if (t := row.get(where)) is None else
             _in_window(_parse_time(t, f"rows[{i}].{where}"), f"rows[{i}].{where}", limits, now)
             for i, row in enumerate(rows)]
    return cols, times


def _column(rows: list[dict], name: str, alias: str | None, f: Feature, fillable: bool,
            limits: RequestLimits) -> list:
    """One feature's values over the rows. Column by column with a check of the whole column first, because
    the common case (every value already of the right type) then costs one pass and no per-value call:
    per-value parsing with an error location built for every value was a third of the server's CPU at 256
    rows per request (py-spy)."""
    values = [row.get(name) for row in rows]
    sent = [name] * len(rows)
    if alias is not None:
        for i, row in enumerate(rows):
            if alias in row:
                if name in row:
                    raise RequestError(f"rows[{i}].{alias}: feature {name!r} sent twice, as {name!r} and as its "
                                       f"source column {alias!r}; send one of the two")
                values[i], sent[i] = row[alias], alias
    if f.type is FeatureType.NUMERIC:
        if all(type(v) is float for v in values):
            return values
    elif all(type(v) is str and len(v) <= limits.max_string_chars for v in values):
        return values
    return [_value(v, f, i, sent[i], fillable, limits, alias) for i, v in enumerate(values)]


def _value(v: object, f: Feature, i: int, sent: str, fillable: bool, limits: RequestLimits,
           alias: str | None = None) -> object:
    if v is None:
        if not f.nullable and not fillable:
            also = f"; also accepted as {alias!r}" if alias is not None else ""
            raise RequestError(f"rows[{i}].{sent}: missing (required by the feature spec{also})")
        return None
    if f.type is FeatureType.NUMERIC:
        if not isinstance(v, int | float):  # bool is an int: a flag column is a 0/1 number
            raise RequestError(f"rows[{i}].{sent}: expected a number, got {type(v).__name__}")
        return float(v)
    if not isinstance(v, str | int | float):
        raise RequestError(f"rows[{i}].{sent}: expected a string (or a number used as an id), got "
                           f"{type(v).__name__}")
    v = canonical_value(v)
    if len(v) > limits.max_string_chars:
        raise RequestError(f"rows[{i}].{sent}: {len(v)} characters exceed the limit of {limits.max_string_chars}")
    return v


@dataclass
class Lookup:
    """What a request batch needs from the online store: per entity, the distinct keys and, per key, the rows
    (and their missing features) that the values go to."""

    wanted: dict[str, tuple[list[str], list[str]]]
    targets: dict[str, list[list[tuple[int, str]]]]


def plan_lookup(cols: dict[str, list], spec: FeatureSpec, entity_of: dict[str, str]) -> Lookup | None:
    """None when every row carries its entity features: the common case costs one scan, no store call."""
    missing = [name for name in entity_of if None in cols[name]]
    if not missing:
        return None
    wanted: dict[str, tuple[list[str], list[str]]] = {}
    targets: dict[str, list[list[tuple[int, str]]]] = {}
    slots: dict[str, dict[str, int]] = {}
    for name in missing:
        entity = entity_of[name]
        key_col = cols[spec.entities[entity].key]
        keys, features = wanted.setdefault(entity, ([], []))
        features.append(name)
        index = slots.setdefault(entity, {})
        rows = targets.setdefault(entity, [])
        for i, v in enumerate(cols[name]):
            key = key_col[i]
            if v is not None or key is None:
                continue
            key = canonical_value(key)
            if key not in index:
                index[key] = len(keys)
                keys.append(key)
                rows.append([])
            rows[index[key]].append((i, name))
    return Lookup(wanted, targets)


def fill_from_store(cols: dict[str, list], spec: FeatureSpec, lookup: Lookup,
                    found: dict[str, list[dict]]) -> None:
    """Write the store's values into the request's columns (request values were kept), then refuse rows whose
    non-nullable feature is still missing, naming the feature and the key the store did not know."""
    for entity, per_key in lookup.targets.items():
        for values, rows in zip(found[entity], per_key, strict=True):
            for i, name in rows:
                stored = values.get(name)
                if stored is not None:
                    cols[name][i] = stored.value
    for entity, (_, features) in lookup.wanted.items():
        key_name = spec.entities[entity].key
        for name in features:
            if spec.features[name].nullable:
                continue
            column = cols[name]
            if None in column:
                i = column.index(None)
                key = cols[key_name][i]
                why = f"no {key_name} to look it up by" if key is None else \
                    f"the online store has no value for {key_name}={canonical_value(key)!r}"
                raise RequestError(f"rows[{i}].{name}: missing in the request and {why}")


def parse_feedback(body: object, label_domain: tuple[float, ...] = (0.0, 1.0),
                   limits: RequestLimits = DEFAULT_LIMITS) -> list[dict]:
    items = body if isinstance(body, list) else [body]
    if not items:
        raise RequestError("body: empty feedback list")
    out, now = [], datetime.now(UTC)
    for i, item in enumerate(items):
        where = f"[{i}]" if isinstance(body, list) else "body"
        if not isinstance(item, dict):
            raise RequestError(f"{where}: expected an object with request_id, label and optional row, time")
        extra = set(item) - {"request_id", "row", "label", "time"}
        if extra:
            raise RequestError(f"{where}: unknown field(s) {sorted(extra)}")
        rid = parse_request_id(item.get("request_id"), f"{where}.request_id", limits)
        if rid is None:
            raise RequestError(f"{where}.request_id: expected a non-empty string")
        row = item.get("row", 0)
        if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < 2**31:
            raise RequestError(f"{where}.row: expected a non-negative integer below 2^31")
        label = item.get("label")
        if isinstance(label, bool):
            label = float(label)
        if not isinstance(label, int | float) or float(label) not in label_domain:
            raise RequestError(f"{where}.label: expected one of {list(label_domain)}, got {label!r}")
        t = item.get("time")
        out.append({"request_id": rid, "row": row, "label": float(label),
                    "label_time": None if t is None else _in_window(_parse_time(t, f"{where}.time"),
                                                                    f"{where}.time", limits, now)})
    return out


def _property(ftype: FeatureType, entity_key: str | None, limits: RequestLimits, note: str = "") -> dict:
    prop: dict = {"type": "number"} if ftype is FeatureType.NUMERIC else \
        {"type": ["string", "integer"], "maxLength": limits.max_string_chars}
    if entity_key is not None:
        note = f"Optional: when omitted, the online store's latest value for the row's {entity_key}. {note}"
    if note.strip():
        prop["description"] = note.strip()
    return prop


def _row_schema(spec: FeatureSpec, fillable: dict[str, str], limits: RequestLimits) -> dict:
    """A row: each feature under its spec name or its source name (exactly one of the two when the feature is
    required, at most one otherwise), and the optional event time."""
    sources = row_names(spec).sources
    required = [n for n, f in spec.features.items() if not f.nullable and n not in fillable]
    properties: dict[str, dict] = {}
    either: list[dict] = []
    for n, f in spec.features.items():
        alias = sources.get(n)
        note = "" if alias is None else f"Also accepted as '{alias}' (its source column); send one of the two."
        properties[n] = _property(f.type, fillable.get(n), limits, note)
        if alias is None:
            continue
        properties[alias] = _property(f.type, fillable.get(n), limits, f"Feature '{n}' under its source "
                                      f"column name; send '{n}' or '{alias}', not both.")
        either.append({"oneOf": [{"required": [n]}, {"required": [alias]}]} if n in required else
                      {"not": {"required": [n, alias]}})
    row = {"type": "object", "additionalProperties": False, "required": [n for n in required if n not in sources],
           "properties": {**properties, spec.event_time: {"type": "string", "format": "date-time"}}}
    if either:
        row["allOf"] = either
    return row


def openapi_bodies(spec: FeatureSpec, max_rows: int, fillable: dict[str, str] | None = None,
                   limits: RequestLimits = DEFAULT_LIMITS) -> dict[str, dict]:
    """JSON schemas of the request bodies, derived from the spec, so the published OpenAPI document tells
    clients (and fuzzers) exactly what /predict and /feedback accept. Ranges are deliberately not enforced
    here: out-of-range values are served, logged and quarantined by validation, not refused. `fillable` maps
    entity features to their entity's key: those are optional, the server fills them from the online store."""
    row = _row_schema(spec, fillable or {}, limits)
    request_id = {"type": "string", "minLength": 1, "maxLength": limits.max_id_chars}
    predict = {"type": "object", "additionalProperties": False, "required": ["rows"], "properties": {
        "rows": {"type": "array", "minItems": 1, "maxItems": max_rows, "items": row},
        "request_id": request_id}}
    item = {"type": "object", "additionalProperties": False, "required": ["request_id", "label"], "properties": {
        "request_id": request_id, "row": {"type": "integer", "minimum": 0},
        "label": {"type": "number", "enum": [0, 1]}, "time": {"type": "string", "format": "date-time"}}}
    feedback = {"oneOf": [item, {"type": "array", "minItems": 1, "items": item}]}

    def body(schema: dict) -> dict:
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

    return {"predict": body(predict), "feedback": body(feedback)}


def warmup_frame(spec: FeatureSpec, rows: int = 4) -> pd.DataFrame:
    data = {}
    for name, f in spec.features.items():
        if f.type is FeatureType.NUMERIC:
            base = f.min if f.min is not None else 0.0
            data[name] = [float(base)] * rows
        else:
            data[name] = [f"warmup-{i}" for i in range(rows)]
    return pd.DataFrame(data)
