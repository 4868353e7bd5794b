"""`flywheel`: every stage of the loop as a command, so each runs and debugs without Airflow."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from pipeline.config import Settings, env_name, get_settings
from pipeline.errors import FlywheelError, SettingsError
from pipeline.logs import setup_logging
from pipeline.stages.sequence import STAGE_NAMES

_TRACEBACK = False
_SPEC_GIVEN: Path | None = None  # `flywheel --spec S <command>`: what backtest's own --spec defaults to


class _FlywheelGroup(TyperGroup):
    """Every error Flywheel raises on purpose ends the command with its one-line message and exit status 2
    (whichever command raised it, inside a stage or while loading the spec); `--verbose` keeps the traceback
    for a bug report. Handled in click's invoke, so the installed script and click's test runner agree."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FlywheelError as e:
            if _TRACEBACK:
                raise
            Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
            raise typer.Exit(2) from None


app = typer.Typer(cls=_FlywheelGroup, help="Flywheel: keep a production model fresh, one night at a time.", no_args_is_help=True)
simulate_app = typer.Typer(help="The bundled traffic simulator (demo and test aid).", no_args_is_help=True)
app.add_typer(simulate_app, name="simulate")
features_app = typer.Typer(help="Entity feature tables (offline store).", no_args_is_help=True)
app.add_typer(features_app, name="features")
console = Console(stderr=True, soft_wrap=True)  # one line per message: commands stay copyable

Day = Annotated[str, typer.Option("--day", help="Logical date YYYY-MM-DD.")]


@app.callback()
def main(
    home: Annotated[Path | None, typer.Option(help="State root (FLYWHEEL_HOME).")] = None,
    spec: Annotated[Path | None, typer.Option(help="Feature spec YAML (FLYWHEEL_SPEC_PATH).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Library logs and warnings too.")] = False,
    log_format: Annotated[str | None, typer.Option(
        "--log-format", help="Console log lines: human (default) or json (FLYWHEEL_LOG_FORMAT).")] = None,
) -> None:
    if log_format not in (None, "human", "json"):
        raise typer.BadParameter("expected human or json", param_hint="--log-format")
    options = {"home": home.resolve() if home else None, "spec_path": spec.resolve() if spec else None,
               "log_format": log_format}
    global _TRACEBACK, _SPEC_GIVEN
    _TRACEBACK, _SPEC_GIVEN = verbose, spec
    get_settings.cache_clear()  # in-process callers (tests) may have changed the environment since
    try:
        s = get_settings.use(Settings(**{k: v for k, v in options.items() if v is not None}))
    except ValidationError as e:
        raise SettingsError(_settings_problems(e)) from None
    setup_logging(verbose, s.log_format, s.home_abs / "logs")
    _client_env()


def _settings_problems(e: ValidationError) -> str:
    """One line naming each bad setting, its value and the environment variable that sets it."""
    problems = []
    for err in e.errors():
        loc = [str(part) for part in err["loc"]]
        section, field = (loc[0], loc[1]) if len(loc) > 1 else (None, loc[0] if loc else "settings")
        problems.append(f"{'.'.join(loc)}={err.get('input')!r} ({env_name(section, field)}): {err['msg']}")
    return "invalid settings: " + "; ".join(problems)


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


def _call(fn, *args):
    """Run a stage with library chatter (MLflow prints run links to stdout) sent to stderr: stdout carries the
    result's JSON alone, so it can be piped."""
    with contextlib.redirect_stdout(sys.stderr):
        return fn(*args)


def _run(fn, *args) -> None:
    _emit(_call(fn, *args))


def _needs_mlflow(command: str) -> None:
    """Fail in seconds, naming the fix, when MLflow is down: not after minutes of work and client retries."""
    from pipeline.preflight import require_mlflow

    require_mlflow(get_settings(), command)


