"""Collect on a real local lake: bad segments rejected with reasons, late segments exactly once, and a crash
between any two steps followed by a re-run giving the same partition."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pyarrow as pa

from feature_store.log_schema import FEEDBACK, PREDICTIONS, feedback_schema, prediction_schema
from feature_store.offline import FAULT_ENV
from feature_store.spec import load_spec
from pipeline.runtime import runtime
from pipeline.stages.collect import REJECTED, TRAINING, collect
from tests.helpers import LOANS_SPEC, make_settings

DAY = date(2026, 3, 1)
START = datetime(2026, 3, 1, tzinfo=UTC)
SPEC = load_spec(LOANS_SPEC)
ROOT = Path(__file__).resolve().parents[2]


def _rt(home: Path, **overrides):
    return runtime(make_settings(home, 1, spec_path=LOANS_SPEC, collect_flushes_server=False, **overrides))


def _preds(ids: list[str]) -> pa.Table:
    n = len(ids)
    when = [START + timedelta(minutes=i) for i in range(n)]
    return pa.table({
        "request_id": ids, "row": [0] * n, "served_at": when, SPEC.event_time: when, "model_version": ["1"] * n,
        "score": [0.4] * n, "account_no": [f"a{i}" for i in range(n)], "region": ["r1"] * n,
        "product": ["card"] * n, "amount": [100.0 + i for i in range(n)], "tenure_months": [12.0] * n,
        "income_ratio": [0.3] * n,
    }, schema=prediction_schema(SPEC))


def _put(rt, stream: str, name: str, table: pa.Table | bytes, day: date = DAY) -> str:
    path = rt.lake.path(stream, f"dt={day}", name)
    rt.lake.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    data = table if isinstance(table, bytes) else rt.lake.parquet_bytes(table)
    rt.lake.write_file_atomic(path, data)
    return path


def _labels(rt, ids: list[str], name: str = "seg-fb.parquet") -> None:
    n = len(ids)
    t = [START + timedelta(hours=1, minutes=i) for i in range(n)]
    _put(rt, FEEDBACK, name, pa.table({"request_id": ids, "row": [0] * n, "label": [float(i % 2) for i in range(n)],
                                       "label_time": t, "received_at": t}, schema=feedback_schema()))


def _lay_out_day(rt) -> None:
    ids = [f"q{i}" for i in range(40)]
    _put(rt, PREDICTIONS, "seg-a.parquet", _preds(ids[:10]))
    extra = _preds(ids[10:20]).append_column("new_feature", pa.array([1.0] * 10))  # a feature added
    extra = extra.set_column(extra.schema.get_field_index("tenure_months"), "tenure_months",
                             pa.array([12] * 10, pa.int64()))  # int where the spec says float: safe cast
    _put(rt, PREDICTIONS, "seg-b.parquet", extra)
    _put(rt, PREDICTIONS, "seg-c.parquet", _preds(ids[20:30]).drop_columns(["income_ratio"]))  # a feature removed
    bad_type = _preds(ids[30:35]).drop_columns(["amount"]).append_column("amount", pa.array(["lots"] * 5))
    _put(rt, PREDICTIONS, "seg-d.parquet", bad_type)
    _put(rt, PREDICTIONS, "seg-e.parquet", _preds(ids[35:40]).drop_columns(["request_id"]))
    _put(rt, PREDICTIONS, "seg-f.parquet", b"PAR1 this is not parquet at all")
    _labels(rt, ids)


def test_bad_segments_are_rejected_with_reasons_and_castable_rows_kept(tmp_path):
    rt = _rt(tmp_path / "home")
    _lay_out_day(rt)
    result = collect(DAY, rt)
    assert (result.rows, result.prediction_segments, result.rejected_segments) == (30, 3, 3)
    training = rt.lake.read_partition(TRAINING, DAY).to_pandas()
    assert "new_feature" not in training and training.tenure_months.eq(12.0).all()
    assert training.income_ratio.isna().sum() == 10 and training.defaulted.notna().all()
    manifest = rt.lake.read_manifest(TRAINING, DAY)["inputs"]
    reasons = {r["segment"]: r["reason"] for r in manifest["rejected_segments"]}
    assert set(reasons) == {"seg-d.parquet", "seg-e.parquet", "seg-f.parquet"}
    assert "'amount'" in reasons["seg-d.parquet"] and "'request_id' is missing" in reasons["seg-e.parquet"]
    assert "unreadable Parquet" in reasons["seg-f.parquet"]
    rejected = tmp_path / "home" / "lake" / REJECTED / PREDICTIONS / f"dt={DAY}"
    assert sorted(p.name for p in rejected.glob("*.parquet")) == ["seg-d.parquet", "seg-e.parquet", "seg-f.parquet"]
    notes = {s["path"].rsplit("/", 1)[1]: s.get("notes", []) for s in manifest["prediction_segments"]}
    assert any("new_feature" in n for n in notes["seg-b.parquet"]) and notes["seg-a.parquet"] == []
    again = collect(DAY, rt)  # the rejected segments stay listed, nothing is counted twice
    assert again.model_dump() == result.model_dump()
    assert rt.lake.read_partition(TRAINING, DAY).to_pandas().equals(training)


def test_late_segment_is_consumed_once_and_too_late_one_is_listed(tmp_path):
    rt = _rt(tmp_path / "home")
    _put(rt, PREDICTIONS, "seg-1.parquet", _preds([f"a{i}" for i in range(20)]))
    _labels(rt, [f"a{i}" for i in range(20)] + [f"b{i}" for i in range(20)])
    assert collect(DAY, rt).rows == 20
    # a late segment: 10 new rows and 5 rows already logged (a server retry re-sealing them)
    _put(rt, PREDICTIONS, "seg-2.parquet", _preds([f"b{i}" for i in range(10)] + [f"a{i}" for i in range(5)]))
    second = collect(DAY, rt)
    assert (second.rows, second.duplicates_dropped, second.prediction_segments) == (30, 5, 2)
    ids = rt.lake.read_partition(TRAINING, DAY).column("request_id").to_pylist()
    assert len(ids) == len(set(ids)) == 30
    assert collect(DAY, rt).model_dump() == second.model_dump()

    strict = _rt(tmp_path / "home", collect_lateness_s=0)
    _put(strict, PREDICTIONS, "seg-3.parquet", _preds([f"b{i}" for i in range(10, 20)]))
    third = collect(DAY, strict)
    assert (third.rows, third.late_segments, third.prediction_segments) == (30, 1, 2)
    late = strict.lake.read_manifest(TRAINING, DAY)["inputs"]["late_segments"]
    assert late[0]["path"].endswith("seg-3.parquet") and "lateness deadline" in late[0]["reason"]


def test_other_days_segments_are_never_consumed(tmp_path):
    rt = _rt(tmp_path / "home")
    _put(rt, PREDICTIONS, "seg-1.parquet", _preds(["x1", "x2"]))
    _put(rt, PREDICTIONS, "seg-2.parquet", _preds(["y1"]), day=DAY + timedelta(days=1))
    _labels(rt, ["x1", "x2", "y1"])
    collect(DAY, rt)
    consumed = rt.lake.read_manifest(TRAINING, DAY)["inputs"]["prediction_segments"]
    assert [s["path"].rsplit("/", 1)[1] for s in consumed] == ["seg-1.parquet"]


FAULTS = ["collect.scanned_predictions", "collect.reason_written", "collect.scanned_feedback",
          "collect.segment_written", "training.before_rename", "collect.committed"]


def _crash(home: Path, point: str) -> subprocess.Popen:
    env = {**os.environ, "FLYWHEEL_HOME": str(home), "FLYWHEEL_SPEC_PATH": str(LOANS_SPEC),
           "FLYWHEEL_COLLECT_FLUSHES_SERVER": "false", FAULT_ENV: point}
    return subprocess.Popen([sys.executable, "-c", f"from pipeline.stages.collect import collect; collect('{DAY}')"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _snapshot(rt) -> tuple:
    m = rt.lake.read_manifest(TRAINING, DAY)
    names = [[s["path"].rsplit("/", 1)[1] for s in m["inputs"][k]] for k in ("prediction_segments",
                                                                           "feedback_segments")]
    return rt.lake.read_partition(TRAINING, DAY).to_pandas(), names, sorted(
        r["segment"] for r in m["inputs"]["rejected_segments"])


def test_crash_at_every_step_then_rerun_gives_the_same_partition(tmp_path):
    ref = _rt(tmp_path / "ref")
    _lay_out_day(ref)
    collect(DAY, ref)
    expected = _snapshot(ref)
    cases = [(p, False) for p in FAULTS] + [("training.between_renames", True), ("training.before_rename", True)]
    homes = [tmp_path / f"h{i}" for i in range(len(cases))]
    for home, (_, collected_before) in zip(homes, cases, strict=True):
        rt = _rt(home)
        _lay_out_day(rt)
        if collected_before:
            collect(DAY, rt)
    procs = [_crash(home, point) for home, (point, _) in zip(homes, cases, strict=True)]
    for proc, (point, _) in zip(procs, cases, strict=True):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 86, f"{point}: did not crash there: {err.decode()[-500:]}"
    for home, (point, _) in zip(homes, cases, strict=True):
        rt = _rt(home)
        collect(DAY, rt)
        got = _snapshot(rt)
        assert got[0].equals(expected[0]) and got[1:] == expected[1:], point
        leftovers = [p.name for p in (home / "lake" / TRAINING).iterdir() if p.name.startswith(".tmp")]
        assert leftovers == [], point


def test_two_overlapping_runs_leave_one_partition(tmp_path):
    """Zero lateness: the run that goes second must treat the first one's ledger as consumed, not as late."""
    rt = _rt(tmp_path / "home", collect_lateness_s=0)
    _lay_out_day(rt)
    env = {**os.environ, "FLYWHEEL_HOME": str(tmp_path / "home"), "FLYWHEEL_SPEC_PATH": str(LOANS_SPEC),
           "FLYWHEEL_COLLECT_FLUSHES_SERVER": "false"}
    cmd = [sys.executable, "-c", f"from pipeline.stages.collect import collect; print(collect('{DAY}').rows)"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1].decode()[-500:] for o in outs]
    assert [o[0].decode().strip() for o in outs] == ["30", "30"]
    ids = rt.lake.read_partition(TRAINING, DAY).column("request_id").to_pylist()
    assert len(ids) == len(set(ids)) == 30
    assert [p.name for p in (tmp_path / "home" / "lake" / TRAINING).iterdir()] == [f"dt={DAY}"]


