"""Several server workers, one /metrics: a scrape after traffic through both workers counts every request."""

from __future__ import annotations

import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.ops import stack
from tests.chaos.conftest import rows, serve
from tests.helpers import free_port, make_settings, wait_every_worker_ready

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]


def counted(url: str) -> float:
    return sum(x.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
               for x in f.samples if x.name == "flywheel_requests_total"
               and x.labels == {"route": "/predict", "status": "200"})


def test_a_scrape_counts_the_requests_of_every_worker(tmp_path, mlflow_server, champion):
    base, _ = champion
    s = make_settings(tmp_path / "home", mlflow_server[1], model_name=base.model_name, serving_port=free_port(),
                      serving_workers=2)
    url = serve(s)
    try:
        wait_every_worker_ready(url, 180)
        body = {"rows": rows(1)}
        sent = 0
        pids: set[str] = set()
        while sent < 40 or len(pids) < 2:  # a fresh connection each: the kernel spreads them over the workers
            assert httpx.post(f"{url}/predict", json=body).status_code == 200
            sent += 1
            pids = {re.match(r"predictions-(\d+)-", p.name).group(1) for p in s.spool_dir.glob("predictions-*")}
            assert sent < 400, "every request landed on one worker"
        assert (s.metrics_dir).is_dir() and any(s.metrics_dir.iterdir()), "workers write their values there"
        for _ in range(5):  # whichever worker answers the scrape, it counts both workers' requests
            assert counted(url) == sent
    finally:
        stack.stop_all(s)
