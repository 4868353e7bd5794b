from __future__ import annotations

import jsonschema
import pytest

from feature_store.spec import FeatureSpec, load_spec
from pipeline.errors import RequestError
from serving.schema import openapi_bodies, parse_feedback, parse_rows, row_names, warmup_frame
from tests.helpers import DATA, LOANS_SPEC

SPEC = load_spec(LOANS_SPEC)
FLIGHTS = load_spec(DATA / "flights.yaml")  # every feature but `distance` declares `source:`
BY_SPEC = {"carrier": "AA", "carrier_size": 900, "origin": "JFK", "dep_delay": 12, "distance": 1000, "month": 3}
BY_SOURCE = {"UniqueCarrier": "AA", "CarrierFleet": 900, "Origin": "JFK", "DepDelay": 12, "distance": 1000,
             "Month": 3}
ROW = {"account_no": "a1", "region": "r1", "product": "card", "amount": 10, "tenure_months": 3.0,
       "income_ratio": 0.2}


def test_parses_rows_into_columns_and_times():
    cols, times = parse_rows({"rows": [ROW, {**ROW, "account_no": 7, "applied_at": "2026-03-01T10:00:00Z"}]},
                             SPEC, 10)
    assert cols["account_no"] == ["a1", "7"] and cols["amount"] == [10.0, 10.0]
    cols, _ = parse_rows({"rows": [{**ROW, "account_no": 7.0}, {**ROW, "region": True}]}, SPEC, 10)
    assert cols["account_no"][0] == "7" and cols["region"][1] == "true"  # same ids as the offline path
    cols, _ = parse_rows({"rows": [{**ROW, "amount": True}]}, SPEC, 10)
    assert cols["amount"] == [1.0]  # a boolean flag declared numeric is a 0/1 number
    assert times[0] is None and times[1].isoformat() == "2026-03-01T10:00:00+00:00"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "expected a JSON object"),
        ({"rows": []}, "non-empty list"),
        ({"rows": [ROW], "extra": 1}, "unknown field"),
        ({"rows": [{k: v for k, v in ROW.items() if k != "amount"}]}, r"rows\[0\].amount: missing"),
        ({"rows": [ROW, {**ROW, "amount": "ten"}]}, r"rows\[1\].amount: expected a number"),
        ({"rows": [{**ROW, "amount": None}]}, r"rows\[0\].amount: missing"),
        ({"rows": [{**ROW, "region": [1]}]}, r"rows\[0\].region: expected a string"),
        ({"rows": [{**ROW, "colour": "red"}]}, r"rows\[0\]: unknown field"),
        ({"rows": [{**ROW, "applied_at": "yesterday"}]}, r"rows\[0\].applied_at: not a usable time"),
    ],
)
def test_bad_rows_name_the_field(body, message):
    with pytest.raises(RequestError, match=message):
        parse_rows(body, SPEC, 10)


def test_too_many_rows_is_413():
    with pytest.raises(RequestError) as e:
        parse_rows({"rows": [ROW] * 3}, SPEC, 2)
    assert e.value.status == 413


def test_feedback_parsing():
    items = parse_feedback([{"request_id": "r", "label": 1, "time": "2026-03-01T00:00:00Z"},
                            {"request_id": "r", "row": 2, "label": 0}])
    assert items[0]["label"] == 1.0 and items[1]["row"] == 2 and items[1]["label_time"] is None
    for bad, msg in [({"label": 1}, "request_id"), ({"request_id": "r", "label": 3}, "label"),
                     ({"request_id": "r", "label": 1, "row": -1}, "row")]:
        with pytest.raises(RequestError, match=msg):
            parse_feedback(bad)


def test_warmup_frame_covers_every_feature():
    frame = warmup_frame(SPEC)
    assert list(frame.columns) == SPEC.feature_names and len(frame) == 4


def test_client_strings_and_times_are_bounded_with_the_field_named():
    from datetime import timedelta

    from serving.schema import RequestLimits, parse_request_id

    limits = RequestLimits(max_id_chars=8, max_string_chars=5, past=timedelta(days=30), future=timedelta(days=1))
    with pytest.raises(RequestError, match=r"rows\[0\].region: 6 characters exceed the limit of 5"):
        parse_rows({"rows": [{**ROW, "region": "r" * 6}]}, SPEC, 10, limits=limits)
    for when in ("0001-01-01T00:00:00Z", "9999-12-31T00:00:00Z"):
        with pytest.raises(RequestError, match=r"rows\[0\].applied_at: .* outside the accepted window"):
            parse_rows({"rows": [{**ROW, "applied_at": when}]}, SPEC, 10, limits=limits)
        with pytest.raises(RequestError, match=r"body.time: .* outside the accepted window"):
            parse_feedback({"request_id": "r", "label": 1, "time": when}, limits=limits)
    with pytest.raises(RequestError, match="request_id: 9 characters exceed the limit of 8"):
        parse_request_id("x" * 9, "request_id", limits)
    with pytest.raises(RequestError, match=r"\[0\].request_id: 9 characters"):
        parse_feedback([{"request_id": "x" * 9, "label": 1}], limits=limits)
    assert parse_request_id("x" * 8, "request_id", limits) == "x" * 8


