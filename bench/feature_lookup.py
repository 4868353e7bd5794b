"""What filling entity features from the online store costs the model server, per store backend.

One bootstrapped model behind a real MLflow server and the real Flywheel server (2 workers). For each backend
(the embedded SQLite default, then Redis on its own DB and namespace) every user and item key the request bodies
use is ingested and materialized, then wrk drives interleaved A/B runs at concurrency 32 for batch 1 and 64:
(A) rows carry every feature, so no lookup happens; (B) rows omit every entity feature, so each request does
one batched store read. B/A is the price of the lookup on the whole request path, not just the read; the bare
read (`store.read_entities` in this process) is timed too, to tell the two apart. The last line is JSON.

    .venv/bin/python bench/feature_lookup.py [--duration 5] [--reps 2] [--workers 2]
Needs `wrk` (Debian: apt-get install wrk) and Redis on 127.0.0.1:6379 (DB 11 is used and cleaned up).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.serving import free_port, rss_mb, start, stop, wait_predict, wrk, wrk_bench_args  # noqa: E402
from feature_store.entity_tables import entity_features  # noqa: E402
from pipeline.config import DEFAULT_SPEC, Settings  # noqa: E402
from pipeline.demo.simulate import Simulator  # noqa: E402
from pipeline.ops import stack  # noqa: E402
from pipeline.runtime import runtime  # noqa: E402
from pipeline.stages.bootstrap import bootstrap  # noqa: E402
from pipeline.stages.materialize import ingest, materialize, open_online_store  # noqa: E402

console = Console(stderr=True)
REDIS_URI = "redis://127.0.0.1:6379/11"
BATCHES = (1, 64)
CONC = 32
AS_OF = datetime(2026, 1, 1, tzinfo=UTC)


def spec_copy(home: Path) -> Path:
    """The CTR spec under a unique name: the online store's namespace, so Redis keys are this run's alone."""
    path = home / "spec.yaml"
    path.write_text(DEFAULT_SPEC.read_text().replace("name: ctr", f"name: ctrbench{uuid.uuid4().hex[:8]}", 1))
    return path


def read_timing(store, wanted: dict, n: int) -> dict:
    """The bare batched read, as the server issues it, without HTTP, parsing, scoring or logging around it."""
    store.read_entities(wanted)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        store.read_entities(wanted)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50_ms": times[len(times) // 2] * 1e3, "p99_ms": times[int(len(times) * 0.99)] * 1e3}


def lookup_counters(base_url: str) -> dict:
    """One worker's lookup counters (each worker keeps its own registry): misses and errors must stay 0."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    out = {"hit": 0.0, "miss": 0.0, "error": 0.0}
    for outcome, value in re.findall(r'flywheel_feature_lookup_keys_total\{entity="\w+",outcome="(\w+)"\} (\S+)',
                                     text):
        out[outcome] = out.get(outcome, 0.0) + float(value)
    total = re.search(r"^flywheel_feature_lookup_seconds_sum (\S+)$", text, re.M)
    count = re.search(r"^flywheel_feature_lookup_seconds_count (\S+)$", text, re.M)
    n = float(count.group(1)) if count else 0.0
    out["requests_looked_up"] = n
    out["mean_lookup_ms"] = float(total.group(1)) / n * 1e3 if n else float("nan")
    return out


def main() -> None:
    args = wrk_bench_args("feature_lookup.py")
    home = Path(tempfile.mkdtemp(prefix="fw-bench-lookup-"))
    mlflow_port = free_port()
    common = {"home": home, "mlflow_port": mlflow_port, "mlflow_tracking_uri": f"http://127.0.0.1:{mlflow_port}",
              "serving_workers": args.workers, "spec_path": spec_copy(home)}
    base = Settings(**common, serving_port=free_port())
    backends = {"sqlite": None, "redis": REDIS_URI}
    rts = {name: runtime(Settings(**common, serving_port=free_port(), online_store_uri=uri))
           for name, uri in backends.items()}
    procs: list = []
    try:
        summary, reads, counters, rss = run(args, base, rts, home, procs)
    finally:
        for p in procs:
            stop(p)
        stack.stop_all(base)
        with open_online_store(rts["redis"]) as st:
            st.clear()
    report(args, summary, reads, counters, rss)
    shutil.rmtree(home, ignore_errors=True)


