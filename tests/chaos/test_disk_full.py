"""The server's home on a small tmpfs: traffic until the disk is full, then space returned. Every answered
prediction and every accepted feedback item is logged exactly once, sealed by the running server."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections import Counter

import httpx
import pyarrow.parquet as pq
import pytest

from feature_store.log_schema import FEEDBACK, PREDICTIONS
from pipeline.ops import stack
from tests.chaos.conftest import admin, rows, serve
from tests.helpers import free_port, make_settings

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]


def lake_keys(s, stream: str) -> Counter:
    files = sorted((s.home_abs / "lake" / stream).rglob("*.parquet"))
    return Counter((rid, row) for f in files
                   for rid, row in zip(*pq.read_table(f, columns=["request_id", "row"]).to_pydict().values(),
                                       strict=True))


def fill(path) -> None:
    """Take every free byte of the file system (large writes, then pages)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 20, 1 << 16, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)


@pytest.fixture
def tmpfs(tmp_path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"mounting a tmpfs is not permitted here (the chaos suite runs as root in CI): {done.stderr}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_then_space_returned_logs_every_answer_exactly_once(tmpfs, mlflow_server, champion):
    base, _ = champion
    s = make_settings(tmpfs / "home", mlflow_server[1], model_name=base.model_name, serving_port=free_port())
    url = serve(s)
    answered: dict[str, int] = {}
    accepted: set[tuple[str, int]] = set()
    body = rows(2)
    h = httpx.Client(base_url=url, timeout=30)

    def predict(rid: str, n: int) -> int:
        r = h.post("/predict", json={"request_id": rid, "rows": body[:n]})
        assert r.status_code in (200, 503), r.text
        if r.status_code == 200:
            answered[rid] = n
        return r.status_code

    def feedback(items: list[tuple[str, int]]) -> int:
        r = h.post("/feedback", json=[{"request_id": rid, "row": row, "label": 1} for rid, row in items])
        assert r.status_code in (202, 503), r.text
        if r.status_code == 202:
            accepted.update(items)
        return r.status_code

    try:
        for i in range(20):
            assert predict(f"before-{i}", 1 + i % 2) == 200
        assert feedback([(f"before-{i}", 0) for i in range(10)]) == 202
        fill(tmpfs / "filler")
        refused: list[tuple[str, int]] = []
        for i in range(400):  # the spool's last page may still take a few rows
            rid = f"full-{i}-{uuid.uuid4().hex[:6]}"
            if predict(rid, 1 + i % 2) == 503:
                refused.append((rid, 1 + i % 2))
                if len(refused) >= 20:
                    break
        assert len(refused) >= 20, "the full disk never refused a prediction"
        detail = h.post("/predict", json={"rows": body[:1]}).json()["detail"]
        assert "log unavailable" in detail and "No space left" in detail, detail
        health = h.get("/health").json()
        assert health["status"] == "degraded" and health["log"]["predictions"]["error"], health
        assert h.get("/health/ready").status_code == 503
        refused_feedback: list[list[tuple[str, int]]] = []
        for i in range(100):  # feedback rows are small: the spool's last page takes a few batches
            items = [(f"fb-{i}-{k}", 0) for k in range(50)]
            if feedback(items) == 503:
                refused_feedback.append(items)
                if len(refused_feedback) >= 3:
                    break
        assert len(refused_feedback) >= 3, "feedback that cannot be written was accepted"
        assert h.post("/admin/flush", headers=admin(s)).status_code == 503, "sealing onto a full disk fails"

        (tmpfs / "filler").unlink()  # space returned; clients retry what was refused, with the same ids
        deadline = time.monotonic() + 30
        while refused:
            rid, n = refused[0]
            if predict(rid, n) == 200:
                refused.pop(0)
            else:
                assert time.monotonic() < deadline, "predictions never recovered after space returned"
                time.sleep(0.1)
        for items in refused_feedback:
            while feedback(items) != 202:
                assert time.monotonic() < deadline, "feedback never recovered after space returned"
                time.sleep(0.1)
        for i in range(20):
            assert predict(f"after-{i}", 1 + i % 2) == 200
        flushed = h.post("/admin/flush", headers=admin(s))
        assert flushed.status_code == 200, flushed.text
        ok_by = time.monotonic() + 10  # the flusher's next good tick clears the error it reported
        while (health := h.get("/health").json())["status"] != "ok" and time.monotonic() < ok_by:
            time.sleep(0.2)
        assert health["status"] == "ok", health

        predictions = lake_keys(s, PREDICTIONS)  # sealed by the running server: no restart
        expected = Counter({(rid, row): 1 for rid, n in answered.items() for row in range(n)})
        assert predictions == expected, (
            f"lost {sorted(expected - predictions)[:5]}, extra or duplicated {sorted(predictions - expected)[:5]}")
        feedbacks = lake_keys(s, FEEDBACK)
        assert feedbacks == Counter(dict.fromkeys(accepted, 1)), (
            f"feedback logged {sum(feedbacks.values())} times for {len(accepted)} accepted items")
        assert not list(s.spool_dir.glob("*.arrows")), "every spool sealed"
    finally:
        h.close()
        stack.stop_all(s)
        shutil.copy(s.run_dir / "serving.log", tmpfs.parent / "serving.log")  # the tmpfs goes with the test
