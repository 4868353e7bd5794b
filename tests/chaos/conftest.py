"""A registered champion shared by the chaos tests; each test runs its own server process in its own home."""

from __future__ import annotations

import time

import httpx
import pytest

from feature_store.spec import load_spec
from pipeline.config import DEFAULT_SPEC
from pipeline.demo.simulate import Simulator
from pipeline.ops import stack
from tests.helpers import bootstrapped_home

CTR = load_spec(DEFAULT_SPEC)
SIM = Simulator(seed=11, rows_per_day=600, horizon_days=10)


@pytest.fixture(scope="session")
def champion(tmp_path_factory, mlflow_server):
    """(settings, runtime) of a home whose model name has a bootstrapped champion, version 1."""
    return bootstrapped_home(tmp_path_factory.mktemp("chaos-home"), mlflow_server[1], "chaos", SIM.history(3))


def rows(n: int, day: int = 3) -> list[dict]:
    frame = SIM.day(day).head(n)
    out = frame[CTR.feature_names].to_dict(orient="records")
    for r, t in zip(out, frame.event_time, strict=True):
        r["event_time"] = t.isoformat()
    return out


def serve(s, timeout: float = 300, ready: str = "/health") -> str:
    """Start the real server process for `s` and wait until it serves a model; returns its URL. Waits longer than
    `stack.start_server` does: on a loaded CI machine each worker's imports alone can take a minute."""
    try:
        stack.start_server(s)
    except RuntimeError:
        pass  # not healthy within start_server's wait; the process runs on, waited for below
    url = s.resolved_serving_url()
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health").json()["model_version"] is not None:
                return url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"server never loaded a model: {(s.run_dir / 'serving.log').read_text()[-3000:]}"
        time.sleep(0.5)


def admin(s) -> dict:
    return {"Authorization": f"Bearer {s.resolved_admin_token()}"}
