"""`flywheel`: every stage of the loop as a command, so each runs and debugs without Airflow."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel
from rich.console import Console

from pipeline.config import get_settings
from pipeline.errors import StageError
from pipeline.logs import setup_logging

app = typer.Typer(help="Flywheel: keep a production model fresh, one night at a time.", no_args_is_help=True)
simulate_app = typer.Typer(help="The bundled traffic simulator (demo and test aid).", no_args_is_help=True)
app.add_typer(simulate_app, name="simulate")
features_app = typer.Typer(help="Entity feature tables (offline store).", no_args_is_help=True)
app.add_typer(features_app, name="features")
console = Console(stderr=True)

Day = Annotated[str, typer.Option("--day", help="Logical date YYYY-MM-DD.")]


@app.callback()
def main(
    home: Annotated[Path | None, typer.Option(help="State root (FLYWHEEL_HOME).")] = None,
    spec: Annotated[Path | None, typer.Option(help="Feature spec YAML (FLYWHEEL_SPEC_PATH).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    if home:
        os.environ["FLYWHEEL_HOME"] = str(home.resolve())
    if spec:
        os.environ["FLYWHEEL_SPEC_PATH"] = str(spec.resolve())
    get_settings.cache_clear()
    setup_logging(verbose)
    _client_env()


def _client_env() -> None:
    """Hand-run commands reach the same S3 endpoint and pass the same MLflow basic auth as the stack's
    processes, without the user exporting tool-specific variables (explicit env values win)."""
    from pipeline.ops.stack import mlflow_client_env, object_storage_endpoints

    s = get_settings()
    for key, value in {**mlflow_client_env(s), **object_storage_endpoints(s)}.items():
        os.environ.setdefault(key, value)


def _emit(result: BaseModel | dict) -> None:
    data = result.model_dump() if isinstance(result, BaseModel) else result
    typer.echo(json.dumps(data, indent=2, default=str))


def _run(fn, *args) -> None:
    try:
        _emit(fn(*args))
    except StageError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


@app.command()
def serve() -> None:
    """Run the model server (follows the registry's champion alias)."""
    import uvicorn

    from serving.app import create_app

    s = get_settings()
    common = dict(host=s.serving_host, port=s.serving_port, log_level="warning", timeout_graceful_shutdown=30,
                  limit_concurrency=s.max_concurrency, access_log=False)
    if s.serving_workers > 1:
        uvicorn.run("serving.app:create_app", factory=True, workers=s.serving_workers, **common)
    else:
        uvicorn.run(create_app(s), **common)


@app.command()
def bootstrap(history: Annotated[Path, typer.Option(help="Historical Parquet file with spec columns + label.")]) -> None:
    """Train and register the first champion from history."""
    from pipeline.stages.bootstrap import bootstrap as stage

    _run(stage, history)


@app.command()
def collect(day: Day) -> None:
    """Join day D's prediction log with its feedback into training/dt=D."""
    from pipeline.stages.collect import collect as stage

    _run(stage, day)


@app.command()
def validate(day: Day) -> None:
    """Run the validation gate on training/dt=D; bad rows go to quarantine/dt=D."""
    from pipeline.stages.validate import validate as stage

    _run(stage, day)


@app.command()
def train(
    day: Day,
    xcom: Annotated[bool, typer.Option("--xcom", help="Also write the result to /airflow/xcom/return.json "
                                       "(the training pod's XCom for KubernetesPodOperator).")] = False,
) -> None:
    """Warm-start the champion on validated/dt=D and log the candidate."""
    from pipeline.orchestration.k8s_train import with_xcom
    from pipeline.stages.train import train as stage

    _run(with_xcom(stage) if xcom else stage, day)


@app.command()
def evaluate(day: Day, run_id: Annotated[str, typer.Option(help="Training run to evaluate.")]) -> None:
    """Score candidate and champion on D's held-out slice and apply the gate."""
    from pipeline.stages.evaluate import evaluate as stage

    _run(stage, day, run_id)


@app.command()
def promote(version: Annotated[str, typer.Option(help="Model version that passed its gate.")]) -> None:
    """Move the champion alias to VERSION (the old champion becomes 'previous')."""
    from pipeline.stages.promote import promote as stage

    _run(stage, version)


@app.command()
def rollout() -> None:
    """Make the model server load the champion now and wait until it serves it."""
    from pipeline.stages.promote import rollout as stage

    _run(stage)


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why; recorded on both versions.")] = "manual rollback (CLI)",
    expected_champion: Annotated[str | None, typer.Option(help="Refuse unless this version is still champion.")]
    = None,
) -> None:
    """Restore the 'previous' champion as 'champion' in one step (the server follows the alias)."""
    from pipeline.release.rollback import rollback as stage

    _run(stage, reason, expected_champion)