@app.command()
def serve() -> None:
    """Run the model server (follows the registry's champion alias)."""
    import uvicorn

    from serving.app import create_app
    from serving.connections import uvicorn_options

    s = get_settings()
    common = uvicorn_options(s)
    if s.serving.workers > 1:
        from pipeline.ops.stack import settings_env
        from serving.metrics import prepare_multiprocess

        prepare_multiprocess(s.metrics_dir)  # one /metrics for all workers
        os.environ.update(settings_env(s))  # the workers are new processes: they read these settings from it
        uvicorn.run("serving.app:create_app", factory=True, workers=s.serving.workers, **common)
    else:
        uvicorn.run(create_app(s), **common)


@app.command()
def bootstrap(history: Annotated[Path, typer.Option(help="Historical Parquet file with spec columns + label.")]) -> None:
    """Train and register the first champion from history."""
    from pipeline.runtime import runtime
    from pipeline.stages.bootstrap import bootstrap as stage

    rt = runtime()
    out = _call(stage, history, rt)
    _emit(out)
    s = rt.settings
    kept = f", {out.rejected} rejected rows kept in {out.quarantine}" if out.quarantine else ""
    console.print(
        f"bootstrap: {rt.model_name} v{out.version} is champion ({out.rows} rows {out.first_day}..{out.last_day}"
        f"{kept}{f', {out.duplicates} duplicated rows' if out.duplicates else ''}). Undo: delete the registered "
        f"model {rt.model_name} at {s.mlflow_tracking_uri} and the home {s.home_abs}", highlight=False)


@app.command()
def init(
    history: Annotated[Path, typer.Option(help="Historical Parquet file to draft the spec from.")],
    label: Annotated[str | None, typer.Option(help="Label column (default: guessed binary 0/1 column).")] = None,
    event_time: Annotated[str | None, typer.Option(help="Event-time column (default: first timestamp column).")]
    = None,
    out: Annotated[Path | None, typer.Option(help="Write the draft here (default: print it).")] = None,
    name: Annotated[str | None, typer.Option(help="Spec name (default: the --out file's name, else the history "
                                                  "file's).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite --out if it exists.")] = False,
) -> None:
    """Draft a feature spec from a history file: prints every guess and why; the draft loads and bootstraps."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from feature_store.infer import draft_spec, render
    from pipeline.errors import StageError

    if out is not None and out.exists() and not force:
        raise StageError(f"{out} exists: pass --force to overwrite it, or another --out")
    try:
        table = pq.read_table(history)
    except FileNotFoundError:
        raise StageError(f"history file {history} not found") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise StageError(f"{history} is not a readable Parquet file: {' '.join(str(e).split())}") from None
    draft = draft_spec(table, name or (out or history).stem, label=label, event_time=event_time)
    for note in draft.notes:
        console.print(f"guess: {note}", highlight=False, markup=False)
    text = render(draft, history.name)
    if out is None:
        typer.echo(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    console.print(f"wrote {out} ({len(draft.spec['features'])} features, label {draft.spec['label']['name']!r}, "
                  f"event time {draft.spec['event_time']!r}). Next: flywheel --spec {out} bootstrap --history "
                  f"{history}. Undo: delete {out}", highlight=False, markup=False)


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

    if not xcom:  # a training pod leaves a passing MLflow outage to its own client retries
        _needs_mlflow("train")
    _run(with_xcom(stage) if xcom else stage, day)


@app.command()
def evaluate(day: Day, run_id: Annotated[str, typer.Option(help="Training run to evaluate.")]) -> None:
    """Score candidate and champion on D's held-out slice and apply the gate."""
    _needs_mlflow("evaluate")
    from pipeline.stages.evaluate import evaluate as stage

    _run(stage, day, run_id)


@app.command()
def promote(version: Annotated[str, typer.Option(help="Model version that passed its gate.")]) -> None:
    """Move the champion alias to VERSION (the old champion becomes 'previous')."""
    _needs_mlflow("promote")
    from pipeline.stages.promote import promote as stage

    out = _call(stage, version)
    _emit(out)
    if out.promoted:
        console.print(f"promoted v{out.version} (previous champion v{out.previous}). Undo: flywheel --home "
                      f"{get_settings().home_abs} rollback", highlight=False)
    else:
        console.print(f"not promoted: {out.reason}", highlight=False, markup=False)


