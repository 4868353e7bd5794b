"""The backtest loop: a scratch home on embedded defaults (its own MLflow and model server on free ports),
bootstrap from the history, then per period: rows through the server (test-then-train: the loop is scored by
what /predict answered), labels through /feedback, the online evaluation as the hourly DAG runs it once the
period's traffic is sealed (it rolls back a champion that did worse than `previous` on the rows it served,
as the product does unless `schedules.online_eval` is `none`), the nightly through `pipeline.stages.nightly` (the code the
DAG runs, one task per stage there) or, with `airflow`, as a run of the nightly DAG on the scratch home's own
Airflow (scheduler, api-server, SQLite), and the references trained on the labels known before the period."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline import registry
from pipeline.backtest import data as bt_data
from pipeline.backtest.references import GradientBoosted, scratch_model
from pipeline.backtest.replay import send_period
from pipeline.backtest.store import Store
from pipeline.checks.metrics import auc, ece, logloss, scores_valid
from pipeline.config import Settings, get_settings
from pipeline.errors import GateFailed, NoDataError, StageError
from pipeline.poll import wait_until
from pipeline.runtime import Runtime, runtime
from pipeline.stages.collect import flush_server

MODELS = ("loop", "frozen", "scratch", "hgb_all", "hgb_last")


class BacktestOptions(BaseModel):
    spec: Path
    history: Path
    stream: Path
    home: Path
    period: str = "1d"
    label_delay: timedelta = timedelta(0)
    label_time: str | None = None
    max_periods: int | None = None
    retrain_every: int = 1
    last_k: int = 3
    airflow: bool = False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scratch_settings(opts: BacktestOptions) -> Settings:
    """The embedded defaults in a home of its own: every backend local, free ports, no schedule. Loop settings
    (epochs, gates, ...) still follow FLYWHEEL_* variables, so a user can backtest the configuration they run."""
    mlflow_port = _free_port()
    return Settings(home=opts.home.resolve(), spec_path=opts.spec.resolve(), lake_uri=None, model_name=None,
                    mlflow_port=mlflow_port, mlflow_tracking_uri=f"http://127.0.0.1:{mlflow_port}",
                    serving_port=_free_port(), serving_host="127.0.0.1", serving_url=None, schedule="none",
                    airflow_port=(port := _free_port()), airflow_url=f"http://127.0.0.1:{port}",
                    airflow_db_uri=None, mlflow_backend_uri=None, mlflow_artifacts_uri=None, s3_endpoint_url=None,
                    mlflow_auth=False, online_store_uri=None, training_runner="local", canary_share=0.0,
                    promotion_mode="auto", api_tokens=[], log_seal_interval_s=3600.0)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def metrics(y: np.ndarray, p: np.ndarray, bins: int) -> dict[str, float | None]:
    if not scores_valid(p):
        return {"auc": None, "logloss": None, "ece": None}
    return {"auc": auc(y, p), "logloss": logloss(y, p), "ece": ece(y, p, bins)}


def gate_outcome(out: dict) -> dict:
    """What the night decided, from `run_nightly`'s result (read defensively: other fields may be added)."""
    ev, prom, tr = out.get("evaluate") or {}, out.get("promote") or {}, out.get("train") or {}
    if "run_id" not in tr:  # nothing to train yet (a small day waits until the days since the champion's add up)
        return {"outcome": "not trained", "reason": tr.get("skipped", ""), "trained": False, "candidate": None}
    return {"outcome": "promoted" if prom.get("promoted") else "held", "reason": ev.get("reason") or
            prom.get("reason", ""), "trained": True, "candidate": (out.get("register") or {}).get("version")}


def run_nightly_for(day, rt: Runtime) -> tuple[dict, float]:
    from pipeline.stages.nightly import run_nightly

    start = time.monotonic()
    try:
        result = gate_outcome(run_nightly(day, rt, rollout=True))
    except (GateFailed, NoDataError) as e:
        result = {"outcome": "validation failed" if isinstance(e, GateFailed) else "no data", "reason": str(e),
                  "trained": False, "candidate": None}
    except StageError as e:
        result = {"outcome": f"stopped ({type(e).__name__})", "reason": str(e), "trained": None, "candidate": None}
    return result, round(time.monotonic() - start, 3)


