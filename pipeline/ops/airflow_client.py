"""A small client for Airflow's REST API v2: how the demo and the tests drive the real scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import httpx

from pipeline.poll import wait_until


@dataclass
class AirflowClient:
    url: str
    user: str
    password: str

    def __post_init__(self) -> None:
        self._http = httpx.Client(base_url=self.url, timeout=30)
        self._token: str | None = None

    def _headers(self) -> dict[str, str]:
        if self._token is None:
            r = self._http.post("/auth/token", json={"username": self.user, "password": self.password})
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return {"Authorization": f"Bearer {self._token}"}

    def request(self, method: str, path: str, headers: dict[str, str] | None = None, **kw) -> httpx.Response:
        r = self._http.request(method, path, headers={**self._headers(), **(headers or {})}, **kw)
        if r.status_code == 401:
            self._token = None
            r = self._http.request(method, path, headers={**self._headers(), **(headers or {})}, **kw)
        return r

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        def parsed() -> bool | None:
            if self.request("GET", f"/api/v2/dags/{dag_id}").status_code == 200:
                return True
            errors = self.request("GET", "/api/v2/importErrors").json().get("import_errors", [])
            if errors:
                raise RuntimeError(f"DAG files failed to import: {errors}")
            return None

        wait_until(parsed, timeout, 1, lambda: RuntimeError(
            f"DAG {dag_id} not parsed within {timeout}s and no import error reported"))

    def unpause(self, dag_id: str) -> None:
        self.request("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()

    def trigger(self, dag_id: str, day: date, run_id: str | None = None) -> str:
        body = {"logical_date": f"{day.isoformat()}T00:00:00Z", "conf": {}}
        if run_id:
            body["dag_run_id"] = run_id
        r = self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)
        if r.status_code == 409:
            raise RuntimeError(f"a run of {dag_id} for {day} already exists; clear it in the UI to re-run")
        r.raise_for_status()
        return r.json()["dag_run_id"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 900) -> str:
        def finished() -> str | None:
            state = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()["state"]
            return state if state in ("success", "failed") else None

        return wait_until(finished, timeout, 2, lambda: TimeoutError(
            f"run {run_id} of {dag_id} did not finish within {timeout}s"))

    def partition_run(self, dag_id: str, partition_key: str, timeout: float = 300) -> str:
        """The run an asset partition event created (a partitioned DAG's run is keyed by the partition, not
        by a logical date); waits until the scheduler has created it."""
        def created() -> str | None:
            r = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns", params={"limit": 100})
            r.raise_for_status()
            runs = [run for run in r.json()["dag_runs"] if run.get("partition_key") == partition_key]
            return runs[0]["dag_run_id"] if runs else None

        return wait_until(created, timeout, 2, lambda: TimeoutError(
            f"no run of {dag_id} for partition {partition_key} within {timeout}s"))

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        r = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        r.raise_for_status()
        return {ti["task_id"]: ti["state"] for ti in r.json()["task_instances"]}

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> object:
        r = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/"
                                "return_value")
        r.raise_for_status()
        return r.json()["value"]
