from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_store.log_schema import PREDICTIONS, prediction_schema
from feature_store.offline import Lake
from feature_store.spec import load_spec
from pipeline.errors import LogUnavailable
from serving.log_sink import SegmentLog, read_spool
from tests.helpers import LOANS_SPEC

DAY = date(2026, 3, 1)


def test_partition_rewrite_replaces_atomically_and_cleans_leftovers(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    (tmp_path / "lake" / "t" / f".tmp-dt={DAY}-crashed").mkdir(parents=True)
    lake.write_partition("t", DAY, pa.table({"x": [1, 2, 3]}), inputs={"a": 1})
    lake.write_partition("t", DAY, pa.table({"x": [4, 5]}))
    assert lake.read_partition("t", DAY).column("x").to_pylist() == [4, 5]
    manifest = lake.read_manifest("t", DAY)
    assert manifest["rows"] == 2 and len(manifest["files"][0]["sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / "lake" / "t").iterdir()) == [f"dt={DAY}"]
    assert lake.partition_days("t") == [DAY]
    with pytest.raises(FileNotFoundError, match="no complete partition"):
        lake.read_partition("t", DAY + timedelta(days=1))


def _batch(spec, ids, when):
    schema = prediction_schema(spec)
    n = len(ids)
    data = {
        "request_id": ids, "row": [0] * n, "served_at": [datetime.now(UTC)] * n, spec.event_time: when,
        "model_version": ["1"] * n, "score": [0.5] * n, "account_no": ["a"] * n, "region": ["r"] * n,
        "product": ["card"] * n, "amount": [1.0] * n, "tenure_months": [2.0] * n, "income_ratio": [0.1] * n,
    }
    return pa.RecordBatch.from_pydict(data, schema=schema)


def _log(tmp_path, spec):
    lake = Lake(str(tmp_path / "lake"))
    return lake, SegmentLog("predictions", prediction_schema(spec), tmp_path / "spool", lake, PREDICTIONS,
                            (spec.event_time, "served_at"))


def test_seal_partitions_by_event_time_falling_back_to_server_time(tmp_path):
    spec = load_spec(LOANS_SPEC)
    lake, log = _log(tmp_path, spec)
    t1 = datetime(2026, 3, 1, 23, 59, tzinfo=UTC)
    log.append(_batch(spec, ["a", "b"], [t1, t1 + timedelta(minutes=2)]))
    log.append(_batch(spec, ["c"], [None]))
    assert log.seal() == 3
    today = datetime.now(UTC).date()
    days = {p.parent.name: pq.read_table(p).column("request_id").to_pylist()
            for p in (tmp_path / "lake" / PREDICTIONS).rglob("*.parquet")}
    assert days == {"dt=2026-03-01": ["a"], "dt=2026-03-02": ["b"], f"dt={today}": ["c"]}
    assert not list((tmp_path / "spool").glob("*.arrows"))


def test_recover_keeps_complete_batches_of_a_torn_spool_once(tmp_path):
    spec = load_spec(LOANS_SPEC)
    lake, log = _log(tmp_path, spec)
    t = datetime(2026, 3, 1, 12, tzinfo=UTC)
    log.append(_batch(spec, ["a"], [t]))
    log.flush()
    log.append(_batch(spec, ["b"], [t]))
    log.flush()
    spool = next((tmp_path / "spool").glob("*.arrows"))
    log._file.close()  # simulate SIGKILL: the process is gone, its flock with it
    data = spool.read_bytes()
    spool.write_bytes(data[:-40])  # the last batch torn mid-write
    assert read_spool(spool, prediction_schema(spec)).column("request_id").to_pylist() == ["a"]
    _, fresh = _log(tmp_path, spec)
    assert fresh.recover() == 1
    assert fresh.recover() == 0
    files = list((tmp_path / "lake" / PREDICTIONS).rglob("*.parquet"))
    assert len(files) == 1 and pq.read_table(files[0]).column("request_id").to_pylist() == ["a"]


def test_live_spool_of_another_process_is_not_recovered(tmp_path):
    spec = load_spec(LOANS_SPEC)
    _, live = _log(tmp_path, spec)
    live.append(_batch(spec, ["a"], [datetime(2026, 3, 1, tzinfo=UTC)]))
    live.flush()
    _, other = _log(tmp_path, spec)
    assert other.recover() == 0
    assert live.seal() == 1


def test_unwritable_spool_refuses_rows(tmp_path):
    spec = load_spec(LOANS_SPEC)
    lake = Lake(str(tmp_path / "lake"))
    blocker = tmp_path / "spool"
    blocker.write_text("a file where the spool directory should be")
    log = SegmentLog("predictions", prediction_schema(spec), blocker, lake, PREDICTIONS, (spec.event_time,))
    log.append(_batch(spec, ["a"], [None]))
    with pytest.raises(LogUnavailable):
        log.flush()
    with pytest.raises(LogUnavailable, match="not writable"):
        log.append(_batch(spec, ["b"], [None]))


class CountingLog(SegmentLog):
    """A real SegmentLog that counts its group commits (spool write + fsync)."""

    commits = 0

    def _commit_quietly(self) -> None:
        type(self).commits += 1
        super()._commit_quietly()


@pytest.mark.parametrize(("delay", "expected_commits"), [(0.3, 2), (0.0, 3)])
def test_group_commit_waits_for_company_only_when_others_are_writing(tmp_path, delay, expected_commits):
    """A lone request commits at once. Once a commit has carried several requests, the next waits
    `commit_delay_s`, and a request arriving meanwhile shares its fsync (without the delay it needs its own)."""
    import asyncio
    import time

    spec = load_spec(LOANS_SPEC)
    lake = Lake(str(tmp_path / "lake"))
    log = CountingLog("predictions", prediction_schema(spec), tmp_path / "spool", lake, PREDICTIONS,
                      (spec.event_time, "served_at"), durability="group", commit_delay_s=delay)
    CountingLog.commits = 0
    now = datetime(2026, 3, 1, tzinfo=UTC)

    async def request(ids: list[str], after: float = 0.0, requests: int = 1) -> float:
        await asyncio.sleep(after)
        batch = _batch(spec, ids, [now] * len(ids))
        seq = log.append_columns(batch.to_pydict(), batch.num_rows, requests)
        start = time.monotonic()
        await log.durable(seq)
        return time.monotonic() - start

    async def scenario() -> float:
        lone = await request(["a"])  # nobody else writes: no delay
        await request(["b", "c"], requests=2)  # one micro-batch of two requests: now others are writing
        await asyncio.gather(request(["d"]), request(["e"], after=0.1))
        return lone

    lone = asyncio.run(scenario())
    assert lone < 0.25 and CountingLog.commits == 2 + expected_commits - 1
    log.flush()
    assert read_spool(log._spool.path, log.schema).num_rows == 5
