"""The validation gate on a real local lake: chunked validation equals whole-day validation, unseen categories,
the user's suite file, and the report plus Data Docs it leaves behind."""

from __future__ import annotations

import json
import os
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from feature_store.log_schema import TS, prediction_schema
from pipeline.demo.simulate import Simulator
from pipeline.errors import GateFailed, StageError, SuiteFileError
from pipeline.runtime import Runtime, runtime
from pipeline.stages.collect import TRAINING
from pipeline.stages.validate import QUARANTINE, VALIDATED, validate
from tests.helpers import make_settings

SIM = Simulator(seed=3, rows_per_day=5000)


def make_rt(home: Path, **overrides) -> Runtime:
    overrides.setdefault("min_rows", 10)
    overrides.setdefault("validation_suite_path", None)
    return runtime(make_settings(home, 1, collect_flushes_server=False, **overrides))


def sim_day(index: int, rows: int = 5000, seed: int = 3) -> tuple[date, pd.DataFrame]:
    """A collected day as collect writes it: the simulator's features, a score and a float label."""
    sim = Simulator(seed=seed, rows_per_day=rows)
    frame = sim.day(index).drop(columns=["feedback_delay_s"])
    frame["event_time"] = frame["event_time"].dt.floor("us")
    n = len(frame)
    frame["clicked"] = frame["clicked"].astype(float)
    frame["request_id"] = [f"d{index}-{i}" for i in range(n)]
    frame["row"] = np.zeros(n, dtype=np.int32)
    frame["served_at"] = frame["event_time"]
    frame["model_version"] = "1"
    frame["score"] = np.random.default_rng(index).uniform(size=n)
    frame["label_time"] = frame["event_time"] + timedelta(minutes=1)
    return sim.day_date(index), frame


def write_training(rt: Runtime, day: date, frame: pd.DataFrame) -> None:
    schema = pa.schema([*prediction_schema(rt.spec), pa.field(rt.spec.label.name, pa.float64()),
                        pa.field("label_time", TS)])
    rt.lake.write_partition(TRAINING, day, pa.Table.from_pandas(frame[schema.names], schema=schema,
                                                                preserve_index=False))


def write_validated(rt: Runtime, day: date, frame: pd.DataFrame) -> None:
    """A past validated day: the reference that drift and unseen categories compare against."""
    write_training(rt, day, frame)
    rt.lake.write_partition(VALIDATED, day, rt.lake.read_partition(TRAINING, day))


def crafted_day() -> tuple[date, pd.DataFrame, dict[int, str]]:
    day, frame = sim_day(5)
    bad = {10: "price", 1500: "hour_of_day", 2600: "price", 3000: "price", 4100: "score", 4999: "price"}
    frame.loc[10, "price"] = -1.0
    frame.loc[1500, "hour_of_day"] = 30.0
    frame.loc[2600, ["price", "position"]] = [-2.0, 500.0]  # two failing expectations on one row
    frame.loc[3000, "price"] = np.nan
    frame.loc[4100, "score"] = 1.5
    frame.loc[4999, "price"] = -3.0
    return day, frame, bad


def test_chunked_validation_equals_whole_day(tmp_path):
    day, frame, bad = crafted_day()
    outs = {}
    for chunk in (1024, 1_000_000):
        rt = make_rt(tmp_path / f"c{chunk}", validate_chunk_rows=chunk)
        write_training(rt, day, frame)
        result = validate(day, rt)
        outs[chunk] = (result, rt.lake.read_partition(QUARANTINE, day).to_pandas(),
                       rt.lake.read_partition(VALIDATED, day).to_pandas())
    (small, q1, v1), (whole, q2, v2) = outs[1024], outs[1_000_000]
    pd.testing.assert_frame_equal(q1, q2)
    pd.testing.assert_frame_equal(v1, v2)
    assert small.quarantined == whole.quarantined == len(bad) and small.good == whole.good == 5000 - len(bad)
    assert sorted(q1.request_id) == sorted(f"d5-{i}" for i in bad)
    for i, column in bad.items():
        assert column in q1.set_index("request_id").loc[f"d5-{i}", "reason"]
    assert q1.set_index("request_id").loc["d5-2600", "reason"].count(" | ") == 1
    assert "expect_column_values_to_not_be_null(column=price)" in q1.set_index("request_id").loc["d5-3000", "reason"]
    assert len(v1) + len(q1) == 5000 and set(v1.request_id).isdisjoint(q1.request_id)


