"""Offline entity feature tables: per-entity history in the lake, `features/<entity>/dt=D/`, and the
point-in-time join that reads it.

Everything is derived from the spec: an entity feature is a feature declared with `entity: E` that is not E's
key. A table row says "as of `<event_time>`, entity `<key>` had these feature values"; a table may carry any
subset of its entity's features, and a null means "not known at this time" (it never erases an earlier
value), so tables fed by different sources can share one entity. Partitions are keyed by the as-of day and
rewritten through `Lake` (temp dir + rename + manifest), merged with what the day already holds, so ingesting
the same input twice leaves the same rows.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from feature_store.log_schema import TS, feature_field
from feature_store.offline import Lake
from feature_store.spec import FeatureSpec, FeatureType
from feature_store.vocab import canonical
from pipeline.errors import EntityTableError

TABLE_PREFIX = "features"


class IngestResult(BaseModel):
    entity: str
    rows_in: int
    duplicates_collapsed: int
    days: list[date]
    partitions_written: int
    partitions_unchanged: int
    rows_total: int


def table_name(entity: str) -> str:
    return f"{TABLE_PREFIX}/{entity}"


def entity_key(spec: FeatureSpec, entity: str) -> str:
    if entity not in spec.entities:
        raise EntityTableError(f"unknown entity {entity!r}; the spec declares {sorted(spec.entities)}")
    return spec.entities[entity].key


def entity_features(spec: FeatureSpec, entity: str) -> list[str]:
    """Features describing `entity` that a store can supply given its key (the key itself is not one)."""
    key = entity_key(spec, entity)
    return [n for n, f in spec.features.items() if f.entity == entity and n != key]


def lookup_features(spec: FeatureSpec) -> dict[str, str]:
    """Every entity feature and the entity it belongs to: what the server may fill from the online store."""
    return {n: e for e in spec.entities for n in entity_features(spec, e)}


def table_schema(spec: FeatureSpec, entity: str) -> pa.Schema:
    """Key (always the canonical string form, as the vocabularies and the online store key on), as-of time,
    then every entity feature, so partitions of one entity always concatenate."""
    key = entity_key(spec, entity)
    return pa.schema([pa.field(key, pa.string(), nullable=False), pa.field(spec.event_time, TS, nullable=False),
                      *(feature_field(n, spec.features[n].type) for n in entity_features(spec, entity))])


def _read_source(source: str | Path | pa.Table | pd.DataFrame) -> pa.Table:
    if isinstance(source, pa.Table):
        return source
    if isinstance(source, pd.DataFrame):
        return pa.Table.from_pandas(source, preserve_index=False)
    path = Path(source)
    if not path.exists():
        raise EntityTableError(f"{path}: no such file")
    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise EntityTableError(f"{path}: not a readable Parquet file ({e})") from e


def _as_time(col: pa.ChunkedArray, where: str) -> pa.ChunkedArray:
    if pa.types.is_null(col.type):
        return col.cast(TS)
    if pa.types.is_timestamp(col.type):
        if col.type.tz is None:  # a naive time is read as UTC, like the request path does
            col = pc.assume_timezone(col, "UTC")
        return col.cast(TS)
    if pa.types.is_date(col.type):
        return col.cast(pa.timestamp("s")).cast(pa.timestamp("us")).cast(TS)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        try:
            parsed = pd.to_datetime(pd.Series(col.to_pylist(), dtype="object"), utc=True, format="ISO8601")
        except (ValueError, TypeError) as e:
            raise EntityTableError(f"{where}: not ISO-8601 times ({e})") from e
        return pa.chunked_array([pa.array(parsed.dt.as_unit("us"), TS)])
    raise EntityTableError(f"{where}: expected timestamps (or ISO-8601 strings), got {col.type}")


def _as_category(col: pa.ChunkedArray, where: str) -> pa.ChunkedArray:
    t = col.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t) or pa.types.is_null(t):
        return col.cast(pa.string())
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        return pa.chunked_array([pa.array(canonical(col.to_pandas()).astype(object), pa.string())])
    raise EntityTableError(f"{where}: expected strings (or integer ids), got {t}")


def _as_number(col: pa.ChunkedArray, where: str) -> pa.ChunkedArray:
    t = col.type
    if (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_boolean(t)
            or pa.types.is_null(t)):
        return col.cast(pa.float64())
    raise EntityTableError(f"{where}: expected numbers, got {t}")


def _origin(source: str | Path | pa.Table | pd.DataFrame) -> str:
    return "" if isinstance(source, pa.Table | pd.DataFrame) else f"{source}: "


def to_spec_names(spec: FeatureSpec, entity: str, data: pa.Table, origin: str = "") -> pa.Table:
    """The input with the entity's columns under their spec names: a column the spec reads a feature from
    (`source:`) is renamed like bootstrap renames the history file's; the spec name itself is still accepted
    (files written before the spec said `source:`), but not both in one file. `origin` ("<file>: ") prefixes
    errors so a refused file is named."""
    columns = spec.source_columns
    renames = {columns[n]: n for n in (entity_key(spec, entity), *entity_features(spec, entity))
               if columns[n] != n}
    if not renames:
        return data
    given = data.column_names
    for source, name in renames.items():
        if source in given and name in given and name not in renames:
            raise EntityTableError(f"{origin}entity {entity!r}: feature {name!r} is given twice, as column "
                                   f"{source!r} (its source: in the spec) and as {name!r}; keep one")
    key = entity_key(spec, entity)
    if key in renames.values() and columns[key] not in given and key not in given:
        raise EntityTableError(f"{origin}entity {entity!r}: column {columns[key]!r} is missing: the spec reads "
                               f"its key feature {key!r} from it (source: {columns[key]}); columns: {given}")
    return data.rename_columns([renames.get(c, c) for c in given])


def conform(spec: FeatureSpec, entity: str, data: pa.Table, origin: str = "") -> pa.Table:
    """The input (columns under spec names) as a table of `table_schema`, or an error naming the first column
    that is wrong, after `origin` ("<file>: ") when the input came from a file."""
    key = entity_key(spec, entity)
    features = entity_features(spec, entity)
    if not features:
        raise EntityTableError(f"entity {entity!r} has no features besides its key {key!r}: nothing to store")
    where = f"{origin}entity {entity!r}"
    for required in (key, spec.event_time):
        if required not in data.column_names:
            raise EntityTableError(f"{where}: column {required!r} is missing (columns: {data.column_names})")
    read_as = {c: n for n, c in spec.source_columns.items() if c != n and n in spec.features}
    for column in data.column_names:
        if column in (key, spec.event_time) or column in features:
            continue
        name = read_as.get(column, column)
        owner = spec.features[name].entity if name in spec.features else None
        hint = (f"it belongs to entity {owner!r}" if owner else
                "it is not an entity feature" if name in spec.features else "the spec does not declare it")
        if name != column:
            hint = f"the spec reads feature {name!r} from it; {hint}"
        raise EntityTableError(f"{where}: column {column!r} cannot be stored here ({hint}); "
                               f"allowed: {_allowed(spec, [key, spec.event_time, *features])}")
    given = [n for n in features if n in data.column_names]
    if not given:
        raise EntityTableError(f"{where}: no feature column; expected at least one of {_allowed(spec, features)}")
    if data.num_rows == 0:
        raise EntityTableError(f"{where}: the input has no rows")
    cols: dict[str, pa.ChunkedArray] = {
        key: _as_category(data.column(key), f"{where}: column {_shown(spec, key)}"),
        spec.event_time: _as_time(data.column(spec.event_time), f"{where}: column {spec.event_time!r}"),
    }
    for required in (key, spec.event_time):
        nulls = cols[required].null_count
        if nulls:
            raise EntityTableError(f"{where}: column {_shown(spec, required)} has {nulls} null value(s); "
                                   "every row needs one")
    schema = table_schema(spec, entity)
    for name in features:
        f = spec.features[name]
        if name not in data.column_names:
            cols[name] = pa.chunked_array([pa.nulls(data.num_rows, schema.field(name).type)])
            continue
        cw = f"{where}: column {_shown(spec, name)}"
        col = _as_number(data.column(name), cw) if f.type is FeatureType.NUMERIC else _as_category(data.column(name), cw)
        if col.null_count and not f.nullable:
            raise EntityTableError(f"{cw}: {col.null_count} null value(s) but the feature is not nullable")
        if f.type is FeatureType.NUMERIC:
            for bound, bad in ((f.min, pc.less), (f.max, pc.greater)):
                if bound is not None:
                    n_bad = pc.sum(bad(col, bound)).as_py() or 0
                    if n_bad:
                        raise EntityTableError(f"{cw}: {n_bad} value(s) outside the spec's range "
                                               f"[{f.min}, {f.max}]")
        cols[name] = col
    return pa.table(cols, schema=schema)


def _allowed(spec: FeatureSpec, names: list[str]) -> list[str]:
    """The columns a file may use for `names`: the source column where the spec declares one, or the name."""
    columns = spec.source_columns
    return [n if columns.get(n, n) == n else f"{columns[n]} (or {n})" for n in names]


def _shown(spec: FeatureSpec, name: str) -> str:
    """A column as the user's file names it, with the spec name when they differ."""
    source = spec.source_columns.get(name, name)
    return repr(name) if source == name else f"{source!r} (feature {name!r})"