@app.command()
def rollout() -> None:
    """Make the model server load the champion now and wait until it serves it."""
    _needs_mlflow("rollout")
    from pipeline.stages.promote import rollout as stage

    _run(stage)


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why; recorded on both versions.")] = "manual rollback (CLI)",
    expected_champion: Annotated[str | None, typer.Option(help="Refuse unless this version is still champion.")]
    = None,
) -> None:
    """Restore the 'previous' champion as 'champion' in one step (the server follows the alias)."""
    _needs_mlflow("rollback")
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

        _needs_mlflow("approve" if decision == "approved" else "reject")
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

    _needs_mlflow("history")
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
    _needs_mlflow("online-eval")
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


#: `flywheel nightly`'s exit status when every stage ran but loop health failed (`LOOP_HEALTH_FAIL_NIGHTS`
#: reached): unattended runs (cron, CI) must see a stuck loop, not a green night. A stage that refused exits 2.
LOOP_HEALTH_FAILED = 3


@app.command(help=f"All of the nightly stages ({', '.join(STAGE_NAMES)}) for day D, in-process, without "
             f"Airflow, then loop health. Exit 0 (loop health ok or warn), 2 (a stage refused), "
             f"{LOOP_HEALTH_FAILED} (loop health failed; the result is still printed).")
def nightly(day: Day) -> None:
    from pipeline.stages.nightly import run_nightly

    out = _call(partial(run_nightly, day, rollout=True))
    _emit(out)
    promoted, home = out["promote"], get_settings().home_abs
    if promoted["promoted"]:
        console.print(f"nightly {day}: promoted v{promoted['version']} (previous champion "
                      f"v{promoted['previous']}); rollout: {out['rollout'].get('skipped', 'served')}. "
                      f"Undo: flywheel --home {home} rollback")
    else:
        console.print(f"nightly {day}: champion unchanged ({promoted['reason']})")
    _loop_health_exit(out["loop_health"])


def _loop_health_exit(health: dict) -> None:
    """The loop-health line itself is already logged at its level (a warning leaves the night green); a failure
    also ends the command with `LOOP_HEALTH_FAILED`."""
    if health["status"] == "fail":
        console.print(f"[red]error:[/red] loop health failed on {health['day']} (exit {LOOP_HEALTH_FAILED}): "
                      f"{health['nights_without_training']} nights without training, "
                      f"{health['nights_without_promotion']} without a promotion", highlight=False)
        raise typer.Exit(LOOP_HEALTH_FAILED)