def test_unseen_category_share_around_threshold(tmp_path):
    ref_day, ref = sim_day(3, rows=2000)
    day, frame = sim_day(4, rows=2000)
    frame[["user_id", "item_id"]] = ref[["user_id", "item_id"]].to_numpy()  # only device brings new values
    ref["device"] = np.where(ref.index % 2, "mobile", "desktop")
    frame["device"] = np.where(frame.index % 10 < 3, "tablet", np.where(frame.index % 2, "mobile", "desktop"))
    first = make_rt(tmp_path / "first")
    write_training(first, ref_day, ref)
    skipped = validate(ref_day, first)
    assert skipped.unseen_category_share is None and skipped.drift["skipped"]
    report = json.loads((Path(skipped.report).parent / "validation.json").read_text())
    assert any("skipped" in str(r["observed"]) for r in report["expectations"] if "unseen" in r["expectation"])

    for threshold, passes in ((0.35, True), (0.25, False)):
        rt = make_rt(tmp_path / f"t{threshold}", unseen_category_share=threshold)
        write_validated(rt, ref_day, ref)
        write_training(rt, day, frame)
        if passes:
            result = validate(day, rt)
            assert result.unseen_category_share["device"] == pytest.approx(0.3, abs=0.01)
        else:
            with pytest.raises(GateFailed, match="rule unseen_category_share on feature device: 30.00% of 2000 rows"
                               r".*have a device never seen in the reference \(collected days 2026-") as err:
                validate(day, rt)
            assert "tablet" in str(err.value) and "FLYWHEEL_VALIDATION__UNSEEN_CATEGORY_SHARE" in str(err.value)
            assert rt.lake.read_manifest(VALIDATED, day) is None
            assert rt.lake.read_partition(QUARANTINE, day).num_rows == 0  # new categories are not bad rows

    churn = make_rt(tmp_path / "churn", unseen_category_share=0.35)
    write_validated(churn, ref_day, ref)
    write_training(churn, day, frame.assign(user_id=[f"new-user-{i}" for i in range(len(frame))]))
    result = validate(day, churn)  # every user is new: normal for entity keys, neither gated nor tracked
    assert "user_id" not in result.unseen_category_share and "device" in result.unseen_category_share


def _users(frame: pd.DataFrame, prefix: str, segments: list[str]) -> pd.DataFrame:
    n = len(frame)
    return frame.assign(user_id=[f"{prefix}{i % 200}" for i in range(n)],
                        user_segment=[segments[i % len(segments)] for i in range(n)])


def test_entity_attributes_count_only_on_known_entities(tmp_path):
    """A new user arriving with a segment of its own is churn; a known user showing a never-seen segment is
    what the check is for, and the failure names the rule, the feature, the numbers and the setting."""
    ref_day, ref = sim_day(3, rows=2000)
    day, frame = sim_day(4, rows=2000)
    ref = _users(ref, "old", ["s1", "s2"])
    rt = make_rt(tmp_path / "churn")
    write_validated(rt, ref_day, ref)
    churn = pd.concat([_users(frame.iloc[:1000], "new", ["fresh1", "fresh2"]),
                       _users(frame.iloc[1000:], "old", ["s1", "s2"])])
    write_training(rt, day, churn)
    result = validate(day, rt)
    assert result.unseen_category_share["user_segment"] == 0.0

    moved = make_rt(tmp_path / "moved")
    write_validated(moved, ref_day, ref)
    write_training(moved, day, pd.concat([_users(frame.iloc[:1000], "new", ["s1"]),
                                          _users(frame.iloc[1000:], "old", ["renamed"])]))
    with pytest.raises(GateFailed, match=r"rule unseen_category_share on feature user_segment: 100.00% of 1000 "
                                         r"rows of known user entities \(user_id seen before\) \(1000 rows\)"
                                         r".*'renamed'.*FLYWHEEL_VALIDATION__UNSEEN_CATEGORY_SHARE"):
        validate(day, moved)


def test_a_failed_day_still_counts_as_seen(tmp_path):
    """The freeze: a day that failed its gate is still data the loop has met, so the next day with the same
    new category is measured against it and passes."""
    days = [sim_day(i, rows=1000) for i in (3, 4, 5)]
    rt = make_rt(tmp_path / "home", unseen_category_share=0.25)
    days[0][1]["device"] = np.where(days[0][1].index % 2, "mobile", "desktop")
    write_validated(rt, *days[0])
    for i, (day, frame) in enumerate(days[1:]):
        frame["device"] = np.where(frame.index % 10 < 3, "tablet", "mobile")
        write_training(rt, day, frame)
        if i == 0:
            with pytest.raises(GateFailed, match="feature device"):
                validate(day, rt)
        else:
            result = validate(day, rt)
            assert result.passed and result.unseen_category_share["device"] == 0.0
            assert result.unseen_reference == [f"collected days {days[0][0]}, {days[1][0]}"]