def run(args, base: Settings, rts: dict, home: Path, procs: list):
    sim = Simulator(seed=3, rows_per_day=4000)
    stack.start_mlflow(base)
    rt0 = runtime(base)
    spec = rt0.spec
    history = home / "history.parquet"
    sim.history(3).to_parquet(history)
    bootstrap(history, rt0)
    feats = spec.feature_names
    rows = sim.day(3)[feats].head(max(BATCHES)).reset_index(drop=True)

    # One value per key (the last one seen), ingested and also written into the full rows, so A and B score the
    # same inputs and must return the same scores.
    per_entity = {e: entity_features(spec, e) for e in spec.entities}
    for entity, names in per_entity.items():
        key = spec.entities[entity].key
        latest = rows.groupby(key, sort=False)[names].last()
        for n in names:
            rows[n] = rows[key].map(latest[n])
        ingest(entity, latest.reset_index().assign(**{spec.event_time: AS_OF}), rt0)
    omitted = [n for names in per_entity.values() for n in names]
    bodies: dict[tuple[str, int], Path] = {}
    for b in BATCHES:
        full = rows.head(b).to_dict(orient="records")
        bodies[("A", b)] = home / f"full-{b}.json"
        bodies[("A", b)].write_text(json.dumps({"rows": full}))
        bodies[("B", b)] = home / f"lookup-{b}.json"
        bodies[("B", b)].write_text(json.dumps({"rows": [{k: v for k, v in r.items() if k not in omitted}
                                                         for r in full]}))
    keys = {e: rows[spec.entities[e].key].astype(str).unique().tolist() for e in spec.entities}
    console.print(f"omitted in B: {omitted}; keys ingested: {({e: len(k) for e, k in keys.items()})}")

    summary: dict[str, dict] = {}
    reads: dict[str, dict] = {}
    counters: dict[str, dict] = {}
    rss: dict[str, float] = {}
    flywheel = [str(Path(sys.executable).parent / "flywheel"), "serve"]
    for name, rt in rts.items():
        done = materialize(None, rt)
        console.print(f"{name}: materialized {[(e.entity, e.keys, e.values_written) for e in done.entities]}")
        with open_online_store(rt) as st:
            for b in BATCHES:
                first = rows.head(b)
                wanted = {e: (first[spec.entities[e].key].astype(str).unique().tolist(), per_entity[e])
                          for e in spec.entities}
                reads[f"{name}_b{b}"] = read_timing(st, wanted, 2000 if b == 1 else 500)
        port = rt.settings.serving.port
        env = {**stack.full_env(rt.settings), "FLYWHEEL_SERVING__PORT": str(port)}
        proc = start(flywheel, env, home / f"serve-{name}.log")
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_predict(f"{url}/predict", bodies[("A", 1)].read_bytes())
        for b in BATCHES:
            got = {k: httpx.post(f"{url}/predict", content=bodies[(k, b)].read_bytes(),
                                 headers={"content-type": "application/json"}, timeout=30) for k in ("A", "B")}
            for k, r in got.items():
                if r.status_code != 200:
                    raise RuntimeError(f"{name} batch {b} body {k}: {r.status_code} {r.text[:500]}")
            a, bb = got["A"].json()["scores"], got["B"].json()["scores"]
            if len(a) != b or any(abs(x - y) > 1e-6 for x, y in zip(a, bb, strict=True)):
                raise RuntimeError(f"{name} batch {b}: filled rows scored differently from full rows: {a} {bb}")
        results: dict[tuple[str, int], list[dict]] = {}
        for b in BATCHES:
            for _ in range(args.reps):
                for kind in ("A", "B"):
                    r = wrk(f"{url}/predict", bodies[(kind, b)], CONC, args.duration)
                    results.setdefault((kind, b), []).append(r)
                    console.print(f"{name:<6} batch {b:>2} {kind} {r['rps']:>8.0f} req/s p50 {r['p50_ms']:.1f} "
                                  f"p99 {r['p99_ms']:.1f} ms errors {r['errors']}")
        counters[name] = lookup_counters(url)
        rss[name] = rss_mb(proc.pid)
        stop(proc)
        procs.remove(proc)
        for (kind, b), runs in results.items():
            rps = sorted(r["rps"] for r in runs)[len(runs) // 2]
            summary[f"{name}_b{b}_{kind}"] = {
                "rps": rps, "rows_per_s": rps * b, "p50_ms": max(r["p50_ms"] for r in runs),
                "p99_ms": max(r["p99_ms"] for r in runs), "errors": sum(r["errors"] for r in runs),
                "rps_runs": [r["rps"] for r in runs]}
    return summary, reads, counters, rss


def report(args, summary: dict, reads: dict, counters: dict, rss: dict) -> None:
    table = Table(title=f"Entity-feature lookup: A = rows carry every feature, B = filled from the store "
                        f"({args.workers} workers, concurrency {CONC})")
    for col in ("store", "batch", "case", "req/s", "rows/s", "p50 ms", "p99 ms", "errors", "B/A rows/s",
                "bare read p50/p99 ms"):
        table.add_column(col, justify="right")
    ratios = {}
    for name in ("sqlite", "redis"):
        for b in BATCHES:
            a, bb = summary[f"{name}_b{b}_A"], summary[f"{name}_b{b}_B"]
            ratios[f"{name}_b{b}"] = round(bb["rows_per_s"] / a["rows_per_s"], 3)
            read = reads[f"{name}_b{b}"]
            for kind, x in (("A", a), ("B", bb)):
                table.add_row(name, str(b), kind, f"{x['rps']:.0f}", f"{x['rows_per_s']:.0f}", f"{x['p50_ms']:.1f}",
                              f"{x['p99_ms']:.1f}", str(x["errors"]),
                              f"{ratios[f'{name}_b{b}']:.3f}" if kind == "B" else "",
                              f"{read['p50_ms']:.3f}/{read['p99_ms']:.3f}" if kind == "B" else "")
    console.print(table)
    console.print(f"lookup counters (one worker each): {counters}; server RSS MB: {rss}")
    print(json.dumps({
        "ratio_rows_per_s_lookup_vs_full": ratios,
        "errors": sum(v["errors"] for v in summary.values()),
        "lookup_misses": sum(c["miss"] + c["error"] for c in counters.values()),
        "bare_read_ms": {k: {m: round(v, 4) for m, v in r.items()} for k, r in reads.items()},
        "server_lookup_counters_one_worker": counters, "rss_mb": rss,
        "workers": args.workers, "concurrency": CONC, "duration_s": args.duration, "reps": args.reps,
        "results": summary,
    }))


if __name__ == "__main__":
    main()
