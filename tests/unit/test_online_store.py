"""One contract, run against both online stores: the embedded SQLite file and the real Redis at
127.0.0.1:6379 (DB 13, a namespace of our own, removed afterwards)."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from feature_store.entity_tables import lookup_features
from feature_store.online import OnlineStoreError, open_store
from feature_store.online.base import OnlineStore, StoredValue, to_micros
from feature_store.spec import FeatureSpec
from pipeline.errors import RequestError
from serving.schema import fill_from_store, parse_rows, plan_lookup

REDIS_URI = "redis://127.0.0.1:6379/13"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
S = timedelta(seconds=1)


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path) -> OnlineStore:
    namespace = f"test-{uuid.uuid4().hex[:8]}"
    st = open_store(None if request.param == "sqlite" else REDIS_URI, tmp_path, namespace)
    yield st
    st.clear()
    if request.param == "redis":
        assert list(st.client.scan_iter(match=f"flywheel:{namespace}:*")) == []
    st.close()


def test_newer_wins_and_older_never_replaces(store):
    assert store.write("user", [("u1", "segment", "a", T0), ("u1", "age", 3.0, T0)]) == 2
    assert store.write("user", [("u1", "segment", "stale", T0 - S), ("u1", "age", 4.0, T0 + S)]) == 1
    got = store.read("user", ["u1"], ["segment", "age"])[0]
    assert {f: (v.value, v.as_of) for f, v in got.items()} == {"segment": ("a", T0), "age": (4.0, T0 + S)}
    assert store.write("user", [("u1", "segment", "fixed", T0)]) == 1  # same as-of time: a correction
    assert store.read("user", ["u1"], ["segment"])[0]["segment"] == StoredValue("fixed", to_micros(T0))


def test_missing_keys_and_features_are_absent(store):
    store.write("user", [("u1", "segment", "a", T0)])
    assert store.read("user", ["nobody", "u1", "u1"], ["segment", "never_written"]) == [
        {}, {"segment": StoredValue("a", to_micros(T0))}, {"segment": StoredValue("a", to_micros(T0))}]
    assert store.read("item", ["u1"], ["segment"]) == [{}]  # entities do not share keys
    assert store.read("user", [], ["segment"]) == []


def test_many_keys_across_entities_in_one_read(store):
    n = 2500  # more than one SQL chunk and one Redis pipeline batch
    store.write("user", [(f"u{i}", "segment", f"s{i % 7}", T0 + i * S) for i in range(n)])
    store.write("item", [(f"i{i}", "category", i * 0.5, T0) for i in range(10)])
    keys = [f"u{i}" for i in range(n - 1, -1, -3)] + ["ghost"]
    got = store.read_entities({"user": (keys, ["segment"]), "item": (["i9", "i0"], ["category"])})
    assert [r["segment"].value for r in got["user"][:-1]] == [f"s{int(k[1:]) % 7}" for k in keys[:-1]]
    assert got["user"][0]["segment"].as_of == T0 + (n - 1) * S and got["user"][-1] == {}
    assert [r["category"].value for r in got["item"]] == [4.5, 0.0]


def test_the_servers_async_read_returns_what_the_sync_read_does(store):
    import asyncio

    store.write("user", [(f"u{i}", "segment", f"s{i}", T0 + i * S) for i in range(50)])
    wanted = {"user": ([f"u{i}" for i in range(0, 50, 7)] + ["ghost"], ["segment", "absent"])}

    async def read_twice():
        first = await store.read_entities_async(wanted)
        second = await store.read_entities_async(wanted)  # the async client is reused, not rebuilt
        await store.aclose()
        return first, second

    first, second = asyncio.run(read_twice())
    assert first == second == store.read_entities(wanted)
    assert first["user"][1]["segment"].value == "s7" and first["user"][-1] == {}


def test_concurrent_writers_converge_on_the_newest(store):
    def writer(offset: int) -> None:
        store.write("user", [("u1", "segment", f"v{t}", T0 + t * S) for t in range(offset, 60, 3)])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = store.read("user", ["u1"], ["segment"])[0]["segment"]
    assert (got.value, got.as_of) == ("v59", T0 + 59 * S)


def test_clear_and_state(store):
    store.write("user", [("u1", "segment", "a", T0)])
    store.write("item", [("i1", "category", "c", T0)])
    store.set_state("user", {"partitions": {"2026-03-01": {"digest": "x", "cutoff": None}}})
    assert store.get_state("user")["partitions"]["2026-03-01"]["digest"] == "x"
    assert store.get_state("item") is None
    store.clear("user")
    assert store.read("user", ["u1"], ["segment"]) == [{}] and store.get_state("user") is None
    assert store.read("item", ["i1"], ["category"])[0]["category"].value == "c"


def test_uri_selects_the_backend(tmp_path):
    default = open_store(None, tmp_path, "ns")
    assert type(default).__name__ == "SQLiteStore" and default.path == tmp_path / "online.db"
    default.close()
    rel = open_store("sqlite:///stores/x.db", tmp_path, "ns")
    assert rel.path == tmp_path / "stores" / "x.db"
    rel.close()
    absolute = open_store(f"sqlite:///{tmp_path}/abs.db", tmp_path / "elsewhere", "ns")
    assert absolute.path == tmp_path / "abs.db"
    absolute.close()
    remote = open_store(REDIS_URI, tmp_path, "ns")
    assert type(remote).__name__ == "RedisStore"
    remote.close()
    with pytest.raises(OnlineStoreError, match="online_store_uri 'postgres://x'"):
        open_store("postgres://x", tmp_path, "ns")


def test_server_lookup_fills_only_what_is_missing(tmp_path):
    """The server's request path: parse with entity features optional, one batched read, request values kept,
    nullable features may stay null, a non-nullable one the store lacks is a 422 naming feature and key."""
    spec = FeatureSpec.model_validate({
        "name": "shop", "event_time": "ts", "entities": {"user": {"key": "uid"}},
        "features": {"uid": {"type": "categorical", "entity": "user"},
                     "tier": {"type": "categorical", "entity": "user"},
                     "spend": {"type": "numeric", "entity": "user", "nullable": True},
                     "price": {"type": "numeric"}},
        "label": {"name": "y", "attribution_window": "1h"}})
    entity_of = lookup_features(spec)
    fillable = frozenset(entity_of)
    with open_store(None, tmp_path, spec.name) as st:
        st.write("user", [("1", "tier", "gold", T0), ("1", "spend", 9.5, T0), ("2", "tier", "tin", T0)])
        full = {"uid": "1", "tier": "t", "spend": 1.0, "price": 2.0}
        cols, _ = parse_rows({"rows": [full]}, spec, 10, fillable)
        assert plan_lookup(cols, spec, entity_of) is None  # nothing missing: no store call at all
        rows = [{"uid": 1, "price": 1.0}, {"uid": "2", "price": 1.0}, {"uid": "1", "tier": "mine", "price": 1.0}]
        cols, _ = parse_rows({"rows": rows}, spec, 10, fillable)
        lookup = plan_lookup(cols, spec, entity_of)
        assert lookup.wanted == {"user": (["1", "2"], ["tier", "spend"])}  # distinct keys, one read
        fill_from_store(cols, spec, lookup, st.read_entities(lookup.wanted))
        assert cols["tier"] == ["gold", "tin", "mine"] and cols["spend"] == [9.5, None, 9.5]
        with pytest.raises(RequestError, match="rows.0..tier: missing"):
            parse_rows({"rows": [{"uid": "1", "price": 1.0}]}, spec, 10)  # without the store: required
        cols, _ = parse_rows({"rows": [{"uid": "1", "price": 1.0}, {"uid": "3", "price": 1.0}]}, spec, 10, fillable)
        lookup = plan_lookup(cols, spec, entity_of)
        with pytest.raises(RequestError) as e:
            fill_from_store(cols, spec, lookup, st.read_entities(lookup.wanted))
        assert str(e.value) == "rows[1].tier: missing in the request and the online store has no value for uid='3'"
        assert e.value.status == 422