@app.command()
def backtest(
    history: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Labeled Parquet to bootstrap from "
                                                                           "(ends before the stream).")],
    stream: Annotated[Path, typer.Option(exists=True, dir_okay=False, help="Labeled Parquet replayed period by "
                                                                          "period after the history.")],
    spec: Annotated[Path | None, typer.Option("--spec", help="Feature spec YAML of the stream (or `flywheel "
                                                           "--spec S backtest ...`).")] = None,
    period: Annotated[str, typer.Option(help="1d, 7d, 12h, 2w, month, quarter or year; not a day: one period "
                                             "per logical date.")] = "1d",
    label_delay: Annotated[str, typer.Option(help="Label time = event time + this (30m, 2h, 1d), unless "
                                                  "--label-time names a column.")] = "0s",
    label_time: Annotated[str | None, typer.Option(help="Stream column holding each label's own time.")] = None,
    home: Annotated[Path | None, typer.Option("--home", help="Scratch home (default <FLYWHEEL_HOME>/backtest/"
                                                            "<spec stem>); re-running resumes it.")] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (default <home>/backtest/report).")] = None,
    max_periods: Annotated[int | None, typer.Option(help="Replay only the first N periods.")] = None,
    retrain_every: Annotated[int, typer.Option(help="From-scratch reference retrained every K periods.")] = 1,
    last_k: Annotated[int, typer.Option(help="Periods the recent gradient-boosted reference is refit on.")] = 3,
    airflow: Annotated[bool, typer.Option("--airflow", help="Run each night as a run of the nightly DAG through "
                                                            "the scratch home's own Airflow scheduler.")] = False,
) -> None:
    """Would the loop have helped on my history? Replays STREAM through the real server and nightly on a scratch
    home, test-then-train, against the frozen, retrained and gradient-boosted references."""
    from feature_store.spec import parse_duration
    from pipeline.backtest.command import backtest as run_backtest
    from pipeline.backtest.run import BacktestOptions

    spec = spec or _SPEC_GIVEN
    if spec is None:
        console.print("[red]error:[/red] backtest needs the stream's feature spec: --spec S (after `backtest`, or "
                      "before it as `flywheel --spec S backtest`); `flywheel init --history H` drafts one")
        raise typer.Exit(2)
    if not spec.is_file():
        console.print(f"[red]error:[/red] --spec {spec}: no such file")
        raise typer.Exit(2)
    try:
        delay = parse_duration(label_delay)
    except ValueError as e:
        console.print(f"[red]error:[/red] --label-delay: {e}")
        raise typer.Exit(2) from None
    opts = BacktestOptions(spec=spec, history=history, stream=stream, period=period, label_delay=delay,
                           label_time=label_time, max_periods=max_periods, retrain_every=max(1, retrain_every),
                           last_k=max(1, last_k), home=home or get_settings().home_abs / "backtest" / spec.stem,
                           airflow=airflow)
    result = run_backtest(opts, out, console)  # a refusal (Decision) is one error line, exit 2, like any command
    console.print(f"report: {result['files']['html']}")
    typer.echo(json.dumps(result, default=str))


@app.command()
def up(airflow: bool = True, server: bool = True) -> None:
    """Start MLflow, Airflow and the model server on embedded defaults."""
    from feature_store.spec import load_spec
    from pipeline.ops import stack

    s = get_settings()
    load_spec(s.spec_path)  # a bad spec stops here, before any process starts
    stack.start_mlflow(s)
    if server:
        stack.start_server(s)
    if airflow:
        stack.start_airflow(s)
    console.print(stack.describe(s, airflow=airflow, server=server), highlight=False)


@app.command("canary-eval")
def canary_eval(day: Day) -> None:
    """Decide the canary: promote, retire or keep waiting on the challenger, from its labeled live rows."""
    _needs_mlflow("canary-eval")
    from pipeline.release.canary import canary_eval as stage

    _run(stage, day)


@app.command("settings")
def show_settings() -> None:
    """The settings in force (defaults, FLYWHEEL_* env, --home/--spec) by section, secrets masked."""
    _emit(get_settings().public_dump())


@app.command("db-upgrade")
def db_upgrade() -> None:
    """Bring the Airflow and MLflow metadata schemas up to date (a second run is a no-op)."""
    from pipeline.ops import stack

    _emit(stack.db_upgrade(get_settings()))


@app.command()
def down() -> None:
    """Stop everything `up` or `demo` started for this home."""
    from pipeline.ops import stack

    s = get_settings()
    stopped = stack.stop_all(s)
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'} (home {s.home_abs}); start again "
                  f"with: flywheel --home {s.home_abs} up", highlight=False)


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
    from pipeline.demo.traffic import send_day
    from pipeline.stages.collect import flush_server

    s = get_settings()
    from pipeline.runtime import runtime

    target = url or s.resolved_serving_url()
    res = send_day(target, Simulator(seed=seed, rows_per_day=rows_per_day).day(day_index),
                   runtime(s).spec.feature_names, batch=batch)
    flush_server(target, s.resolved_admin_token())
    _emit({"requests": res.requests, "rows": res.rows, "errors": res.errors, "feedback": res.feedback})


if __name__ == "__main__":
    app()
