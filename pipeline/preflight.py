"""Checks, before a command does any work, that the services it needs answer: a bootstrap that trains for
minutes and then dies on `Connection refused` (after MLflow's own retries) wastes the user's time and names
nothing to do; this fails in seconds and names the fix."""

from __future__ import annotations

import httpx

from pipeline.config import Settings
from pipeline.errors import ServiceUnavailable


def _probe(url: str, timeout: float) -> str | None:
    """None when something answers at `url` (any status below 500), else why not."""
    try:
        r = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as e:
        return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return None if r.status_code < 500 else f"HTTP {r.status_code}"


def start_hint(s: Settings, extra: str = "") -> str:
    return f"flywheel --home {s.home_abs} up{extra}"


def require_mlflow(s: Settings, command: str, timeout: float = 5.0) -> None:
    """MLflow must answer at the tracking URI (a local file or database URI needs no server)."""
    uri = s.mlflow_tracking_uri.rstrip("/")
    if not uri.startswith(("http://", "https://")):
        return
    if why := _probe(f"{uri}/health", timeout):
        raise ServiceUnavailable(
            f"`{command}` needs MLflow, which does not answer at {uri} ({why}): start it with "
            f"`{start_hint(s, ' --no-airflow')}` (MLflow and the model server), or point "
            "FLYWHEEL_MLFLOW_TRACKING_URI at your MLflow server")


def model_server_down(s: Settings, timeout: float = 3.0) -> str | None:
    """None when the model server answers its /health, else a sentence saying it does not and why."""
    url = s.resolved_serving_url()
    why = _probe(f"{url}/health", timeout)
    return f"no model server answers at {url} ({why})" if why else None
