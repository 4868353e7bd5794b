"""Shared test builders: settings on free ports in a temp home, and synthetic data for the loans spec."""

from __future__ import annotations

import socket
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import Settings

DATA = Path(__file__).parent / "data"
LOANS_SPEC = DATA / "loans.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_settings(home: Path, mlflow_port: int, **overrides) -> Settings:
    serving_port = overrides.pop("serving_port", free_port())
    return Settings(
        home=home, mlflow_port=mlflow_port, mlflow_tracking_uri=f"http://127.0.0.1:{mlflow_port}",
        serving_port=serving_port, log_seal_interval_s=3600, alias_poll_interval_s=0.5,
        min_rows=overrides.pop("min_rows", 50), **overrides,
    )


def start_server_on_champion(s: Settings, version: str | None = None, timeout: float = 120) -> str:
    """Start the real model server for `s` and wait until it serves `version` (default: whatever the registry's
    champion is now, since other tests in a module may have registered versions); returns its URL."""
    import httpx

    from pipeline import registry
    from pipeline.ops import stack
    from pipeline.runtime import runtime
    from pipeline.tags import Alias

    if version is None:
        version = registry.get_alias(runtime(s).client(), s.model_name, Alias.CHAMPION).version
    stack.start_server(s)
    url = s.resolved_serving_url()
    deadline = time.monotonic() + timeout
    while (health := httpx.get(f"{url}/health").json())["model_version"] != version:
        if time.monotonic() > deadline:
            log = s.run_dir / "serving.log"
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else "(no serving.log)"
            raise AssertionError(f"server never loaded version {version}; /health: {health}\n{tail}")
        time.sleep(0.2)
    return url


def bootstrapped_home(home: Path, mlflow_port: int, prefix: str, history: pd.DataFrame):
    """(settings, runtime) of a home whose own model name has a champion bootstrapped from `history`."""
    from pipeline.runtime import runtime
    from pipeline.stages.bootstrap import bootstrap

    s = make_settings(home, mlflow_port, model_name=f"{prefix}-{home.name}", serving_port=free_port())
    rt = runtime(s)
    history.to_parquet(home / "history.parquet")
    bootstrap(home / "history.parquet", rt)
    return s, rt


def wait_every_worker_ready(url: str, timeout: float, in_a_row: int = 10) -> None:
    """Connections land on either worker, so both must have loaded the model: `in_a_row` ready answers."""
    import httpx

    deadline, ready = time.monotonic() + timeout, 0
    while ready < in_a_row:
        try:
            ready = ready + 1 if httpx.get(f"{url}/health/ready").status_code == 200 else 0
        except httpx.HTTPError:
            ready = 0
        assert time.monotonic() < deadline, "workers never became ready"
        time.sleep(0.1)


def loans_frame(day: date, n: int, seed: int, regions: int = 5) -> pd.DataFrame:
    """Loan applications whose default risk depends on region, amount and income ratio."""
    rng = np.random.default_rng([seed, day.toordinal()])
    region = rng.integers(0, regions, n)
    amount = rng.lognormal(8, 1, n)
    ratio = rng.normal(0.3, 0.1, n)
    logit = -1.5 + 0.4 * (region - 2) + 2.5 * (ratio - 0.3) * 4 + 0.3 * (np.log(amount) - 8)
    start = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    return pd.DataFrame({
        "account_no": [f"acct{x}" for x in rng.integers(0, 300, n)],
        "region": [f"r{x}" for x in region],
        "product": rng.choice(["card", "mortgage", "auto"], n).tolist(),
        "amount": amount,
        "tenure_months": rng.integers(1, 240, n).astype(float),
        "income_ratio": ratio,
        "applied_at": [start + timedelta(seconds=float(s)) for s in np.sort(rng.uniform(0, 86000, n))],
        "defaulted": (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(int),
    })