def test_recent_ids_allow_a_retry_and_refuse_other_rows():
    from serving.limits import RecentIds

    ids = RecentIds(capacity=2)
    assert ids.claim("a", b"rows-1") and ids.claim("a", b"rows-1"), "a retry with the same rows is fine"
    assert not ids.claim("a", b"rows-2")
    assert ids.claim("b", b"x") and ids.claim("c", b"x")
    assert ids.claim("a", b"rows-2"), "forgotten after `capacity` newer ids: the guarantee is a window"


def test_features_are_accepted_under_their_source_names_and_parsed_under_spec_names():
    rows = [BY_SPEC, BY_SOURCE, {**BY_SOURCE, "Origin": "LGA", "sched_dep": "2026-03-01T10:00:00Z"}]
    cols, times = parse_rows({"rows": rows}, FLIGHTS, 10)
    assert list(cols) == FLIGHTS.feature_names, "columns (and so the logged rows) keep the spec's names"
    assert cols["dep_delay"] == [12.0, 12.0, 12.0] and cols["carrier"] == ["AA", "AA", "AA"]
    assert cols["origin"] == ["JFK", "JFK", "LGA"] and times[2].isoformat() == "2026-03-01T10:00:00+00:00"
    assert parse_rows({"rows": [BY_SOURCE]}, FLIGHTS, 10) == parse_rows({"rows": [BY_SPEC]}, FLIGHTS, 10)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({**BY_SOURCE, "dep_delay": 3}, r"rows\[1\].DepDelay: feature 'dep_delay' sent twice, as 'dep_delay' and "
                                       r"as its source column 'DepDelay'; send one of the two"),
        ({**BY_SPEC, "Month": None}, r"rows\[1\].Month: feature 'month' sent twice"),  # null or not: ambiguous
        ({**BY_SOURCE, "DepDelay": "late"}, r"rows\[1\].DepDelay: expected a number, got str"),
        ({k: v for k, v in BY_SOURCE.items() if k != "DepDelay"},
         r"rows\[1\].dep_delay: missing \(required by the feature spec; also accepted as 'DepDelay'\)"),
        ({**BY_SOURCE, "ArrDel15": 1}, r"rows\[1\]: unknown field\(s\) \['ArrDel15'\]"),  # the label's source
    ],
)
def test_source_names_errors_name_the_field_as_sent(row, message):
    with pytest.raises(RequestError, match=message) as e:
        parse_rows({"rows": [BY_SPEC, row]}, FLIGHTS, 10)
    assert e.value.status == 422


def test_a_source_name_that_is_another_spec_name_keeps_its_spec_meaning():
    """Rows sent under spec names before `source:` was declared must mean the same afterwards."""
    spec = FeatureSpec.model_validate({
        "name": "swap", "event_time": "ts", "label": {"name": "y", "attribution_window": "1h"},
        "features": {"a": {"type": "numeric", "source": "b"}, "b": {"type": "numeric", "source": "B"}}})
    cols, _ = parse_rows({"rows": [{"a": 1, "b": 2}, {"a": 1, "B": 2}]}, spec, 10)
    assert cols == {"a": [1.0, 1.0], "b": [2.0, 2.0]}
    assert row_names(spec).sources == {"b": "B"}
    assert row_names(spec) is row_names(spec), "built once per spec, not per request"


def test_published_row_schema_states_both_names_and_refuses_both_at_once():
    body = openapi_bodies(FLIGHTS, 10, {"carrier_size": "carrier"})["predict"]["requestBody"]
    schema = body["content"]["application/json"]["schema"]
    row = schema["properties"]["rows"]["items"]
    assert {"DepDelay", "dep_delay", "UniqueCarrier", "CarrierFleet", "Month"} <= set(row["properties"])
    assert "'DepDelay'" in row["properties"]["dep_delay"]["description"]
    assert "online store" in row["properties"]["CarrierFleet"]["description"]
    assert row["required"] == ["distance"]
    ok = [BY_SPEC, BY_SOURCE, {k: v for k, v in BY_SOURCE.items() if k not in ("Month", "CarrierFleet")}]
    jsonschema.validate({"rows": ok}, schema)
    for bad in ({**BY_SOURCE, "dep_delay": 1}, {**BY_SOURCE, "month": 1},
                {k: v for k, v in BY_SOURCE.items() if k != "Origin"}, {**BY_SPEC, "ArrDel15": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"rows": [bad]}, schema)
        with pytest.raises(RequestError):
            parse_rows({"rows": [bad]}, FLIGHTS, 10)  # the server refuses what the schema refuses