def _merge(old: pd.DataFrame | None, new: pd.DataFrame, key: str, time_col: str) -> pd.DataFrame:
    """Rows keyed by (key, as-of time); for the same key and time the newer input's non-null values win and
    the older input's values fill its gaps."""
    frames = [new] if old is None else [old, new]
    both = pd.concat(frames, ignore_index=True)
    merged = both.groupby([key, time_col], sort=True, dropna=False).last().reset_index()
    return merged[list(new.columns)]


def _frame(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas(types_mapper={pa.string(): pd.StringDtype()}.get)


def ingest(lake: Lake, spec: FeatureSpec, entity: str,
           source: str | Path | pa.Table | pd.DataFrame) -> IngestResult:
    """Add entity feature values (a Parquet file or a frame, columns named as in the user's files) to the
    entity's offline table; idempotent."""
    origin = _origin(source)
    data = conform(spec, entity, to_spec_names(spec, entity, _read_source(source), origin), origin)
    key, time_col = entity_key(spec, entity), spec.event_time
    schema = table_schema(spec, entity)
    frame = _frame(data)
    collapsed = frame.drop_duplicates()
    clash = collapsed.duplicated([key, time_col], keep=False)
    if clash.any():
        first = collapsed[clash].iloc[0]
        raise EntityTableError(
            f"entity {entity!r}: {int(clash.sum())} rows share a ({key}, {time_col}) pair with different values, "
            f"e.g. {key}={first[key]!r} at {first[time_col].isoformat()}; which one holds is ambiguous")
    days = collapsed[time_col].dt.date
    present = set(lake.partition_days(table_name(entity)))
    written = unchanged = total = 0
    for day in sorted(days.unique()):
        part = collapsed[days == day]
        old = _frame(lake.read_partition(table_name(entity), day).cast(schema)) if day in present else None
        merged = _merge(old, part, key, time_col)
        total += len(merged)
        if old is not None and len(old) == len(merged) and old.reset_index(drop=True).equals(merged):
            unchanged += 1
            continue
        lake.write_partition(table_name(entity), day, pa.Table.from_pandas(merged, schema=schema,
                                                                            preserve_index=False),
                             inputs={"ingested_rows": len(part)})
        written += 1
    return IngestResult(entity=entity, rows_in=data.num_rows, duplicates_collapsed=len(frame) - len(collapsed),
                        days=sorted(days.unique()), partitions_written=written, partitions_unchanged=unchanged,
                        rows_total=total)


def read_table(lake: Lake, spec: FeatureSpec, entity: str, days: list[date] | None = None,
               keys: list[str] | None = None, columns: list[str] | None = None) -> pa.Table:
    """An entity's rows from the given day partitions (default: all), only the requested keys and columns,
    read with Parquet filter/projection pushdown."""
    name = table_name(entity)
    key = entity_key(spec, entity)
    schema = table_schema(spec, entity)
    wanted = [key, spec.event_time, *(columns if columns is not None else entity_features(spec, entity))]
    out_schema = pa.schema([schema.field(c) for c in wanted])
    available = set(lake.partition_days(name))
    parts = []
    for day in sorted(available if days is None else available.intersection(days)):
        manifest = lake.read_manifest(name, day)
        base = lake.partition_path(name, day)
        for f in manifest["files"]:
            t = pq.read_table(f"{base}/{f['path']}", filesystem=lake.fs, columns=wanted,
                              filters=None if keys is None else [(key, "in", keys)])
            parts.append(t.cast(out_schema))
    if not parts:
        return out_schema.empty_table()
    return pa.concat_tables(parts)


def _utc(series: pd.Series, where: str) -> pd.Series:
    try:
        out = series if pd.api.types.is_datetime64_any_dtype(series) else \
            pd.to_datetime(series, utc=True, format="ISO8601")
        if getattr(out.dt, "tz", None) is None:
            out = out.dt.tz_localize(UTC)
        return out.dt.tz_convert(UTC).dt.as_unit("us")
    except (ValueError, TypeError, AttributeError) as e:
        raise EntityTableError(f"{where}: not usable times ({e})") from e


def as_of_join(lake: Lake, spec: FeatureSpec, rows: pd.DataFrame | pa.Table, entity: str,
               features: list[str] | None = None) -> pd.DataFrame:
    """Each row gets, per entity feature, the latest known value whose as-of time is <= the row's event time:
    never a value from the row's future, and null before the entity's first value. Values already in the row
    (non-null) are kept, as the server does with request values. Only partitions up to the latest row's day
    and only the rows' keys are read."""
    frame = rows.to_pandas() if isinstance(rows, pa.Table) else rows.copy()
    key, time_col = entity_key(spec, entity), spec.event_time
    features = entity_features(spec, entity) if features is None else features
    unknown = set(features) - set(entity_features(spec, entity))
    if unknown:
        raise EntityTableError(f"entity {entity!r}: {sorted(unknown)} are not features of this entity")
    for required in (key, time_col):
        if required not in frame.columns:
            raise EntityTableError(f"rows: column {required!r} is needed for the as-of join on {entity!r}")
    if frame[time_col].isna().any():
        raise EntityTableError(f"rows: {int(frame[time_col].isna().sum())} row(s) have no {time_col!r}; "
                               "a point-in-time join needs each row's time")
    times = _utc(frame[time_col], f"rows: column {time_col!r}")
    keys = canonical(frame[key])
    probe = pd.DataFrame({"_pos": range(len(frame)), "_key": keys.astype(object), "_t": times.array})
    probe = probe.sort_values("_t", kind="stable")
    last_day = times.max().date() if len(frame) else None
    days = [d for d in lake.partition_days(table_name(entity)) if last_day is not None and d <= last_day]
    history = _frame(read_table(lake, spec, entity, days, sorted(set(keys.dropna())), features))
    history = history.rename(columns={key: "_key", time_col: "_t"})
    history["_key"] = history["_key"].astype(object)
    history["_t"] = history["_t"].dt.as_unit("us")
    for name in features:
        known = history.loc[history[name].notna(), ["_key", "_t", name]].sort_values("_t", kind="stable")
        joined = pd.merge_asof(probe[["_pos", "_key", "_t"]], known, on="_t", by="_key", direction="backward",
                               allow_exact_matches=True).set_index("_pos").sort_index()[name]
        found = joined.reindex(range(len(frame))).to_numpy()
        if name in frame.columns:
            have = frame[name].notna().to_numpy()
            frame[name] = frame[name].where(have, pd.Series(found, index=frame.index))
        else:
            frame[name] = found
    return frame


def latest_values(table: pa.Table, spec: FeatureSpec, entity: str, up_to: datetime | None = None) -> pd.DataFrame:
    """Per key and feature the latest non-null value as of `up_to` (inclusive), long format
    (key, feature, value, as_of): what materialization loads into the online store."""
    key, time_col = entity_key(spec, entity), spec.event_time
    frame = _frame(table)
    if up_to is not None:
        frame = frame[frame[time_col] <= pd.Timestamp(up_to)]
    out = []
    for name in entity_features(spec, entity):
        if name not in frame.columns:
            continue
        known = frame.loc[frame[name].notna(), [key, time_col, name]]
        if known.empty:
            continue
        latest = known.sort_values(time_col, kind="stable").drop_duplicates(key, keep="last")
        out.append(pd.DataFrame({"key": latest[key].astype(object).to_numpy(), "feature": name,
                                 "value": latest[name].astype(object).to_numpy(),
                                 "as_of": latest[time_col].to_numpy()}))
    if not out:
        return pd.DataFrame({"key": [], "feature": [], "value": [], "as_of": []})
    return pd.concat(out, ignore_index=True)
