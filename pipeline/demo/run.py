"""`make demo`: the whole loop on embedded defaults, driven only through public interfaces — bootstrap from a
Parquet file, traffic and feedback over HTTP, one nightly DAG run per simulated day through Airflow's REST API,
promotion and hot reload observed on the server."""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass

import httpx
import numpy as np
from rich.table import Table

from pipeline import registry
from pipeline.checks.metrics import auc, logloss
from pipeline.config import get_settings
from pipeline.logs import console as shared_console
from pipeline.ops import stack
from pipeline.ops.airflow_client import AirflowClient
from pipeline.runtime import runtime
from pipeline.tags import Alias

DAG_ID = "flywheel_nightly"


@dataclass
class DayRow:
    day: str
    served_versions: str
    rows: int
    loop_auc: float | None
    frozen_auc: float | None
    loop_logloss: float
    frozen_logloss: float
    dag_state: str
    champion_after: str | None
    promoted: bool


def _report(rows: list[DayRow], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    x = [r.day[5:] for r in rows]
    axes[0].plot(x, [r.loop_auc for r in rows], marker="o", label="loop (nightly warm start)")
    axes[0].plot(x, [r.frozen_auc for r in rows], marker="s", label="frozen day-0 model")
    axes[0].set_title("AUC on each day's live traffic")
    axes[1].plot(x, [r.loop_logloss for r in rows], marker="o", label="loop")
    axes[1].plot(x, [r.frozen_logloss for r in rows], marker="s", label="frozen")
    axes[1].set_title("log-loss")
    for ax in axes:
        ax.legend()
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    head = "".join(f"<th>{k}</th>" for k in asdict(rows[0]))
    body = "".join("<tr>" + "".join(f"<td>{v:.4f}</td>" if isinstance(v, float) else f"<td>{v}</td>"
                                    for v in asdict(r).values()) + "</tr>" for r in rows)
    path.write_text(f"<html><head><meta charset=utf-8><title>Flywheel demo</title></head><body>"
                    f"<h1>Flywheel demo: {len(rows)} days</h1><img src='{png.name}'>"
                    f"<table border=1 cellpadding=4><tr>{head}</tr>{body}</table></body></html>")


def run_demo(days: int, keep: bool, history_days: int, rows_per_day: int, seed: int) -> bool:
    from pipeline.demo.simulate import Simulator
    from pipeline.demo.traffic import send_day
    from pipeline.stages.bootstrap import bootstrap
    from pipeline.stages.collect import flush_server

    console = shared_console()  # the log lines' console: its spinners and the training bars never overwrite them
    s = get_settings()
    stack.stop_all(s)
    for sub in ("lake", "mlflow.db", "mlartifacts", "airflow", "spool", "cache", "reports", "run"):
        p = s.home_abs / sub
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    s = get_settings.use(s.model_copy(update={"schedule": "none"}))  # the demo triggers its own runs
    rt = runtime(s)
    sim = Simulator(seed=seed, rows_per_day=rows_per_day, horizon_days=history_days + days)
    with console.status("starting MLflow"):
        stack.start_mlflow(s)
    history = s.home_abs / "history.parquet"
    sim.history(history_days).to_parquet(history, index=False)
    with console.status(f"bootstrapping a champion from {history_days} days of history"):
        boot = bootstrap(history, rt)
    console.print(f"bootstrap: v{boot.version} on {boot.rows} rows, holdout AUC {boot.holdout['auc']:.4f}")
    with console.status("starting the model server and Airflow"):
        stack.start_server(s)
        stack.start_airflow(s)
    af = AirflowClient(s.airflow_url, s.airflow_user, stack.airflow_password(s))
    af.wait_for_dag(DAG_ID)
    af.unpause(DAG_ID)
    client = rt.client()
    frozen = registry.load_version(client, rt.model_name, boot.version, rt.cache_dir)
    admin = s.resolved_admin_token()
    url = s.resolved_serving_url()
    rows: list[DayRow] = []
    all_ok = True
    for i in range(history_days, history_days + days):
        day = sim.day_date(i)
        with console.status(f"{day}: sending traffic"):
            traffic = send_day(url, sim.day(i), rt.spec.feature_names)
            flush_server(url, admin)
        with console.status(f"{day}: nightly DAG run"):
            run_id = af.trigger(DAG_ID, day)
            state = af.wait_run(DAG_ID, run_id)
        served = traffic.served
        y = served["clicked"].to_numpy(dtype=np.float64)
        p_loop = served["score"].to_numpy()
        p_frozen = frozen.predict(served)
        champ = registry.get_alias(client, rt.model_name, Alias.CHAMPION)
        promoted = champ is not None and champ.data_day == day
        rows.append(DayRow(day.isoformat(), ",".join(sorted(set(served["model_version"]))), len(served),
                           auc(y, p_loop), auc(y, p_frozen), logloss(y, p_loop), logloss(y, p_frozen),
                           state, champ.version if champ else None, promoted))
        if state != "success":
            all_ok = False
            console.print(f"[red]{day}: DAG run {run_id} {state}[/red]: {af.task_states(DAG_ID, run_id)}")
        else:
            note = af.request("GET", f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json().get("note") or ""
            console.print(f"{day}: {traffic.rows} rows, {traffic.feedback} feedback, run {state}: {note}")
    health = httpx.get(f"{url}/health", timeout=5).json()
    table = Table(title="Flywheel demo: loop vs frozen day-0 model on each day's live traffic")
    for col in ("day", "served", "rows", "AUC loop", "AUC frozen", "logloss loop", "logloss frozen", "DAG",
                "champion after", "promoted"):
        table.add_column(col)
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for r in rows:
        table.add_row(r.day, r.served_versions, str(r.rows), fmt(r.loop_auc), fmt(r.frozen_auc),
                      fmt(r.loop_logloss), fmt(r.frozen_logloss), r.dag_state, str(r.champion_after),
                      "yes" if r.promoted else "no")
    console.print(table)
    s.reports_dir.mkdir(parents=True, exist_ok=True)
    report = s.reports_dir / "demo.html"
    _report(rows, report)
    console.print(f"server now serves v{health['model_version']}; report: {report}")
    if keep:
        console.print(stack.describe(s))
    else:
        stack.stop_all(s)
    promoted_any = any(r.promoted for r in rows)
    if not promoted_any:
        console.print("[yellow]no candidate was promoted during the demo[/yellow]")
    return all_ok