def test_churn_stream_passes_every_day(tmp_path):
    """The churn stream, validate only, day after day: every day passes, though most rows carry a branch no
    earlier day had (the old, validated-only reference failed day 2 onwards)."""
    from tests.churn_stream import CHURN_SPEC, START, churn_day

    rt = make_rt(tmp_path / "home", spec_path=CHURN_SPEC)
    schema = pa.schema([*prediction_schema(rt.spec), pa.field("churned", pa.float64()), pa.field("label_time", TS)])
    seen: set[str] = set()
    for k in range(1, 5):
        f = churn_day(k)
        n = len(f)
        f["ts"] = pd.to_datetime(f["ts"]).dt.floor("us")
        f = f.assign(request_id=[f"d{k}-{i}" for i in range(n)], row=np.zeros(n, np.int32), served_at=f["ts"],
                     model_version="1", score=0.5, churned=f["churned"].astype(float),
                     label_time=f["ts"] + timedelta(minutes=1))
        if k > 1:
            assert (~f.branch.isin(seen)).mean() > rt.settings.validation.unseen_category_share
        seen |= set(f.branch)
        day = START + timedelta(days=k)
        rt.lake.write_partition(TRAINING, day, pa.Table.from_pandas(f[schema.names], schema=schema,
                                                                    preserve_index=False))
        result = validate(day, rt)
        assert result.passed and (k == 1 or result.unseen_category_share["branch"] < 0.1)


SUITE = {"name": "user", "expectations": [
    {"type": "expect_column_values_to_be_in_set",
     "kwargs": {"column": "device", "value_set": ["mobile", "desktop", "tablet"]}},
    {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "position", "min_value": 1, "max_value": 10}},
]}


def test_user_suite_adds_row_and_batch_expectations(tmp_path):
    day, frame = sim_day(2, rows=2000)
    frame.loc[7, "device"] = "fridge"
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(SUITE))
    rt = make_rt(tmp_path / "home", validation_suite_path=path)
    write_training(rt, day, frame)
    result = validate(day, rt)
    q = rt.lake.read_partition(QUARANTINE, day).to_pandas()
    assert list(q.request_id) == ["d2-7"] and "expect_column_values_to_be_in_set(column=device" in q.reason[0]
    assert result.suite_sha256 and rt.lake.read_manifest(VALIDATED, day)["inputs"]["suite_sha256"] == \
        result.suite_sha256

    tight = {"name": "user", "expectations": [{**SUITE["expectations"][1],
                                               "kwargs": {"column": "position", "max_value": 2}}]}
    path.write_text(json.dumps(tight))
    with pytest.raises(GateFailed, match=r"expect_column_mean_to_be_between\(column=position, max_value=2"):
        validate(day, rt)


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    (json.dumps({"expectations": [{"type": "expect_column_values_to_be_purple", "kwargs": {"column": "price"}}]}),
     r"expectations\[0\] \(expect_column_values_to_be_purple\): unknown expectation type"),
    (json.dumps({"expectations": [SUITE["expectations"][0], {"type": "expect_column_values_to_not_be_null",
                                                             "kwargs": {"column": "prize"}}]}),
     r"expectations\[1\] \(expect_column_values_to_not_be_null\): unknown column 'prize'"),
    (json.dumps({"expectations": [{"type": "expect_column_values_to_be_between",
                                   "kwargs": {"column": "price", "min_valu": 0}}]}),
     r"expectations\[0\].*invalid kwargs.*min_valu"),
    (json.dumps({"expectations": [{"type": "expect_column_median_to_be_between",
                                   "kwargs": {"column": "price", "min_value": 0}}]}),
     r"expectations\[0\].*not a column-map expectation, and not an aggregate"),
])
def test_bad_suite_file_fails_naming_file_and_entry(tmp_path, content, message):
    day, frame = sim_day(2, rows=500)
    path = tmp_path / "broken.expectations.json"
    path.write_text(content)
    rt = make_rt(tmp_path / "home", validation_suite_path=path)
    write_training(rt, day, frame)
    with pytest.raises(SuiteFileError, match=message) as err:
        validate(day, rt)
    assert str(path) in str(err.value)


def test_an_expectation_that_cannot_run_stops_the_gate(tmp_path):
    day, frame = sim_day(2, rows=500)
    path = tmp_path / "suite.json"
    path.write_text(json.dumps({"expectations": [{"type": "expect_column_values_to_be_between",
                                                  "kwargs": {"column": "device", "min_value": 0}}]}))
    rt = make_rt(tmp_path / "home", validation_suite_path=path)
    write_training(rt, day, frame)
    with pytest.raises(StageError, match=r"expect_column_values_to_be_between\(column=device.*could not run"):
        validate(day, rt)
    assert rt.lake.read_manifest(VALIDATED, day) is None and rt.lake.read_manifest(QUARANTINE, day) is None


