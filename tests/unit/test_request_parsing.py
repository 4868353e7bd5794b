from __future__ import annotations

import pytest

from feature_store.spec import load_spec
from pipeline.errors import RequestError
from serving.schema import parse_feedback, parse_rows, warmup_frame
from tests.helpers import LOANS_SPEC

SPEC = load_spec(LOANS_SPEC)
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
