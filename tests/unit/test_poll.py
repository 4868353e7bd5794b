"""The one poll-until-ready helper, and `wait_http` (the stack's start-up wait) on it against real sockets and
real processes: ready is returned, time up raises the caller's error, a dead process ends the wait at once."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pipeline.ops.stack import wait_http
from pipeline.poll import wait_until
from tests.helpers import free_port


def test_returns_the_first_ready_value_after_polling_at_the_interval():
    calls: list[float] = []

    def ready_on_third() -> str | None:
        calls.append(time.monotonic())
        return "v3" if len(calls) == 3 else None

    assert wait_until(ready_on_third, timeout=5, interval=0.1) == "v3"
    assert len(calls) == 3 and calls[2] - calls[0] >= 0.2


def test_time_up_raises_the_callers_error_built_then_or_returns_none_without_one():
    seen: list[int] = []

    def never() -> None:
        seen.append(len(seen))

    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"after \d+ looks"):
        wait_until(never, timeout=0.5, interval=0.1, timeout_error=lambda: TimeoutError(f"after {len(seen)} looks"))
    assert 0.4 <= time.monotonic() - start < 2 and 4 <= len(seen) <= 6
    assert wait_until(lambda: None, timeout=0.2, interval=0.05) is None


def test_an_exception_from_the_check_ends_the_wait_at_once():
    calls = []

    def dead() -> None:
        calls.append(1)
        raise RuntimeError("the process exited")

    with pytest.raises(RuntimeError, match="the process exited"):
        wait_until(dead, timeout=30, interval=1)
    assert calls == [1]


def test_wait_http_returns_when_a_real_server_answers_and_names_what_failed_otherwise(tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/", 30, "http.server", pid=server.pid)
    finally:
        server.terminate()
        server.wait()
    with pytest.raises(RuntimeError, match=rf"nothing did not become healthy at http://127.0.0.1:{port}/ within 1s"):
        wait_http(f"http://127.0.0.1:{port}/", 1, "nothing")
    log = tmp_path / "svc.log"
    log.write_text("boot\nfatal: port in use\n")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"(?s)\(the process {gone.pid} exited\)\nboot\nfatal: port in use"):
        wait_http(f"http://127.0.0.1:{port}/", 30, "svc", log, gone.pid)
    assert time.monotonic() - start < 5
