"""Labelled live rows of a day that is not collected yet, read straight from the sealed log segments.

Collection runs after a day ends, so an hourly evaluation that read only `training/dt=D` would let a bad
champion serve a whole day before anyone could judge it. This reads `logs/predictions/dt=D` (the server seals
its spools there every few seconds, partitioned by event time) and the feedback that has arrived in
`logs/feedback`, joined with collect's own rule (`collect.join_batch`: a label counts only within the spec's
attribution window). A row counts as labelled once its feedback arrived or, when the spec says a missing label
is a negative, once its attribution window has closed; rows still inside their window without feedback are left
out, never guessed. Read-only: unreadable segments are skipped here and judged (rejected) by collect.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, date, datetime, timedelta

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feature_store.log_schema import FEEDBACK, PREDICTIONS, feedback_schema, prediction_schema
from pipeline.errors import SegmentRejected
from pipeline.runtime import Runtime
from pipeline.stages.collect import conform, join_batch

log = logging.getLogger("flywheel.live_rows")


def _segments(rt: Runtime, stream: str, day: date, schema: pa.Schema, version: str | None = None) -> list[pa.Table]:
    out = []
    for path in rt.lake.list_files(rt.lake.path(stream, f"dt={day.isoformat()}")):
        try:
            table, _ = conform(pq.read_table(path, filesystem=rt.lake.fs), schema)
        except (pa.ArrowException, OSError, ValueError, SegmentRejected) as e:
            log.warning("skipping unreadable segment %s in the live evaluation (%s); collect will judge it", path, e)
            continue
        if version is not None:
            table = table.filter(pc.equal(table["model_version"], version))
        if table.num_rows:
            out.append(table)
    return out


def live_rows(rt: Runtime, day: date, version: str, now: datetime | None = None) -> pd.DataFrame:
    """Rows `version` served with event time on `day`, with their label where it is known by `now`."""
    spec = rt.spec
    now = now or datetime.now(UTC)
    preds = _segments(rt, PREDICTIONS, day, prediction_schema(spec), version)
    if not preds:
        return pd.DataFrame()
    p = pa.concat_tables(preds).to_pandas().drop_duplicates(["request_id", "row"], ignore_index=True)
    et, window = spec.event_time, spec.label.attribution_window
    p[et] = p[et].fillna(p["served_at"])
    span = math.ceil(window / timedelta(days=1)) + 1
    fb_days = sorted({day + timedelta(days=i) for i in range(span)} | {now.date()})
    schema = feedback_schema()
    fb = [t for d in fb_days if d <= now.date() for t in _segments(rt, FEEDBACK, d, schema)]
    f = (pa.concat_tables(fb).to_pandas() if fb else schema.empty_table().to_pandas())
    out, _ = join_batch(p, f[["request_id", "row", "label", "label_time", "received_at"]], et, window)
    known = out["label"].notna()
    if spec.label.missing == "negative":
        closed = (out[et] + window) <= pd.Timestamp(now)
        out.loc[~known & closed, "label"] = 0.0
        known |= closed
    return out[known].rename(columns={"label": spec.label.name}).reset_index(drop=True)