def test_report_dir_and_data_docs(tmp_path, monkeypatch):
    monkeypatch.delenv("GX_ANALYTICS_ENABLED", raising=False)
    day, frame = sim_day(1, rows=1000)
    rt = make_rt(tmp_path / "home")
    write_training(rt, day, frame)
    result = validate(day, rt)
    # GX is configured on its contexts, not through the process environment.
    assert "GX_ANALYTICS_ENABLED" not in os.environ
    assert "analytics_enabled: false" in (rt.settings.home_abs / "gx" / "great_expectations.yml").read_text()
    directory = rt.settings.reports_dir / "validation" / f"dt={day}"
    assert Path(result.report) == directory / "index.html"
    assert {"index.html", "validation.json", "drift.html", "drift.json"} <= {p.name for p in directory.iterdir()}
    docs = Path(result.data_docs)
    assert docs.name == "index.html" and docs.is_file() and docs.is_relative_to(rt.settings.home_abs / "gx")
    assert f"dt={day}" in "".join(p.read_text() for p in docs.parent.rglob("*.html"))
    page = (directory / "data_docs.html").read_text()  # the copy the train step logs to MLflow
    assert f"dt={day}" in page and "flywheel-validation" in page


def test_demo_suite_file_passes_on_simulated_traffic(tmp_path):
    day, frame = sim_day(6, rows=3000, seed=0)
    spec_suite = Path(__file__).resolve().parents[2] / "feature_store" / "specs" / "ctr.expectations.json"
    rt = make_rt(tmp_path / "home", validation_suite_path=None)
    assert rt.settings.validation.suite_path is None  # the default next to the spec is found by name
    write_training(rt, day, frame)
    result = validate(day, rt)
    assert result.suite_file == str(spec_suite) and result.passed and result.quarantined == 0


def test_running_aggregates_match_the_whole_column():
    from pipeline.stages.validate import _Aggregates

    rng = np.random.default_rng(1)
    values = rng.normal(3.0, 2.0, 10_000)
    values[::97] = np.nan
    agg = _Aggregates({"x"})
    for lo in range(0, len(values), 1024):
        agg.update(pa.RecordBatch.from_pydict({"x": pa.array(values[lo:lo + 1024], from_pandas=True)}))
    whole = pd.Series(values)
    assert agg.statistic("rows", None) == 10_000
    for stat, expected in (("mean", whole.mean()), ("stdev", whole.std()), ("min", whole.min()),
                           ("max", whole.max()), ("sum", whole.sum())):
        assert agg.statistic(stat, "x") == pytest.approx(expected, rel=1e-9), stat


def _old_sum_of_squares_stdev(chunks: list[np.ndarray]) -> float:
    """The formula this replaced, kept here to show the test tells the two apart."""
    n = sum(len(c) for c in chunks)
    total = sum(float(c.sum()) for c in chunks)
    sumsq = sum(float(np.square(c).sum()) for c in chunks)
    return float(np.sqrt(max(0.0, (sumsq - total**2 / n) / (n - 1))))


def test_streamed_stdev_is_stable_on_a_large_mean_column():
    """An epoch-like column (1e9 plus unit noise) over uneven chunks: the stdev must match numpy's two-pass
    float64 answer, which the sum-of-squares formula misses by orders of magnitude."""
    from pipeline.stages.validate import _Aggregates

    rng = np.random.default_rng(7)
    values = 1e9 + rng.normal(0.0, 1.0, 50_000)
    bounds = [0, 1, 7, 1000, 4096, 20_000, 33_333, 50_000]
    chunks = [values[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    agg = _Aggregates({"x"})
    for c in chunks:
        agg.update(pa.RecordBatch.from_pydict({"x": pa.array(c)}))
    expected = float(np.std(values, ddof=1))
    assert agg.statistic("stdev", "x") == pytest.approx(expected, rel=1e-6)
    assert agg.statistic("mean", "x") == pytest.approx(float(np.mean(values)), rel=1e-12)
    assert _old_sum_of_squares_stdev(chunks) != pytest.approx(expected, rel=1e-6)


def test_stdev_needs_two_values_and_skips_empty_chunks():
    from pipeline.stages.validate import _Aggregates

    agg = _Aggregates({"x"})
    agg.update(pa.RecordBatch.from_pydict({"x": pa.array([np.nan, np.nan], from_pandas=True)}))
    assert agg.statistic("stdev", "x") is None and agg.statistic("mean", "x") is None
    agg.update(pa.RecordBatch.from_pydict({"x": pa.array([5.0])}))
    assert agg.statistic("stdev", "x") is None and agg.statistic("mean", "x") == 5.0
    agg.update(pa.RecordBatch.from_pydict({"x": pa.array([7.0])}))
    assert agg.statistic("stdev", "x") == pytest.approx(float(np.std([5.0, 7.0], ddof=1)), rel=1e-12)
