"""A broken or garbage model never serves: partly-NaN and digest-less versions are refused, and a server that
starts on a broken champion falls back to an earlier champion."""

from __future__ import annotations

import time

import httpx
import mlflow
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from pipeline import registry
from pipeline.ops import stack
from pipeline.tags import Alias, Tag
from tests.chaos.conftest import rows, serve
from tests.helpers import free_port, make_settings

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.integration]


def partly_nan_version(rt, workdir) -> tuple[str, str, str]:
    """Register a copy of the champion whose weights are NaN only in one real category's embedding row;
    returns (version, feature, value)."""
    client = rt.client()
    champ = registry.get_alias(client, rt.model_name, Alias.CHAMPION)
    bundle = registry.load_version(client, rt.model_name, champ.version, rt.cache_dir)
    j = max(range(len(bundle.categorical)), key=lambda k: len(bundle.vocabs[bundle.categorical[k]].ids))
    feature = bundle.categorical[j]
    value, idx = sorted(bundle.vocabs[feature].ids.items())[-1]
    with torch.no_grad():
        bundle.net.embeddings[j].weight[idx] = float("nan")
    with mlflow.start_run(run_name="partly-nan") as run:
        registry.log_bundle(bundle, rt.spec, workdir)
    return registry.register(client, rt.model_name, run.info.run_id, {Tag.GATE_PASSED: "true"}).version, \
        feature, value


def digestless_version(rt) -> str:
    """The champion's model registered again by hand, without the artifact digest tag."""
    client = rt.client()
    champ = registry.get_alias(client, rt.model_name, Alias.CHAMPION)
    tags = client.get_run(champ.run_id).data.tags
    return str(client.create_model_version(rt.model_name, tags[Tag.MODEL_URI], run_id=champ.run_id,
                                           model_id=tags[Tag.MODEL_ID]).version)


def wait_refused(url: str, version: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/health").json()
        if health["last_error"] and f"v{version}" in health["last_error"]:
            return health
        assert time.monotonic() < deadline, f"v{version} was never tried: {health}"
        time.sleep(0.2)


def test_partly_nan_and_digestless_versions_are_refused(tmp_path, mlflow_server, champion):
    base, rt = champion
    client = rt.client()
    good = registry.get_alias(client, rt.model_name, Alias.CHAMPION).version
    nan_version, feature, value = partly_nan_version(rt, tmp_path)
    digestless = digestless_version(rt)
    s = make_settings(tmp_path / "home", mlflow_server[1], model_name=base.model_name, serving_port=free_port())
    url = serve(s)
    try:
        client.set_registered_model_alias(rt.model_name, Alias.CHAMPION, nan_version)
        health = wait_refused(url, nan_version)
        assert health["model_version"] == good
        assert "warm-up predictions invalid" in health["last_error"] and "not finite" in health["last_error"]
        row = {**rows(1)[0], feature: value}
        r = httpx.post(f"{url}/predict", json={"rows": [row]})
        assert r.status_code == 200 and r.json()["model_version"] == good
        assert all(isinstance(x, float) for x in r.json()["scores"]), r.text

        client.set_registered_model_alias(rt.model_name, Alias.CHAMPION, digestless)
        health = wait_refused(url, digestless)
        assert health["model_version"] == good
        assert "artifact digest" in health["last_error"] and "refusing" in health["last_error"], health
        failed = [x.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
                  for x in f.samples if x.name == "flywheel_model_reloads_total"
                  and x.labels == {"alias": "champion", "outcome": "load_failed"}]
        assert failed and failed[0] >= 2, failed
    finally:
        client.set_registered_model_alias(rt.model_name, Alias.CHAMPION, good)
        stack.stop_all(s)


def test_broken_champion_on_restart_falls_back_to_an_earlier_champion(tmp_path, mlflow_server, champion):
    base, rt = champion
    client = rt.client()
    good = registry.get_alias(client, rt.model_name, Alias.CHAMPION).version
    broken, _, _ = partly_nan_version(rt, tmp_path)
    registry.move_champion(client, rt.model_name, broken, expected=good, owner="chaos-test")
    s = make_settings(tmp_path / "home", mlflow_server[1], model_name=base.model_name, serving_port=free_port())
    try:
        url = serve(s)
        health = httpx.get(f"{url}/health").json()
        assert health["model_version"] == good and health["fallback_from"] == broken, health
        assert health["status"] == "degraded" and f"v{broken}" in health["last_error"], health
        assert "fallback" in health["last_error"] and "warm-up predictions invalid" in health["last_error"], health
        assert 'outcome="fallback"' in httpx.get(f"{url}/metrics").text
        r = httpx.post(f"{url}/predict", json={"rows": rows(2)})
        assert r.status_code == 200 and r.json()["model_version"] == good
        client.set_registered_model_alias(rt.model_name, Alias.CHAMPION, good)  # still polling the alias
        deadline = time.monotonic() + 20
        while (health := httpx.get(f"{url}/health").json())["fallback_from"] is not None or health["last_error"]:
            assert time.monotonic() < deadline, "the fallback never ended after the champion was repaired"
            time.sleep(0.2)
    finally:
        client.set_registered_model_alias(rt.model_name, Alias.CHAMPION, good)
        stack.stop_all(s)