NIGHTLY_DAG = "flywheel_nightly"
ONLINE_EVAL_DAG = "flywheel_online_eval"


def online_outcome(out: dict) -> dict:
    """What the online evaluation decided, from `online_eval`'s result."""
    rolled = out.get("decision") == "rolled_back"
    return {"decision": out.get("decision"), "reason": out.get("reason", ""),
            "rolled_back": out.get("champion") if rolled else None}


def online_enabled(s: Settings) -> bool:
    """The product runs the online evaluation on its own schedule unless that is `none`; so does a backtest."""
    return s.schedules.runs(s.schedules.online_eval)


def run_online_eval_for(day, rt: Runtime) -> dict:
    from pipeline.release.online_eval import online_eval

    try:
        return online_outcome(online_eval(day, rt).model_dump())
    except StageError as e:
        return {"decision": f"stopped ({type(e).__name__})", "reason": str(e), "rolled_back": None}


class AirflowNights:
    """The nightly as a run of the nightly DAG per logical date, through the real scheduler: the outcome is read
    from the stage tasks' XComs (the same results `run_nightly` returns) and, when a run fails, from its note.
    A run already there for the day (a resumed backtest) is waited for and read, not triggered again."""

    def __init__(self, s: Settings) -> None:
        from pipeline.ops import stack
        from pipeline.ops.airflow_client import AirflowClient

        stack.start_airflow(s)
        self.af = AirflowClient(s.airflow_url, s.airflow_user, stack.airflow_password(s))
        for dag_id in (NIGHTLY_DAG, *((ONLINE_EVAL_DAG,) if online_enabled(s) else ())):
            self.af.wait_for_dag(dag_id, timeout=s.service_start_timeout_s)
            self.af.unpause(dag_id)

    def _run(self, dag_id: str, day, timeout: float) -> tuple[str, str, dict[str, str | None]]:
        """The day's run of `dag_id`, triggered unless a resumed backtest finds it there, once it finished:
        its run id, state and task states."""
        af, run_id = self.af, f"backtest__{day.isoformat()}"
        if af.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").status_code == 404:
            af.trigger(dag_id, day, run_id)
        state = af.wait_run(dag_id, run_id, timeout=timeout)
        return run_id, state, af.task_states(dag_id, run_id)

    def online(self, day) -> dict:
        """The hourly online evaluation's run for the day, triggered once the day's traffic is sealed."""
        run_id, state, states = self._run(ONLINE_EVAL_DAG, day, timeout=3600)
        if states.get("online_eval") != "success":
            return {"decision": f"stopped (DAG run {state})", "reason": f"{ONLINE_EVAL_DAG} run {run_id} {state}",
                    "rolled_back": None}
        return online_outcome(self.af.xcom(ONLINE_EVAL_DAG, run_id, "online_eval"))

    def _note(self, run_id: str) -> str:
        return self.af.request("GET", f"/api/v2/dags/{NIGHTLY_DAG}/dagRuns/{run_id}").json().get("note") or ""

    def __call__(self, day) -> tuple[dict, float]:
        af, start = self.af, time.monotonic()
        run_id, state, states = self._run(NIGHTLY_DAG, day, timeout=4 * 3600)
        out = {name: af.xcom(NIGHTLY_DAG, run_id, name) for name in ("train", "evaluate", "register", "promote")
               if states.get(name) == "success"}
        if state == "success" and states.get("train") != "skipped":
            result = gate_outcome(out)
        elif state == "success":  # nothing to train tonight: the run's note says why
            result = gate_outcome({"train": {"skipped": self._note(run_id)}})
        else:
            note = self._note(run_id)
            failed = sorted(name for name, st in states.items() if st == "failed")
            outcome = "validation failed" if states.get("validate") == "failed" else f"stopped ({', '.join(failed)})"
            result = {"outcome": outcome, "reason": note or f"DAG run {run_id} {state}",
                      "trained": states.get("train") == "success", "candidate": (out.get("register") or {}).get(
                          "version")}
        return result | {"dag_run": run_id}, round(time.monotonic() - start, 3)


