"""Collect: a day's sealed prediction segments joined with the feedback that arrived within the attribution
window, written as one atomic `training/dt=D` partition whose manifest names every segment consumed."""

from __future__ import annotations

import hashlib
import logging
import math
from datetime import date, timedelta

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from feature_store.log_schema import FEEDBACK, PREDICTIONS, feedback_schema, prediction_schema
from pipeline.runtime import NoDataError, Runtime, StageError, parse_day, runtime

log = logging.getLogger("flywheel.collect")
TRAINING = "training"


class CollectResult(BaseModel):
    day: str
    rows: int
    positives: int
    unlabeled_as_negative: int
    dropped_unlabeled: int
    duplicates_dropped: int
    prediction_segments: int
    feedback_segments: int
    path: str


def _read_segments(rt: Runtime, stream: str, days: list[date], schema: pa.Schema) -> tuple[pa.Table, list[dict]]:
    tables, consumed = [], []
    for d in days:
        for path in rt.lake.list_files(rt.lake.path(stream, f"dt={d.isoformat()}")):
            data = rt.lake.read_bytes(path)
            try:
                table = pq.read_table(pa.BufferReader(data))
                table = table.select(schema.names).cast(schema)
            except (pa.ArrowInvalid, KeyError, ValueError) as e:
                raise StageError(f"segment {path} does not match the log schema of the feature spec: {e}") from e
            tables.append(table)
            consumed.append({"path": path, "rows": table.num_rows, "sha256": hashlib.sha256(data).hexdigest()})
    return (pa.concat_tables(tables) if tables else schema.empty_table()), consumed


def _feedback_days(day: date, served_at: pd.Series, window: timedelta) -> list[date]:
    """Feedback partitions that can hold labels for day D's predictions: by the label's own time (D .. D+window)
    and by when the server received it (served dates .. +window, which is where replayed history lands)."""
    span = math.ceil(window / timedelta(days=1)) + 1
    starts = {day, *pd.to_datetime(served_at).dt.date.unique()}
    return sorted({d + timedelta(days=i) for d in starts for i in range(span)})


def _flush_server(rt: Runtime) -> None:
    """Ask the model server to seal its spools so rows logged moments ago are collected today, not lost to a
    later day. Best effort: without a reachable server, sealed segments are all there is."""
    import httpx

    s = rt.settings
    if not s.collect_flushes_server:
        return
    try:
        httpx.post(f"{s.resolved_serving_url()}/admin/flush", timeout=30,
                   headers={"Authorization": f"Bearer {s.resolved_admin_token()}"}).raise_for_status()
    except httpx.HTTPError as e:
        log.warning("could not flush the model server before collecting (%s); using sealed segments only", e)


def collect(day: str | date, rt: Runtime | None = None) -> CollectResult:
    rt = rt or runtime()
    day = parse_day(day)
    spec = rt.spec
    _flush_server(rt)
    preds, pred_segs = _read_segments(rt, PREDICTIONS, [day], prediction_schema(spec))
    if preds.num_rows == 0:
        raise NoDataError(
            f"no prediction log for {day} under {rt.lake.path(PREDICTIONS, f'dt={day}')}: the server logged nothing "
            "for this day (is traffic reaching it, and were its spools sealed?). Refusing to train on nothing."
        )
    window = spec.label.attribution_window
    p = preds.to_pandas()
    before = len(p)
    p = p.sort_values(["served_at"], kind="stable").drop_duplicates(["request_id", "row"], keep="first")
    duplicates = before - len(p)
    et = spec.event_time
    p[et] = p[et].fillna(p["served_at"])

    feedback, fb_segs = _read_segments(rt, FEEDBACK, _feedback_days(day, p["served_at"], window), feedback_schema())
    f = feedback.to_pandas()
    label = spec.label.name
    if len(f):
        joined = p[["request_id", "row", et, "served_at"]].merge(
            f[["request_id", "row", "label", "label_time", "received_at"]], on=["request_id", "row"], how="inner")
        # A label's delay is measured on one clock: the client's (its time vs the event time) when it sent one,
        # else the server's (received vs served). Replaying history through the API thus keeps real delays.
        delay = (joined["label_time"] - joined[et]).where(joined["label_time"].notna(),
                                                          joined["received_at"] - joined["served_at"])
        ok = (delay >= timedelta(0)) & (delay <= window)
        joined["label_time"] = joined["label_time"].fillna(joined[et] + delay)
        labels = joined[ok].groupby(["request_id", "row"], as_index=False).agg(
            label=("label", "max"), label_time=("label_time", "min"))
    else:
        labels = pd.DataFrame({"request_id": pd.Series(dtype="str"), "row": pd.Series(dtype="int32"),
                               "label": pd.Series(dtype="float64"),
                               "label_time": pd.Series(dtype="datetime64[us, UTC]")})
    out = p.merge(labels, on=["request_id", "row"], how="left")
    missing = out["label"].isna()
    n_missing = int(missing.sum())
    if spec.label.missing == "drop":
        out = out[~missing]
    else:
        out.loc[missing, "label"] = 0.0
    out = out.rename(columns={"label": label})
    out = out.sort_values([et, "request_id", "row"], kind="stable").reset_index(drop=True)
    if len(out) == 0:
        raise NoDataError(f"no labeled rows for {day}: {before} predictions, none with feedback in the window")
    table = pa.Table.from_pandas(out, preserve_index=False)
    ref = rt.lake.write_partition(TRAINING, day, table, inputs={"prediction_segments": pred_segs,
                                                                 "feedback_segments": fb_segs})
    result = CollectResult(
        day=day.isoformat(), rows=len(out), positives=int((out[label] > 0).sum()),
        unlabeled_as_negative=n_missing if spec.label.missing == "negative" else 0,
        dropped_unlabeled=n_missing if spec.label.missing == "drop" else 0,
        duplicates_dropped=duplicates, prediction_segments=len(pred_segs), feedback_segments=len(fb_segs),
        path=ref.path,
    )
    log.info("collected %s", result.model_dump_json())
    return result