def test_duplicate_finder_keeps_first_occurrence_across_spilled_partitions(tmp_path):
    import numpy as np

    from pipeline.stages.collect import DuplicateFinder

    rng = np.random.default_rng(0)
    keys = rng.integers(0, 3000, 10_000).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    finder = DuplicateFinder(tmp_path, expected_rows=len(keys), partition_rows=1000)
    assert finder.parts == 10
    for lo in range(0, len(keys), 777):
        finder.add(keys[lo:lo + 777])
    _, first = np.unique(keys, return_index=True)
    expected = np.setdiff1d(np.arange(len(keys)), first)
    np.testing.assert_array_equal(finder.duplicates(), expected)
    assert not list(tmp_path.iterdir())  # spill files are removed once read


def test_conflicting_and_early_feedback_are_counted_in_the_manifest(tmp_path):
    rt = _rt(tmp_path / "home")
    _put(rt, PREDICTIONS, "seg-1.parquet", _preds(["c0", "c1", "c2", "c3"]))
    window = SPEC.label.attribution_window
    at = [START + timedelta(minutes=i) for i in range(4)]  # the predictions' event times
    items = [("c0", 1.0, at[0] + timedelta(minutes=5)), ("c0", 0.0, at[0] + timedelta(minutes=9)),  # 1 then 0
             ("c1", 1.0, at[1] - timedelta(hours=1)),  # timed before its prediction
             ("c2", 1.0, at[2] + window + timedelta(hours=1)),  # after the window
             ("c3", 0.0, at[3] + timedelta(minutes=1))]
    _put(rt, FEEDBACK, "seg-fb.parquet", pa.table({
        "request_id": [i[0] for i in items], "row": [0] * len(items), "label": [i[1] for i in items],
        "label_time": [i[2] for i in items], "received_at": [i[2] for i in items]}, schema=feedback_schema()))
    result = collect(DAY, rt)
    assert (result.feedback_conflicts, result.early_feedback, result.late_feedback) == (1, 1, 1)
    feedback = rt.lake.read_manifest(TRAINING, DAY)["inputs"]["feedback"]
    assert (feedback["conflicts"], feedback["early"], feedback["late"]) == (1, 1, 1)
    assert "positive" in feedback["rule"]
    labels = dict(zip(*rt.lake.read_partition(TRAINING, DAY).select(["request_id", SPEC.label.name]).to_pydict()
                      .values(), strict=True))
    assert labels["c0"] == 1.0, "a conversion is not undone by a later 0"
    assert labels["c3"] == 0.0
