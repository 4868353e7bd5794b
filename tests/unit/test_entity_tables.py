"""Offline entity tables: ingest validates against the spec and is idempotent; the point-in-time join never
sees a value from a row's future."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pandas as pd
import pyarrow as pa
import pytest

from feature_store.entity_tables import (
    as_of_join,
    entity_features,
    ingest,
    latest_values,
    lookup_features,
    read_table,
    table_name,
)
from feature_store.offline import Lake
from feature_store.spec import FeatureSpec, load_spec
from pipeline.config import DEFAULT_SPEC
from pipeline.errors import EntityTableError
from tests.helpers import DATA, LOANS_SPEC

CTR = load_spec(DEFAULT_SPEC)
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)


def users(*rows: tuple[str, datetime, str]) -> pd.DataFrame:
    return pd.DataFrame({"user_id": [r[0] for r in rows], "event_time": [r[1] for r in rows],
                         "user_segment": [r[2] for r in rows]})


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(str(tmp_path / "lake"))


def test_entity_features_are_derived_from_the_spec():
    assert entity_features(CTR, "user") == ["user_segment"]
    assert entity_features(CTR, "item") == ["item_category"]
    assert lookup_features(CTR) == {"user_segment": "user", "item_category": "item"}
    assert lookup_features(load_spec(LOANS_SPEC)) == {}  # the account entity has only its key


def test_point_in_time_join_never_sees_the_future(lake):
    ingest(lake, CTR, "user", users(("u1", T0, "a"), ("u1", T0 + S, "b"), ("u2", T0 + timedelta(days=1), "c")))
    rows = pd.DataFrame({
        "user_id": ["u1", "u1", "u1", "u1", "u2", "u2", "u3"],
        "event_time": [T0 - S, T0, T0 + S / 2, T0 + S, T0, T0 + timedelta(days=3), T0],
    })
    out = as_of_join(lake, CTR, rows, "user")
    got = [None if pd.isna(v) else v for v in out["user_segment"]]
    # before the first value: null; exactly at it: seen; updated at t+1s: not seen at t+0.5s; unknown key: null
    assert got == [None, "a", "a", "b", None, "c", None]
    assert list(out["user_id"]) == list(rows["user_id"])  # row order kept


def test_join_keeps_request_values_and_reads_only_needed_partitions(lake):
    ingest(lake, CTR, "user", users(("u1", T0, "a"), ("u1", T0 + timedelta(days=2), "z")))
    ours = pd.DataFrame({"user_id": ["u1", "u1"], "event_time": [T0 + S, T0 + S],
                         "user_segment": ["mine", None]})
    out = as_of_join(lake, CTR, ours, "user")
    assert list(out["user_segment"]) == ["mine", "a"]
    # a partition after the last row's day is not needed: removing it cannot change the answer
    lake.fs.delete_dir(lake.partition_path(table_name("user"), (T0 + timedelta(days=2)).date()))
    assert list(as_of_join(lake, CTR, ours, "user")["user_segment"]) == ["mine", "a"]


def test_tables_with_a_subset_of_features_coalesce(lake):
    """Two sources feed one entity, each with its own feature: a null means "not known then", so per feature
    the latest known value is the one joined and materialized."""
    spec = FeatureSpec.model_validate({
        "name": "shop", "event_time": "ts", "entities": {"user": {"key": "uid"}},
        "features": {"uid": {"type": "categorical", "entity": "user"},
                     "tier": {"type": "categorical", "entity": "user"},
                     "spend": {"type": "numeric", "entity": "user", "min": 0, "nullable": True}},
        "label": {"name": "y", "attribution_window": "1h"}})
    ingest(lake, spec, "user", pd.DataFrame({"uid": ["u1"], "ts": [T0], "tier": ["gold"]}))
    ingest(lake, spec, "user", pd.DataFrame({"uid": ["u1", "u1"], "ts": [T0 + S, T0], "spend": [5, 3]}))
    table = read_table(lake, spec, "user")
    assert table.num_rows == 2  # (u1, T0) from both sources is one row
    row = pd.DataFrame({"uid": ["u1", "u1"], "ts": [T0, T0 + 2 * S]})
    out = as_of_join(lake, spec, row, "user")
    assert list(out["tier"]) == ["gold", "gold"] and list(out["spend"]) == [3.0, 5.0]
    latest = latest_values(table, spec, "user")
    assert dict(zip(latest["feature"], latest["value"], strict=True)) == {"tier": "gold", "spend": 5.0}
    with pytest.raises(EntityTableError, match=r"column 'spend': 1 value\(s\) outside the spec's range"):
        ingest(lake, spec, "user", pd.DataFrame({"uid": ["u1"], "ts": [T0], "spend": [-1]}))


def test_ingest_is_idempotent_and_merges_days(lake, tmp_path):
    frame = users(("u1", T0, "a"), ("u2", T0 + S, "b"), ("u3", T0 + timedelta(days=1), "c"))
    path = tmp_path / "users.parquet"
    frame.to_parquet(path)
    first = ingest(lake, CTR, "user", path)
    assert (first.rows_in, first.partitions_written, first.days) == (3, 2, [T0.date(), T0.date() + timedelta(1)])
    again = ingest(lake, CTR, "user", path)
    assert (again.partitions_written, again.partitions_unchanged, again.rows_total) == (0, 2, 3)
    table = read_table(lake, CTR, "user")
    assert table.num_rows == 3
    more = ingest(lake, CTR, "user", pd.concat([frame.head(1), users(("u4", T0 + 2 * S, "d"))]))
    assert more.partitions_written == 1 and read_table(lake, CTR, "user").num_rows == 4
    exact_dupes = ingest(lake, CTR, "user", pd.concat([frame, frame]))
    assert exact_dupes.duplicates_collapsed == 3 and read_table(lake, CTR, "user").num_rows == 4
    # same key and time with a corrected value: the newer ingest wins, no duplicate row
    ingest(lake, CTR, "user", users(("u1", T0, "fixed")))
    rows = read_table(lake, CTR, "user", [T0.date()]).to_pylist()
    assert [r["user_segment"] for r in rows if r["user_id"] == "u1"] == ["fixed"]


def test_integer_keys_and_iso_strings_are_canonicalised(lake):
    ingest(lake, CTR, "user", pd.DataFrame({"user_id": [7, 8], "event_time": ["2026-03-01T10:00:00Z",
                                                                              "2026-03-01T11:00:00+01:00"],
                                            "user_segment": ["a", "b"]}))
    table = read_table(lake, CTR, "user")
    assert table.column("user_id").to_pylist() == ["7", "8"]
    assert table.column("event_time").to_pylist()[1] == datetime(2026, 3, 1, 10, tzinfo=UTC)
    assert table.schema.field("event_time").type == pa.timestamp("us", tz="UTC")


@pytest.mark.parametrize(
    ("entity", "frame", "message"),
    [
        ("shop", users(("u1", T0, "a")), "unknown entity 'shop'"),
        ("user", pd.DataFrame({"user_id": ["u1"], "user_segment": ["a"]}), "column 'event_time' is missing"),
        ("user", pd.DataFrame({"event_time": [T0], "user_segment": ["a"]}), "column 'user_id' is missing"),
        ("user", users(("u1", T0, "a")).assign(item_category="x"), "'item_category' cannot be stored here "
                                                                    "(it belongs to entity 'item')"),
        ("user", users(("u1", T0, "a")).assign(price=1.0), "'price' cannot be stored here (it is not an entity"),
        ("user", users(("u1", T0, "a")).assign(colour="red"), "'colour' cannot be stored here (the spec does not"),
        ("user", pd.DataFrame({"user_id": ["u1"], "event_time": [T0]}), "no feature column"),
        ("user", pd.DataFrame({"user_id": ["u1"], "event_time": [T0], "user_segment": [[1]]}),
         "column 'user_segment': expected strings"),
        ("user", pd.DataFrame({"user_id": ["u1"], "event_time": [1.5], "user_segment": ["a"]}),
         "column 'event_time': expected timestamps"),
        ("user", pd.DataFrame({"user_id": ["u1"], "event_time": ["yesterday"], "user_segment": ["a"]}),
         "column 'event_time': not ISO-8601"),
        ("user", pd.DataFrame({"user_id": [None], "event_time": [T0], "user_segment": ["a"]}),
         "column 'user_id' has 1 null"),
        ("user", pd.DataFrame({"user_id": ["u1"], "event_time": [T0], "user_segment": [None]}),
         "column 'user_segment': 1 null value"),
        ("user", users(("u1", T0, "a"), ("u1", T0, "b")), "2 rows share a (user_id, event_time) pair"),
        ("user", users(("u1", T0, "a")).head(0), "no rows"),
    ],
)
def test_bad_input_is_refused_naming_the_column(lake, entity, frame, message):
    with pytest.raises(EntityTableError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ingest(lake, CTR, entity, frame)
    assert lake.partition_days(table_name("user")) == []  # nothing half-written


def test_range_and_file_errors(lake, tmp_path):
    spec = load_spec(LOANS_SPEC)
    with pytest.raises(EntityTableError, match="no features besides its key"):
        ingest(lake, spec, "account", pd.DataFrame({"account_no": ["a"], "applied_at": [T0]}))
    with pytest.raises(EntityTableError, match="no such file"):
        ingest(lake, CTR, "user", tmp_path / "nope.parquet")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(EntityTableError, match="not a readable Parquet file"):
        ingest(lake, CTR, "user", tmp_path / "bad.parquet")


def test_latest_values_respects_up_to(lake):
    ingest(lake, CTR, "user", users(("u1", T0, "a"), ("u1", T0 + S, "b"), ("u2", T0 + 2 * S, "c")))
    table = read_table(lake, CTR, "user")
    assert latest_values(table, CTR, "user", T0).to_dict("records") == [
        {"key": "u1", "feature": "user_segment", "value": "a", "as_of": pd.Timestamp(T0)}]
    every = latest_values(table, CTR, "user")
    assert dict(zip(every["key"], every["value"], strict=True)) == {"u1": "b", "u2": "c"}
    assert read_table(lake, CTR, "user", keys=["u2"]).num_rows == 1
    assert read_table(lake, CTR, "user", [date(2020, 1, 1)]).num_rows == 0


def test_join_accepts_iso_strings_null_keys_and_any_index(lake):
    ingest(lake, CTR, "user", users(("u1", T0, "a")))
    rows = pd.DataFrame({"user_id": ["u1", None, "u1"],
                         "event_time": ["2026-03-01T13:00:00Z", "2026-03-01T13:00:00Z", "2026-03-01T11:00:00Z"]},
                        index=[10, 20, 30])
    out = as_of_join(lake, CTR, rows, "user")
    assert list(out.index) == [10, 20, 30]
    assert [None if pd.isna(v) else v for v in out["user_segment"]] == ["a", None, None]
    with pytest.raises(EntityTableError, match="1 row\\(s\\) have no 'event_time'"):
        as_of_join(lake, CTR, rows.assign(event_time=[None, "2026-03-01T13:00:00Z", None]).head(1), "user")
    with pytest.raises(EntityTableError, match="'price'\\] are not features of this entity"):
        as_of_join(lake, CTR, rows, "user", ["price"])


FLIGHTS = load_spec(DATA / "flights.yaml")  # key `carrier` read from UniqueCarrier, `carrier_size` from CarrierFleet


def test_ingest_reads_source_columns_like_bootstrap(lake, tmp_path):
    path = tmp_path / "carriers.parquet"
    pd.DataFrame({"UniqueCarrier": ["AA", "UA"], "sched_dep": [T0, T0 + S],
                  "CarrierFleet": [900, 800]}).to_parquet(path)
    assert ingest(lake, FLIGHTS, "carrier", path).rows_in == 2
    table = read_table(lake, FLIGHTS, "carrier")
    assert table.column_names == ["carrier", "sched_dep", "carrier_size"], "the lake keeps spec names"
    assert table.to_pydict()["carrier_size"] == [900.0, 800.0]
    # a file written under the spec's names before `source:` was declared still reads the same
    ingest(lake, FLIGHTS, "carrier", pd.DataFrame({"carrier": ["AA"], "sched_dep": [T0 + 2 * S],
                                                   "carrier_size": [901]}))
    latest = latest_values(read_table(lake, FLIGHTS, "carrier"), FLIGHTS, "carrier")
    assert dict(zip(latest["key"], latest["value"], strict=True)) == {"AA": 901.0, "UA": 800.0}


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"carrier": ["AA"], "UniqueCarrier": ["AA"], "sched_dep": [T0], "CarrierFleet": [1]},
         "feature 'carrier' is given twice, as column 'UniqueCarrier' (its source: in the spec) and as 'carrier'"),
        ({"Carrier": ["AA"], "sched_dep": [T0], "CarrierFleet": [1]},
         "column 'UniqueCarrier' is missing: the spec reads its key feature 'carrier' from it "
         "(source: UniqueCarrier); columns: ['Carrier', 'sched_dep', 'CarrierFleet']"),
        ({"UniqueCarrier": ["AA"], "sched_dep": [T0], "CarrierFleet": [-1]},
         "column 'CarrierFleet' (feature 'carrier_size'): 1 value(s) outside the spec's range"),
        ({"UniqueCarrier": ["AA"], "sched_dep": [T0], "DepDelay": [1.0]},
         "column 'DepDelay' cannot be stored here (the spec reads feature 'dep_delay' from it; it is not an "
         "entity feature)"),
        ({"UniqueCarrier": ["AA"], "sched_dep": [T0]},
         "no feature column; expected at least one of ['CarrierFleet (or carrier_size)']"),
    ],
)
def test_source_column_errors_name_the_file_feature_and_column(lake, tmp_path, frame, message):
    path = tmp_path / "carriers.parquet"
    pd.DataFrame(frame).to_parquet(path)
    with pytest.raises(EntityTableError) as e:
        ingest(lake, FLIGHTS, "carrier", path)
    assert str(e.value).startswith(f"{path}: entity 'carrier': ") and message in str(e.value)
    assert "\n" not in str(e.value) and lake.partition_days(table_name("carrier")) == []
