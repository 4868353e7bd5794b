"""SIGKILL under concurrent load, in the default (group commit) durability: every answered row is logged once."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections import Counter

import httpx
import pyarrow.parquet as pq
import pytest

from feature_store.log_schema import PREDICTIONS
from pipeline.ops import stack
from tests.chaos.conftest import rows, serve
from tests.helpers import free_port, make_settings

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]


def logged_rows(s, stream: str = PREDICTIONS) -> Counter:
    files = sorted((s.home_abs / "lake" / stream).rglob("*.parquet"))
    return Counter(rid for f in files for rid in pq.read_table(f).column("request_id").to_pylist())


async def hammer(url: str, stop: threading.Event, sent: set, answered: dict, clients: int = 16,
                 path: str = "/predict") -> None:
    """`clients` concurrent connections posting 1-3 rows with their own request ids until stopped or the server
    is gone. One client (creating one is slow: an SSL context each) with a connection per concurrent request."""
    body_rows = rows(3)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def one(h: httpx.AsyncClient, k: int) -> None:
        i = 0
        while not stop.is_set():
            rid, n = f"c{k}-{i}-{uuid.uuid4().hex[:6]}", 1 + i % 3
            i += 1
            sent.add(rid)
            try:
                r = await h.post(path, json={"request_id": rid, "rows": body_rows[:n]})
            except httpx.HTTPError:
                return
            if r.status_code == 200:
                answered[rid] = n

    async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as h:
        await asyncio.gather(*(one(h, k) for k in range(clients)))


def test_sigkill_under_concurrent_load_loses_no_answered_row(tmp_path, mlflow_server, champion):
    base, _ = champion
    s = make_settings(tmp_path / "home", mlflow_server[1], model_name=base.model_name, serving_port=free_port(),
                      log_flush_interval_ms=1000)  # a long interval: only group commit can make answers durable
    assert s.prediction_log.durability == "group", "durable-before-answer is the default"
    url = serve(s)
    sent: set[str] = set()
    answered: dict[str, int] = {}
    stop = threading.Event()
    load = threading.Thread(target=lambda: asyncio.run(hammer(url, stop, sent, answered)))
    load.start()
    try:
        deadline = time.monotonic() + 60
        while len(answered) < 150 and time.monotonic() < deadline and load.is_alive():
            time.sleep(0.1)
        pid = int((s.run_dir / "serving.pid").read_text())
        os.killpg(pid, signal.SIGKILL)
    finally:
        stop.set()
        load.join(timeout=30)
    (s.run_dir / "serving.pid").unlink()
    assert len(answered) >= 150, f"too little load to prove anything: {len(answered)} answered"
    assert list(s.spool_dir.glob("predictions-*.arrows")), "the dead process's spool holds its rows"
    serve(s)  # recovery seals the dead process's spool
    stack.stop_all(s)
    logged = logged_rows(s)
    lost = [rid for rid in answered if rid not in logged]
    assert not lost, f"{len(lost)} of {len(answered)} answered requests lost, e.g. {lost[:3]}"
    wrong = {rid: (logged[rid], n) for rid, n in answered.items() if logged[rid] != n}
    assert not wrong, f"rows logged != rows answered (duplicates or partial): {list(wrong.items())[:3]}"
    assert set(logged) <= sent, "nothing logged that was never sent"
    unanswered = set(logged) - set(answered)
    assert len(unanswered) <= 16, "only requests in flight at the kill may be logged without an answer"