def _decide(decision: str):
    """One implementation behind `approve` and `reject`: the decision is the only difference."""

    def command(
        version: Annotated[str, typer.Option(help="Model version waiting for review.")],
        by: Annotated[str | None, typer.Option(help="Reviewer name (default: your user).")] = None,
        note: Annotated[str, typer.Option(help="Why; shown on the version's review card.")] = "",
    ) -> None:
        from pipeline.release.review import decide

        _run(decide, version, decision, by, note)

    return command


app.command("approve", help="Review mode: approve VERSION; the waiting nightly run then promotes it.")(
    _decide("approved"))
app.command("reject", help="Review mode: reject VERSION; it loses `challenger` and is never promoted.")(
    _decide("rejected"))


@app.command()
def history(
    as_json: Annotated[bool, typer.Option("--json", help="The ledger as one JSON object on stdout.")] = False,
    at: Annotated[str | None, typer.Option(help="Also say which version served at this ISO time (UTC).")] = None,
) -> None:
    """The alias ledger: every move of champion, previous and challenger, when, by whom and why."""
    from datetime import UTC, datetime

    from pipeline import registry
    from pipeline.ledger import served_on
    from pipeline.runtime import runtime

    rt = runtime()
    moves = registry.history(rt.client(), rt.model_name)
    when = datetime.fromisoformat(at).replace(tzinfo=datetime.fromisoformat(at).tzinfo or UTC) if at else None
    served = served_on(moves, when) if when else None
    if as_json:
        _emit({"model": rt.model_name, "moves": [m.model_dump() for m in moves],
               "served_at": ({"at": at, "move": served.model_dump() if served else None} if at else None)})
        return
    from rich.table import Table

    table = Table(title=f"{rt.model_name}: alias history (oldest first)")
    for col in ("when (UTC)", "alias", "version", "was", "why", "by", "evidence / note"):
        table.add_column(col, overflow="fold")
    for m in moves:
        table.add_row(m.at[:19].replace("T", " "), m.alias, f"v{m.version}" if m.version else "cleared",
                      f"v{m.replaced}" if m.replaced else "", m.why, m.by, (m.evaluation or m.note)[:120])
    Console().print(table)
    if at:
        Console().print(f"at {at}: " + (f"v{served.version} served ({served.why}, by {served.by})" if served
                                        else "no champion yet"))


@app.command("online-eval")
def online_eval(day: Day) -> None:
    """Compare the champion with 'previous' on the live rows it served up to D; roll back if worse."""
    from pipeline.release.online_eval import online_eval as stage

    _run(stage, day)


@features_app.command("ingest")
def features_ingest(
    entity: Annotated[str, typer.Argument(help="Entity of the spec, e.g. user.")],
    file: Annotated[Path, typer.Argument(help="Parquet file: the entity key, the event-time column (as-of "
                                              "time) and any of the entity's features.")],
) -> None:
    """Add entity feature values to the lake's features/ENTITY table (idempotent)."""
    from pipeline.stages.materialize import ingest as stage

    _run(stage, entity, file)


