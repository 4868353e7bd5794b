"""Collect throughput and peak memory on a simulated day (issue 4): does RSS stay flat as the day grows?

Simulates N logged prediction rows for the default CTR spec as sealed segments (`--segment-rows` each, the size
the server's seal interval produces) plus feedback for `--label-share` of them, then runs `pipeline.stages.collect` in a
fresh child process per size and reads that child's own peak RSS (`resource.getrusage`), so generation and the
parent never count. With `--validate` the child then validates the day too (chunked, with a user suite file
and the day itself copied as the previous validated day, so drift and unseen shares run against a full-size
reference) and the final peak covers both stages.

    .venv/bin/python bench/collect.py --rows 1000000 10000000 --validate

Prints one line per size and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DAY = date(2026, 3, 1)

CHILD = """
import json, resource, shutil, sys, time
from datetime import date, timedelta
from pipeline.stages.collect import collect
from pipeline.runtime import runtime
t = time.perf_counter(); r = collect(sys.argv[1]); c = time.perf_counter() - t
collect_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
v = None
if sys.argv[2] == "1":
    from pipeline.stages.validate import validate
    lake, day = runtime().lake, date.fromisoformat(sys.argv[1])
    # The day itself, copied as the previous validated day, is the drift/unseen reference: a full-size window.
    shutil.copytree(lake.partition_path("training", day), lake.partition_path("validated", day - timedelta(days=1)))
    t = time.perf_counter(); res = validate(sys.argv[1]); v = time.perf_counter() - t
    assert res.passed and res.rows == r.rows and res.drift["reference_days"], res
print(json.dumps({"rows": r.rows, "collect_s": c, "validate_s": v, "collect_peak_rss_mb": collect_rss,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
SUITE = {"name": "bench", "expectations": [
    {"type": "expect_column_values_to_be_between", "kwargs": {"column": "price", "min_value": 0, "max_value": 1000}},
    {"type": "expect_column_mean_to_be_between", "kwargs": {"column": "score", "min_value": 0.2, "max_value": 0.8}},
]}


def simulate(home: Path, rows: int, segment_rows: int, label_share: float) -> None:
    """Vectorised, segment by segment, so the generator itself never holds the day."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from feature_store.log_schema import FEEDBACK, PREDICTIONS, feedback_schema, prediction_schema
    from feature_store.spec import FeatureType
    from pipeline.config import Settings
    from pipeline.runtime import runtime

    rt = runtime(Settings(home=home, collect_flushes_server=False))
    spec, schema = rt.spec, prediction_schema(rt.spec)
    rng = np.random.default_rng(0)
    start_us = int(datetime.combine(DAY, datetime.min.time(), tzinfo=UTC).timestamp() * 1e6)
    for d, stream in ((PREDICTIONS, "p"), (FEEDBACK, "f")):
        (home / "lake" / d / f"dt={DAY}").mkdir(parents=True, exist_ok=True)
        del stream
    for seg, lo in enumerate(range(0, rows, segment_rows)):
        n = min(segment_rows, rows - lo)
        ids = pc.binary_join_element_wise("r", pc.cast(pa.array(np.arange(lo, lo + n)), pa.string()), "")
        t = pa.array(start_us + np.sort(rng.integers(0, 86_000_000_000, n)), pa.timestamp("us", tz="UTC"))
        cols = {"request_id": ids, "row": pa.array(np.zeros(n, np.int32)), "served_at": t, spec.event_time: t,
                "model_version": pa.array(["1"] * n), "score": pa.array(rng.uniform(size=n))}
        for name, f in spec.features.items():
            if f.type is FeatureType.NUMERIC:
                hi = f.max if f.max is not None else 1000.0
                cols[name] = pa.array(rng.uniform(f.min or 0.0, hi, n))
            else:
                vocab = pa.array([f"{name}-{k}" for k in range(200)])
                cols[name] = pa.DictionaryArray.from_arrays(pa.array(rng.integers(0, 200, n, dtype=np.int32)),
                                                           vocab).cast(pa.string())
        pq.write_table(pa.table(cols, schema=schema), home / "lake" / PREDICTIONS / f"dt={DAY}" /
                       f"seg-{seg:05d}.parquet", compression="zstd")
        pick = np.flatnonzero(rng.uniform(size=n) < label_share)
        lt = pc.take(t, pa.array(pick)).cast(pa.int64()).to_numpy() + 60_000_000
        lt = pa.array(lt, pa.timestamp("us", tz="UTC"))
        fb = pa.table({"request_id": pc.take(ids, pa.array(pick)), "row": pa.array(np.zeros(len(pick), np.int32)),
                       "label": pa.array(np.ones(len(pick))), "label_time": lt, "received_at": lt},
                      schema=feedback_schema())
        pq.write_table(fb, home / "lake" / FEEDBACK / f"dt={DAY}" / f"seg-{seg:05d}.parquet", compression="zstd")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--segment-rows", type=int, default=250_000)
    ap.add_argument("--label-share", type=float, default=0.05)
    ap.add_argument("--validate", action="store_true")
    args = ap.parse_args()
    results = []
    for rows in args.rows:
        with tempfile.TemporaryDirectory(prefix="flywheel-bench-collect-") as tmp:
            home = Path(tmp)
            t = time.perf_counter()
            simulate(home, rows, args.segment_rows, args.label_share)
            gen_s = time.perf_counter() - t
            suite = home / "bench.expectations.json"
            suite.write_text(json.dumps(SUITE))
            env = {**os.environ, "FLYWHEEL_HOME": str(home), "FLYWHEEL_COLLECT__FLUSHES_SERVER": "false",
                   "FLYWHEEL_VALIDATION__MIN_ROWS": "1", "FLYWHEEL_VALIDATION__SUITE_PATH": str(suite)}
            out = subprocess.run([sys.executable, "-c", CHILD, DAY.isoformat(), "1" if args.validate else "0"],
                                 cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(logged_rows=rows, generate_s=round(gen_s, 1), rows_per_s=round(rows / r["collect_s"]))
            results.append(r)
            print(f"{rows:>11,} rows: collect {r['collect_s']:.1f}s ({r['rows_per_s']:,} rows/s, peak RSS "
                  f"{r['collect_peak_rss_mb']:.0f} MB), validate {r['validate_s']}, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB", flush=True)
    summary = {"bench": "collect", "results": results}
    if len(results) > 1:
        summary["rss_ratio_last_vs_first"] = round(results[-1]["peak_rss_mb"] / results[0]["peak_rss_mb"], 3)
        summary["collect_rss_ratio_last_vs_first"] = round(
            results[-1]["collect_peak_rss_mb"] / results[0]["collect_peak_rss_mb"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