class Backtest:
    """One backtest in one home; `run` may be called again after an interruption and skips finished periods."""

    def __init__(self, opts: BacktestOptions, console: Console | None = None) -> None:
        self.opts, self.console = opts, console or Console(stderr=True)
        self.s = scratch_settings(opts)
        os.environ.update({k: v for k, v in _settings_env(self.s).items()})
        get_settings.cache_clear()
        self.rt = runtime(self.s)
        self.store = Store(self.s.home_abs / "backtest")
        self.scratch: tuple[int, object] | None = None
        self.is_day = True
        self.nightly = lambda day: run_nightly_for(day, self.rt)
        self.online = lambda day: run_online_eval_for(day, self.rt)

    def inputs(self) -> bt_data.Inputs:
        o = self.opts
        self.store.check_inputs({"spec": _digest(o.spec), "history": _digest(o.history), "stream": _digest(o.stream),
                                 "period": o.period, "label_delay_s": o.label_delay.total_seconds(),
                                 "label_time": o.label_time, "last_k": o.last_k, "retrain_every": o.retrain_every})
        return bt_data.load(self.rt.spec, o.history, o.stream, o.period, o.label_time, o.label_delay)

    def run(self) -> list[dict]:
        from pipeline.ops import stack

        inputs = self.inputs()
        self.is_day = inputs.periods.is_day
        ks = sorted(int(k) for k in inputs.stream[bt_data.PERIOD].unique())[: self.opts.max_periods]
        stack.stop_all(self.s)
        signal.signal(signal.SIGTERM, _exit_on_term)  # so `finally` stops the processes this run started
        try:
            with self.console.status("starting MLflow"):
                _start_mlflow(self.s)
            boot = self.bootstrap(inputs)
            with self.console.status("starting the model server"):
                stack.start_server(self.s)
                _wait_serving(self.s, boot["version"])
            if self.opts.airflow:
                with self.console.status("starting Airflow (each night is a run of the nightly DAG)"):
                    self.nightly = AirflowNights(self.s)
                    self.online = self.nightly.online
            frozen = registry.load_version(self.rt.client(), self.rt.model_name, boot["version"], self.rt.cache_dir)
            self.periods(inputs, ks, frozen)
        finally:
            stack.stop_all(self.s)
        return [self.store.result(k) for k in ks]

    def bootstrap(self, inputs: bt_data.Inputs) -> dict:
        from pipeline.stages.bootstrap import bootstrap

        done = self.store.read_json("bootstrap.json")
        if done:
            return done
        path = self.s.home_abs / "backtest" / "history.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        spec = self.rt.spec
        inputs.history[[*spec.feature_names, spec.event_time, spec.label.name]].to_parquet(path, index=False)
        with self.console.status(f"bootstrapping from {len(inputs.history)} history rows"):
            start = time.monotonic()
            result = bootstrap(path, self.rt).model_dump()
        result["seconds"] = round(time.monotonic() - start, 3)
        self.store.write_json("bootstrap.json", result)
        return result

    def periods(self, inputs: bt_data.Inputs, ks: list[int], frozen) -> None:
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            task = progress.add_task("backtest", total=len(ks))
            for i, k in enumerate(ks):
                if self.store.result(k) is None:
                    self.period(inputs, i, k, frozen, lambda what, k=k: progress.update(
                        task, description=f"period {k} ({inputs.periods.logical_date(k)}): {what}"))
                    r = self.store.result(k)
                    self.console.print(_line(r))
                progress.advance(task)

    def period(self, inputs: bt_data.Inputs, i: int, k: int, frozen, status) -> None:
        spec, s = self.rt.spec, self.s
        live = inputs.stream
        rows = live[live[bt_data.PERIOD] == k].reset_index(drop=True)
        day = inputs.periods.logical_date(k)
        served = self.store.served(k)
        if served is None:
            status(f"sending {len(rows)} rows")
            served = send_period(s.resolved_serving_url(), rows, spec.feature_names, spec.event_time,
                                 spec.label.name, bt_data.LABEL_TIME, f"bt-p{k:05d}")
            self.store.save_served(k, served)
        online = self.store.read_json(f"online-{k:05d}.json")
        if online is None:
            online = {"decision": "off", "reason": "schedules.online_eval is none", "rolled_back": None}
            if online_enabled(s):
                status("online evaluation")
                # the server seals every few seconds on its own; a busy machine's 503 is retried
                flush_server(s.resolved_serving_url(), s.resolved_admin_token(), attempts=6)
                online = self.online(day)
            self.store.write_json(f"online-{k:05d}.json", online)
        status("nightly")
        night, seconds = self.nightly(day)
        status("references")
        scores = {"loop": served["score"].to_numpy(dtype=np.float64), "frozen": frozen.predict(rows),
                  **self.references(inputs, i, k, rows)}
        y = rows[spec.label.name].to_numpy(dtype=np.float64)
        champion = registry.get_alias(self.rt.client(), self.rt.model_name, "champion")
        from pipeline.stages.nightly import loop_health

        health = loop_health(day, self.rt)  # what the night's last task said, re-read from the registry and lake
        versions = Counter(served["model_version"].astype(str))
        start_real = rows[bt_data.REAL_TIME].min()
        result = {"period": k, "logical_date": day.isoformat(), "period_start": str(start_real), "rows": len(rows),
                  "positives": int(y.sum()), "served_version": ",".join(v for v, _ in versions.most_common()),
                  "gate": night["outcome"], "gate_reason": night["reason"], "trained": night["trained"],
                  "candidate": night["candidate"], "champion_after": champion.version if champion else None,
                  "nightly_s": seconds, "scratch_from_period": self.scratch[0] if self.scratch else None,
                  "dag_run": night.get("dag_run"), "online_eval": online["decision"],
                  "online_eval_reason": online["reason"], "rolled_back": online["rolled_back"],
                  "loop_health": health.status, "waiting_rows": health.waiting_rows}
        for name, p in scores.items():
            result |= {f"{name}_{m}": v for m, v in metrics(y, p, s.gate.ece_bins).items()}
        self.store.save_result(k, result)

    def references(self, inputs: bt_data.Inputs, i: int, k: int, rows: pd.DataFrame) -> dict[str, np.ndarray]:
        spec, s = self.rt.spec, self.s
        live = inputs.stream
        start = rows[bt_data.REAL_TIME].min()
        known = live[(live[bt_data.PERIOD] < k) & (live[bt_data.REAL_LABEL_TIME] < start)]
        cols = [*spec.feature_names, spec.event_time, spec.label.name, bt_data.PERIOD]
        train = pd.concat([inputs.history[cols], known[cols]], ignore_index=True)
        if self.scratch is None or i % self.opts.retrain_every == 0:
            self.scratch = (k, scratch_model(spec, train, s))
        recent = train[train[bt_data.PERIOD] >= k - self.opts.last_k]
        return {"scratch": self.scratch[1].predict(rows),
                "hgb_all": GradientBoosted(spec, s.seed).fit(train).predict(rows),
                "hgb_last": GradientBoosted(spec, s.seed).fit(recent if len(recent) else train).predict(rows)}