@app.command()
def materialize(
    up_to: Annotated[str | None, typer.Option(help="Load values as of this ISO time (default: everything).")]
    = None,
) -> None:
    """Load each entity's latest feature values into the online store (incremental; a re-run is a no-op)."""
    from pipeline.stages.materialize import materialize as stage

    _run(stage, up_to)


@app.command()
def nightly(day: Day) -> None:
    """All of the nightly DAG's stages for day D, in-process, without Airflow."""
    from pipeline.stages.nightly import run_nightly

    _run(run_nightly, day)


@app.command()
def up(airflow: bool = True, server: bool = True) -> None:
    """Start MLflow, Airflow and the model server on embedded defaults."""
    from pipeline.ops import stack

    s = get_settings()
    stack.start_mlflow(s)
    if server:
        stack.start_server(s)
    if airflow:
        stack.start_airflow(s)
    console.print(stack.describe(s))


@app.command("canary-eval")
def canary_eval(day: Day) -> None:
    """Decide the canary: promote, retire or keep waiting on the challenger, from its labeled live rows."""
    from pipeline.release.canary import canary_eval as stage

    _run(stage, day)


@app.command("db-upgrade")
def db_upgrade() -> None:
    """Bring the Airflow and MLflow metadata schemas up to date (a second run is a no-op)."""
    from pipeline.ops import stack

    _emit(stack.db_upgrade(get_settings()))


@app.command()
def down() -> None:
    """Stop everything `up` or `demo` started for this home."""
    from pipeline.ops import stack

    stopped = stack.stop_all(get_settings())
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command()
def demo(
    days: Annotated[int, typer.Option(help="Simulated live days.")] = 7,
    keep: Annotated[bool, typer.Option(help="Leave the stack running afterwards.")] = True,
    history_days: Annotated[int, typer.Option(help="Simulated history days to bootstrap from.")] = 7,
    rows_per_day: Annotated[int, typer.Option(help="Simulated requests rows per day.")] = 4000,
    seed: int = 0,
) -> None:
    """Bring up the stack, bootstrap a champion, and run DAYS simulated days through the real loop."""
    from pipeline.demo.run import run_demo

    ok = run_demo(days=days, keep=keep, history_days=history_days, rows_per_day=rows_per_day, seed=seed)
    raise typer.Exit(0 if ok else 1)


@simulate_app.command("history")
def simulate_history(
    out: Annotated[Path, typer.Option(help="Parquet file to write.")],
    days: int = 7, rows_per_day: int = 4000, seed: int = 0,
) -> None:
    """Write DAYS of labeled simulated history (a bootstrap file)."""
    from pipeline.demo.simulate import Simulator

    frame = Simulator(seed=seed, rows_per_day=rows_per_day).history(days)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False)
    _emit({"rows": len(frame), "path": str(out), "first": str(frame.event_time.min()),
           "last": str(frame.event_time.max())})


@simulate_app.command("traffic")
def simulate_traffic(
    day_index: Annotated[int, typer.Option(help="Simulator day index (history occupies 0..H-1).")],
    url: Annotated[str | None, typer.Option(help="Model server URL.")] = None,
    rows_per_day: int = 4000, seed: int = 0, batch: int = 20,
) -> None:
    """Send one simulated day of predictions and feedback to a running server over HTTP."""
    from pipeline.demo.simulate import Simulator
    from pipeline.demo.traffic import flush, send_day

    s = get_settings()
    from pipeline.runtime import runtime

    target = url or s.resolved_serving_url()
    res = send_day(target, Simulator(seed=seed, rows_per_day=rows_per_day).day(day_index),
                   runtime(s).spec.feature_names, batch=batch)
    flush(target, s.resolved_admin_token())
    _emit({"requests": res.requests, "rows": res.rows, "errors": res.errors, "feedback": res.feedback})


if __name__ == "__main__":
    app()
