"""`flywheel backtest` end to end: run (or resume) the periods, then write the report beside the home's state."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from pipeline.backtest import report
from pipeline.backtest.run import Backtest, BacktestOptions


def period_note(opts: BacktestOptions, is_day: bool) -> str:
    delay = (f"labels at the stream's {opts.label_time!r} column" if opts.label_time
             else f"labels at the event time + {opts.label_delay}")
    how = (" Each night ran as a run of the nightly DAG (run id backtest__DATE) through the scheduler of the "
           "scratch home's own Airflow." if opts.airflow else "")
    if is_day:
        return f"Period 1d: each period is replayed on its own date; {delay}.{how}"
    return (f"Period {opts.period} is not a day: period k is replayed on logical date (first stream day + k days), "
            f"times inside a period mapped linearly into that day, so label delays and the spec's attribution "
            f"window are compared on that compressed clock; {delay}.{how}")


def backtest(opts: BacktestOptions, out_dir: Path | None = None, console: Console | None = None) -> dict:
    bt = Backtest(opts, console)
    rows = bt.run()
    summary = report.summarize(rows, bt.rt.spec.name, period_note(opts, bt.is_day), opts.last_k, opts.retrain_every)
    summary["bootstrap"] = {k: v for k, v in (bt.store.read_json("bootstrap.json") or {}).items()
                            if k in ("version", "rows", "holdout", "seconds")}
    files = report.write(rows, summary, out_dir or bt.s.home_abs / "backtest" / "report",
                         f"Flywheel backtest: {bt.rt.spec.name}, {len(rows)} periods of {opts.period}")
    return {**summary, "files": files}