def _start_mlflow(s: Settings) -> None:
    """One retry: on a loaded machine a first start can miss the stack's health deadline."""
    from pipeline.ops import stack

    try:
        stack.start_mlflow(s)
    except RuntimeError:
        stack.stop_all(s)
        stack.start_mlflow(s)


def _exit_on_term(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _settings_env(s: Settings) -> dict[str, str]:
    from pipeline.ops.stack import settings_env

    return settings_env(s)


def _wait_serving(s: Settings, version: str, timeout: float = 60) -> None:
    from pipeline.stages.promote import served_version

    wait_until(lambda: served_version(s.resolved_serving_url()), timeout, 0.5, lambda: StageError(
        f"the backtest's model server never loaded a champion (v{version}); see {s.run_dir / 'serving.log'}"))


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _line(r: dict) -> str:
    return (f"period {r['period']} ({r['logical_date']}): {r['rows']} rows, served v{r['served_version']}, AUC loop "
            f"{_fmt(r['loop_auc'])} frozen {_fmt(r['frozen_auc'])} scratch {_fmt(r['scratch_auc'])} hgb "
            f"{_fmt(r['hgb_all_auc'])}/{_fmt(r['hgb_last_auc'])}; {r['gate']} ({r['nightly_s']:.1f} s)"
            + (f"; v{r['rolled_back']} rolled back by the online evaluation" if r.get("rolled_back") else ""))
