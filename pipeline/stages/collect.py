"""Collect: a day's sealed prediction segments joined with the feedback that arrived within the attribution
window, written as one atomic `training/dt=D` partition whose manifest names every segment consumed.

Exactly-once rests on three rules. The partition is rewritten whole on every run (temp dir + rename), so a
re-run or a crash-and-re-run can never append twice. Prediction segments live under their own day, so no two days
can consume the same one. The previous manifest is the ledger: a segment it lists is always consumed again, and a
segment sealed later than `collect_lateness_s` after the day's first collect is listed as too late rather than
silently joined or dropped. Segments that cannot be read or cast to the spec's log schema are moved to
`rejected/<stream>/dt=D/` beside a reason file and listed in the manifest; rows of segments that can be safely
cast (a feature added: ignored; a nullable column missing: nulls; int for float) are kept.

Memory is bounded by one segment plus the day's feedback: segments are streamed batch by batch into the
partition writer, and duplicates are found in a first pass that spills (key hash, position) pairs to hash
partitions on disk and sorts one partition at a time, so no structure grows with the day's row count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel

from feature_store.log_schema import FEEDBACK, PREDICTIONS, TS, feedback_schema, prediction_schema
from feature_store.offline import fault_point
from pipeline.errors import NoDataError, SegmentRejected, StageError
from pipeline.runtime import Runtime, file_lock, parse_day, runtime

log = logging.getLogger("flywheel.collect")
TRAINING = "training"
REJECTED = "rejected"
REASON_SUFFIX = ".reason.json"


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
    rejected_segments: int = 0
    late_segments: int = 0
    feedback_conflicts: int = 0
    early_feedback: int = 0
    late_feedback: int = 0


def conform(table: pa.Table, schema: pa.Schema) -> tuple[pa.Table, list[str]]:
    """Bring a segment to the log schema the spec implies, or refuse it with the reason. Only lossless changes
    are made; what was changed is returned as notes for the manifest, so a schema drift is visible, not silent."""
    notes, columns = [], []
    extra = sorted(set(table.column_names) - set(schema.names))
    if extra:
        notes.append(f"ignored columns not in the spec: {', '.join(extra)}")
    for f in schema:
        if f.name not in table.column_names:
            if not f.nullable:
                raise SegmentRejected(f"required column {f.name!r} is missing")
            notes.append(f"column {f.name!r} missing: filled with nulls")
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        col = table.column(f.name)
        if col.type != f.type:
            try:
                col = pc.cast(col, f.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                raise SegmentRejected(f"column {f.name!r}: cannot cast {table.column(f.name).type} to {f.type}: "
                                      f"{e}") from e
            notes.append(f"column {f.name!r} cast from {table.column(f.name).type} to {f.type}")
        if not f.nullable and col.null_count:
            raise SegmentRejected(f"required column {f.name!r} has {col.null_count} nulls")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema), notes


@dataclass
class _Segments:
    good: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    late: list[dict] = field(default_factory=list)
    served_days: set[date] = field(default_factory=set)


def _rejected_dir(rt: Runtime, stream: str, d: date) -> str:
    return rt.lake.path(REJECTED, stream, f"dt={d.isoformat()}")


def _reject(rt: Runtime, stream: str, d: date, path: str, sha: str, reason: str) -> None:
    """Reason first, then the move: a crash in between leaves the segment in place to be judged again."""
    name = path.rsplit("/", 1)[1]
    target = _rejected_dir(rt, stream, d)
    record = {"segment": name, "source": path, "sha256": sha, "reason": reason,
              "rejected_at": datetime.now(UTC).isoformat()}
    rt.lake.write_file_atomic(f"{target}/{name}{REASON_SUFFIX}", json.dumps(record, indent=2).encode())
    fault_point("collect.reason_written")
    rt.lake.fs.move(path, f"{target}/{name}")
    log.warning("rejected segment %s: %s (moved to %s)", path, reason, target)


def _rejections(rt: Runtime, stream: str, days: list[date]) -> list[dict]:
    out = []
    for d in days:
        for p in rt.lake.list_files(_rejected_dir(rt, stream, d), suffix=REASON_SUFFIX):
            out.append({"stream": stream, "day": d.isoformat(), **json.loads(rt.lake.read_bytes(p))})
    return out


def _scan(rt: Runtime, stream: str, days: list[date], schema: pa.Schema, ledger: set[str] | None = None,
          deadline: datetime | None = None, served_col: str | None = None) -> _Segments:
    """First pass: judge every segment (readable? castable? in time?) one at a time, so the second pass only
    streams segments known to be good."""
    out = _Segments()
    for d in days:
        paths = rt.lake.list_files(rt.lake.path(stream, f"dt={d.isoformat()}"))
        for info in sorted(rt.lake.fs.get_file_info(paths), key=lambda i: i.path):
            data = rt.lake.read_bytes(info.path)
            sha = hashlib.sha256(data).hexdigest()
            entry = {"path": info.path, "sha256": sha}
            if ledger is not None and deadline is not None and info.path not in ledger and info.mtime is not None \
                    and info.mtime.astimezone(UTC) > deadline:
                out.late.append({**entry, "sealed_at": info.mtime.astimezone(UTC).isoformat(),
                                 "reason": f"sealed after the lateness deadline {deadline.isoformat()}"})
                continue
            try:
                try:
                    raw = pq.read_table(pa.BufferReader(data))
                except (pa.ArrowException, OSError, ValueError) as e:
                    raise SegmentRejected(f"unreadable Parquet: {e}") from e
                table, notes = conform(raw, schema)
            except SegmentRejected as e:
                _reject(rt, stream, d, info.path, sha, str(e))
                continue
            if served_col is not None and table.num_rows:
                out.served_days |= set(pc.unique(pc.cast(table[served_col], pa.date32())).to_pylist())
            out.good.append({**entry, "rows": table.num_rows, **({"notes": notes} if notes else {})})
            del table, raw, data
    fault_point(f"collect.scanned_{stream.rsplit('/', 1)[1]}")
    return out


def _feedback_days(day: date, served_days: set[date], window: timedelta) -> list[date]:
    """Feedback partitions that can hold labels for day D's predictions: by the label's own time (D .. D+window)
    and by when the server received it (served dates .. +window, which is where replayed history lands)."""
    span = math.ceil(window / timedelta(days=1)) + 1
    starts = {day, *served_days}
    return sorted({d + timedelta(days=i) for d in starts for i in range(span)})


def flush_server(url: str, token: str, attempts: int = 1, timeout: float = 60) -> dict:
    """`POST /admin/flush`: every worker of the server at `url` seals its spools into the lake now. A 503 (a
    worker did not seal within the server's wait, e.g. on a machine busy training) is retried after its
    Retry-After, up to `attempts` tries; then StageError with the server's answer."""
    import time

    import httpx

    for attempt in range(attempts):
        r = httpx.post(f"{url}/admin/flush", headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
        if r.status_code != 503 or attempt == attempts - 1:
            break
        time.sleep(float(r.headers.get("retry-after", "1")))
    if r.is_error:
        raise StageError(f"{url}/admin/flush answered {r.status_code} {attempt + 1} times: {r.text[:500]}")
    return r.json()


def _flush_server(rt: Runtime) -> None:
    """Ask the model server to seal its spools so rows logged moments ago are collected today, not lost to a
    later day. Best effort: without a reachable server, sealed segments are all there is."""
    import httpx

    s = rt.settings
    if not s.collect.flushes_server:
        return
    try:
        flush_server(s.resolved_serving_url(), s.resolved_admin_token(), timeout=30)
    except (httpx.HTTPError, StageError) as e:
        log.warning("could not flush the model server before collecting (%s); using sealed segments only", e)


def _day_lock(rt: Runtime, day: date) -> AbstractContextManager[None]:
    """Two overlapping runs of one day take turns instead of both moving rejected segments and renaming the
    partition at once."""
    return file_lock(rt.settings.run_dir / "locks" / f"collect-{day.isoformat()}.lock")


def _labels(rt: Runtime, segs: list[dict]) -> pd.DataFrame:
    """The day's candidate feedback, small next to its predictions, held whole for the per-batch hash join."""
    schema = feedback_schema()
    frames = [conform(pq.read_table(s["path"], filesystem=rt.lake.fs), schema)[0].to_pandas() for s in segs]
    cols = ["request_id", "row", "label", "label_time", "received_at"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else schema.empty_table().to_pandas()[cols]


FEEDBACK_RULE = ("a row's label is positive when any feedback for it within the attribution window is positive "
                 "(a later 0 does not undo a conversion; rows given both are counted as conflicts); feedback timed "
                 "before the prediction's event time (early) or after the window (late) is not used and counted")


@dataclass
class FeedbackCounts:
    """Feedback that collect could not take at face value, reported in the manifest instead of silently kept
    or dropped: rows labeled both 0 and 1 within the window, and items timed before the event or after the
    window."""

    conflicts: int = 0
    early: int = 0
    late: int = 0

    def add(self, other: FeedbackCounts) -> None:
        self.conflicts += other.conflicts
        self.early += other.early
        self.late += other.late


def join_batch(p: pd.DataFrame, f: pd.DataFrame, et: str, window: timedelta) -> tuple[pd.DataFrame, FeedbackCounts]:
    keys = ["request_id", "row"]
    counts = FeedbackCounts()
    if len(f):
        joined = p[[*keys, et, "served_at"]].merge(f, on=keys, how="inner")
        # A label's delay is measured on one clock: the client's (its time vs the event time) when it sent one,
        # else the server's (received vs served). Replaying history through the API thus keeps real delays.
        delay = (joined["label_time"] - joined[et]).where(joined["label_time"].notna(),
                                                          joined["received_at"] - joined["served_at"])
        ok = (delay >= timedelta(0)) & (delay <= window)
        counts.early, counts.late = int((delay < timedelta(0)).sum()), int((delay > window).sum())
        joined["label_time"] = joined["label_time"].fillna(joined[et] + delay)
        labels = joined[ok].groupby(keys, as_index=False).agg(label=("label", "max"),
                                                              label_time=("label_time", "min"),
                                                              lowest=("label", "min"))
        counts.conflicts = int((labels["label"] != labels["lowest"]).sum())
        labels = labels.drop(columns="lowest")
    else:
        labels = pd.DataFrame({"request_id": pd.Series(dtype="str"), "row": pd.Series(dtype="int32"),
                               "label": pd.Series(dtype="float64"),
                               "label_time": pd.Series(dtype="datetime64[us, UTC]")})
    return p.merge(labels, on=keys, how="left"), counts


def _key_hash(keys: pd.DataFrame) -> np.ndarray:
    """64-bit hash of (request_id, row), on normalised dtypes so predictions and feedback hash alike."""
    norm = pd.DataFrame({"request_id": keys["request_id"].astype(str), "row": keys["row"].astype("int64")})
    return pd.util.hash_pandas_object(norm, index=False).to_numpy()


def _in_sorted(sorted_keys: np.ndarray, h: np.ndarray) -> np.ndarray:
    if not len(sorted_keys):
        return np.zeros(len(h), dtype=bool)
    idx = np.minimum(np.searchsorted(sorted_keys, h), len(sorted_keys) - 1)
    return sorted_keys[idx] == h


class DuplicateFinder:
    """Positions (in the day's row order) of rows whose (request_id, row) key appeared earlier the same day,
    found without holding every key in memory: (hash, position) pairs are spilled to hash partitions on disk,
    about `partition_rows` each, and each partition is then sorted on its own. Memory is one partition plus the
    duplicates, whatever the size of the day; a sorted in-memory key set grew by 8 bytes a row and doubled
    while it was merged."""

    def __init__(self, directory: Path, expected_rows: int, partition_rows: int = 1 << 20) -> None:
        self.directory = directory
        self.parts = max(1, math.ceil(expected_rows / partition_rows))
        self.rows = 0

    def _path(self, part: int) -> Path:
        return self.directory / f"keys-{part:05d}.bin"

    def add(self, h: np.ndarray) -> None:
        pairs = np.empty((len(h), 2), dtype=np.int64)
        pairs[:, 0] = h.view(np.int64)
        pairs[:, 1] = np.arange(self.rows, self.rows + len(h))
        self.rows += len(h)
        part = h % np.uint64(self.parts)
        for k in np.unique(part):
            with open(self._path(int(k)), "ab") as f:
                f.write(pairs[part == k].tobytes())

    def duplicates(self) -> np.ndarray:
        """Sorted positions of every repeat of a key, its first occurrence excepted."""
        out = [np.empty(0, dtype=np.int64)]
        for k in range(self.parts):
            if not self._path(k).exists():
                continue
            pairs = np.fromfile(self._path(k), dtype=np.int64).reshape(-1, 2)
            pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
            repeat = pairs[1:, 0] == pairs[:-1, 0]
            out.append(pairs[1:, 1][repeat])
            self._path(k).unlink()
        return np.sort(np.concatenate(out))


def _key_columns(rt: Runtime, seg: dict) -> pd.DataFrame:
    keys = pq.read_table(seg["path"], columns=["request_id", "row"], filesystem=rt.lake.fs)
    return pd.DataFrame({"request_id": pc.cast(keys["request_id"], pa.string()).to_pandas(),
                         "row": pc.cast(keys["row"], pa.int32()).to_numpy()})


def _find_duplicates(rt: Runtime, segs: list[dict], batch_rows: int, rows: int) -> np.ndarray:
    """First pass over the good segments, key columns only, in the order the second pass writes them."""
    with tempfile.TemporaryDirectory(prefix="collect-keys-", dir=rt.settings.run_dir) as tmp:
        finder = DuplicateFinder(Path(tmp), rows)
        for seg in segs:
            keys = _key_columns(rt, seg)
            for lo in range(0, len(keys), batch_rows):
                finder.add(_key_hash(keys.iloc[lo:lo + batch_rows]))
        return finder.duplicates()


def collect(day: str | date, rt: Runtime | None = None) -> CollectResult:
    rt = rt or runtime()
    day = parse_day(day)
    _flush_server(rt)
    with _day_lock(rt, day):
        return _collect(day, rt)


def _no_predictions(rt: Runtime, day: date) -> NoDataError:
    rejected = len(_rejections(rt, PREDICTIONS, [day]))
    return NoDataError(
        f"no prediction log for {day} under {rt.lake.path(PREDICTIONS, f'dt={day}')}: the server logged nothing "
        "for this day (is traffic reaching it, and were its spools sealed?). Refusing to train on nothing."
        + (f" {rejected} segments were rejected, see {_rejected_dir(rt, PREDICTIONS, day)}." if rejected else ""))


def _collect(day: date, rt: Runtime) -> CollectResult:
    spec, s = rt.spec, rt.settings
    pschema = prediction_schema(spec)
    previous = rt.lake.read_manifest(TRAINING, day)
    prev_inputs = (previous or {}).get("inputs", {})
    first = prev_inputs.get("first_collected_at") or datetime.now(UTC).isoformat()
    deadline = datetime.fromisoformat(first) + timedelta(seconds=s.collect.lateness_s)
    ledger = {seg["path"] for seg in prev_inputs.get("prediction_segments", [])}
    preds = _scan(rt, PREDICTIONS, [day], pschema, ledger, deadline, served_col="served_at")
    rows_in = sum(seg["rows"] for seg in preds.good)
    if rows_in == 0:
        raise _no_predictions(rt, day)
    window = spec.label.attribution_window
    fb_days = _feedback_days(day, preds.served_days, window)
    fbs = _scan(rt, FEEDBACK, fb_days, feedback_schema())
    f = _labels(rt, fbs.good)
    f_hash = _key_hash(f)
    rt.settings.run_dir.mkdir(parents=True, exist_ok=True)
    dups = _find_duplicates(rt, preds.good, s.collect.batch_rows, rows_in)

    label, et = spec.label.name, spec.event_time
    out_schema = pa.schema([*pschema, pa.field(label, pa.float64()), pa.field("label_time", TS)])
    writer = rt.lake.partition_writer(TRAINING, day, out_schema)
    rows = positives = n_missing = position = 0
    feedback_counts = FeedbackCounts()
    duplicates = len(dups)
    try:
        for seg in preds.good:
            table, _ = conform(pq.read_table(seg["path"], filesystem=rt.lake.fs), pschema)
            for batch in table.to_batches(max_chunksize=s.collect.batch_rows):
                p = batch.to_pandas()
                fresh = ~_in_sorted(dups, np.arange(position, position + len(p)))
                position += len(p)
                p = p[fresh]
                p[et] = p[et].fillna(p["served_at"])
                # Only the feedback rows whose key hash this batch holds enter the merge: the day's feedback is
                # hashed once, instead of re-indexed by pandas for every batch.
                candidates = f[_in_sorted(np.sort(_key_hash(p)), f_hash)] if len(f) else f
                out, counts = join_batch(p, candidates, et, window)
                feedback_counts.add(counts)
                missing = out["label"].isna()
                n_missing += int(missing.sum())
                if spec.label.missing == "drop":
                    out = out[~missing]
                else:
                    out.loc[missing, "label"] = 0.0
                out = out.rename(columns={"label": label})
                positives += int((out[label] > 0).sum())
                rows += len(out)
                writer.write(pa.Table.from_pandas(out, schema=out_schema, preserve_index=False))
            fault_point("collect.segment_written")
        if rows == 0:
            raise NoDataError(f"no labeled rows for {day}: {rows_in} predictions, none with feedback in the window")
        rejected = _rejections(rt, PREDICTIONS, [day]) + _rejections(rt, FEEDBACK, fb_days)
        ref = writer.commit(inputs={
            "prediction_segments": preds.good, "feedback_segments": fbs.good, "rejected_segments": rejected,
            "late_segments": preds.late, "first_collected_at": first,
            "lateness_deadline": deadline.isoformat(),
            "feedback": {**asdict(feedback_counts), "rule": FEEDBACK_RULE},
        })
    except BaseException:
        writer.abort()
        raise
    fault_point("collect.committed")
    result = CollectResult(
        day=day.isoformat(), rows=rows, positives=positives,
        unlabeled_as_negative=n_missing if spec.label.missing == "negative" else 0,
        dropped_unlabeled=n_missing if spec.label.missing == "drop" else 0,
        duplicates_dropped=duplicates, prediction_segments=len(preds.good), feedback_segments=len(fbs.good),
        path=ref.path, rejected_segments=len(rejected), late_segments=len(preds.late),
        feedback_conflicts=feedback_counts.conflicts, early_feedback=feedback_counts.early,
        late_feedback=feedback_counts.late,
    )
    if preds.late:
        log.warning("%d segments of %s arrived after the lateness deadline and were not consumed: %s",
                    len(preds.late), day, [seg["path"] for seg in preds.late])
    log.info("collected %s", result.model_dump_json())
    return result
