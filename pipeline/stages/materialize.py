"""Materialization: copy each entity's latest feature values from the offline tables into the online store.

Incremental by partition: the store keeps, per entity, which day partitions it has loaded (by manifest digest)
and up to which time, so a run reads only partitions that are new, were rewritten by an ingest, or were only
partly covered by an earlier `up_to`; re-running with nothing new reads nothing. Because the store never
replaces a newer value with an older one, backfilling an earlier `up_to` or reloading a partition is safe.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

from pydantic import BaseModel

from feature_store.entity_tables import IngestResult, entity_features, latest_values, read_table, table_name
from feature_store.entity_tables import ingest as ingest_table
from feature_store.online import OnlineStore, OnlineStoreError, open_store
from pipeline.errors import EntityTableError, StageError
from pipeline.runtime import Runtime, runtime


class EntityMaterialized(BaseModel):
    entity: str
    partitions_read: list[date]
    keys: int
    values_written: int


class MaterializeResult(BaseModel):
    up_to: datetime | None
    store: str
    entities: list[EntityMaterialized]
    noop: bool


def parse_up_to(value: str | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        t = value
    else:
        try:
            t = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as e:
            raise StageError(f"up_to: not an ISO-8601 time: {value!r}") from e
    if t is not None and t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t


def open_online_store(rt: Runtime) -> OnlineStore:
    try:
        return open_store(rt.settings.online_store_uri, rt.settings.home_abs, rt.spec.name)
    except OnlineStoreError as e:
        raise StageError(str(e)) from e


def _digest(rt: Runtime, entity: str, day: date) -> str:
    manifest = rt.lake.read_manifest(table_name(entity), day) or {}
    return ",".join(f["sha256"] for f in manifest.get("files", []))


def _covers(up_to: datetime | None, day: date) -> bool:
    return up_to is None or up_to >= datetime.combine(day + timedelta(days=1), time(0), tzinfo=UTC)


def _needs(record: dict | None, digest: str, up_to: datetime | None) -> bool:
    """A partition is re-read when unseen, rewritten since, or earlier cut off before this `up_to`."""
    if record is None or record["digest"] != digest:
        return True
    cutoff = record["cutoff"]
    return cutoff is not None and (up_to is None or up_to > datetime.fromisoformat(cutoff))


def materialize_entity(rt: Runtime, store: OnlineStore, entity: str, up_to: datetime | None) -> EntityMaterialized:
    state = store.get_state(entity) or {"partitions": {}}
    records: dict[str, dict] = state["partitions"]
    days = [d for d in rt.lake.partition_days(table_name(entity)) if up_to is None or d <= up_to.date()]
    digests = {d: _digest(rt, entity, d) for d in days}
    todo = [d for d in days if _needs(records.get(d.isoformat()), digests[d], up_to)]
    if not todo:
        return EntityMaterialized(entity=entity, partitions_read=[], keys=0, values_written=0)
    latest = latest_values(read_table(rt.lake, rt.spec, entity, todo), rt.spec, entity, up_to)
    written = store.write(entity, zip(latest["key"], latest["feature"], latest["value"],
                                      (t.to_pydatetime() for t in latest["as_of"]), strict=True))
    for d in todo:
        records[d.isoformat()] = {"digest": digests[d],
                                  "cutoff": None if _covers(up_to, d) else up_to.isoformat()}
    store.set_state(entity, {"partitions": records, "last_up_to": None if up_to is None else up_to.isoformat(),
                             "materialized_at": datetime.now(UTC).isoformat()})
    return EntityMaterialized(entity=entity, partitions_read=todo, keys=int(latest["key"].nunique()),
                              values_written=written)


def ingest(entity: str, source: str | Path, rt: Runtime | None = None) -> IngestResult:
    """Add a Parquet file of entity feature values to the offline table (`flywheel features ingest`)."""
    rt = rt or runtime()
    try:
        return ingest_table(rt.lake, rt.spec, entity, source)
    except EntityTableError as e:
        raise StageError(str(e)) from e


def materialize(up_to: str | datetime | None = None, rt: Runtime | None = None) -> MaterializeResult:
    """Load every entity's latest values as of `up_to` (default: everything ingested) into the online store."""
    rt = rt or runtime()
    cutoff = parse_up_to(up_to)
    store = open_online_store(rt)
    try:
        done = [materialize_entity(rt, store, e, cutoff) for e in rt.spec.entities if entity_features(rt.spec, e)]
    finally:
        store.close()
    return MaterializeResult(up_to=cutoff, store=type(store).__name__, entities=done,
                             noop=not any(e.partitions_read for e in done))
