"""Flywheel's server against `mlflow models serve` on the same registered model, same load, same machine.

Both servers are driven by wrk (a separate process on loopback) with interleaved A/B/A/B runs for batch 1 and
256 at concurrency 1, 8 and 32; Flywheel runs with its prediction log on in the default group-commit durability
(answer after the fsync), again in interval durability (answer first, fsync every flush interval) and once with the
log off, to price durability and logging. Reports requests/s, rows/s, p50/p99, errors and server RSS, plus cold start (process start to
first answered prediction). The last line is JSON.

    .venv/bin/python bench/serving.py [--duration 5] [--workers 2]
Needs `wrk` (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.config import Settings  # noqa: E402
from pipeline.demo.simulate import Simulator  # noqa: E402
from pipeline.ops import stack  # noqa: E402
from pipeline.runtime import runtime  # noqa: E402
from pipeline.stages.bootstrap import bootstrap  # noqa: E402

console = Console(stderr=True)
LUA = 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = io.open("{body}"):read("*a")\n'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    try:
        p = psutil.Process(pid)
        return sum(x.memory_info().rss for x in [p, *p.children(recursive=True)]) / 2**20
    except psutil.NoSuchProcess:
        return float("nan")


def wrk(url: str, body: Path, conc: int, duration: float) -> dict:
    script = body.with_suffix(".lua")
    script.write_text(LUA.format(body=body))
    threads = min(conc, 2)
    done = subprocess.run(["wrk", f"-t{threads}", f"-c{conc}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script),
                           url], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"wrk failed against {url}: {done.stdout}{done.stderr}")
    out = done.stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    return {"rps": rps, "p50_ms": ms("50"), "p99_ms": ms("99"), "errors": errors}


def wait_predict(url: str, body: bytes, timeout: float = 120) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=5).status_code \
                    == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} never answered a prediction")


def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True, cwd=REPO)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def wrk_bench_args(script: str) -> argparse.Namespace:
    """The options every wrk-driven bench takes; refuses to start without wrk."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit(f"bench/{script} needs wrk: apt-get install wrk")
    return args


def main() -> None:
    args = wrk_bench_args("serving.py")
    home = Path(tempfile.mkdtemp(prefix="fw-bench-serving-"))
    mlflow_port = free_port()
    s = Settings(home=home, mlflow_port=mlflow_port, mlflow_tracking_uri=f"http://127.0.0.1:{mlflow_port}",
                 serving_port=free_port(), serving_workers=args.workers)
    sim = Simulator(seed=3, rows_per_day=4000)
    stack.start_mlflow(s)
    rt = runtime(s)
    history = home / "history.parquet"
    sim.history(3).to_parquet(history)
    version = bootstrap(history, rt).version
    feats = rt.spec.feature_names
    day = sim.day(3)
    bodies = {}
    for b in (1, 256):
        rows = day[feats].head(b).to_dict(orient="records")
        bodies[("flywheel", b)] = home / f"fw-{b}.json"
        bodies[("flywheel", b)].write_text(json.dumps({"rows": rows}))
        bodies[("mlflow", b)] = home / f"ml-{b}.json"
        bodies[("mlflow", b)].write_text(json.dumps({"dataframe_records": rows}))

    env = stack.full_env(s)
    fw_port, nolog_port, interval_port, ml_port = s.serving.port, free_port(), free_port(), free_port()
    procs, urls, cold = {}, {}, {}
    flywheel = [str(Path(sys.executable).parent / "flywheel"), "serve"]
    servers = (("flywheel", fw_port, {"FLYWHEEL_PREDICTION_LOG__DURABILITY": "group"}),
               ("flywheel-interval", interval_port, {"FLYWHEEL_PREDICTION_LOG__DURABILITY": "interval"}),
               ("flywheel-nolog", nolog_port, {"FLYWHEEL_PREDICTION_LOG__ENABLED": "false"}))
    ceiling_port = free_port()
    procs["ceiling"] = start([sys.executable, str(REPO / "bench" / "ceiling_app.py"), "--workers", str(args.workers)],
                             {**env, "FLYWHEEL_SERVING__PORT": str(ceiling_port), "PYTHONPATH": str(REPO)},
                             home / "ceiling.log")
    urls["ceiling"] = f"http://127.0.0.1:{ceiling_port}/predict"
    cold["ceiling"] = wait_predict(urls["ceiling"], bodies[("flywheel", 1)].read_bytes())
    for name, port, extra in servers:
        e = {**env, **extra, "FLYWHEEL_SERVING__PORT": str(port)}
        procs[name] = start(flywheel, e, home / f"{name}.log")
        urls[name] = f"http://127.0.0.1:{port}/predict"
        cold[name] = wait_predict(urls[name], bodies[("flywheel", 1)].read_bytes())
        console.print(f"{name}: first prediction after {cold[name]:.2f}s")
    e = {**env, "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri}
    procs["mlflow"] = start([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m",
                             f"models:/{rt.model_name}/{version}", "--env-manager", "local", "--host", "127.0.0.1",
                             "-p", str(ml_port), "--workers", str(args.workers)], e, home / "mlflow-serve.log")
    urls["mlflow"] = f"http://127.0.0.1:{ml_port}/invocations"
    cold["mlflow"] = wait_predict(urls["mlflow"], bodies[("mlflow", 1)].read_bytes(), 300)
    console.print(f"mlflow models serve: first prediction after {cold['mlflow']:.2f}s")

    results: dict[tuple[str, int, int], list[dict]] = {}
    order = ["flywheel", "mlflow", "flywheel-interval", "flywheel-nolog", "ceiling"]
    for batch in (1, 256):
        for conc in (1, 8, 32):
            for _ in range(args.reps):
                for name in order:
                    kind = "mlflow" if name == "mlflow" else "flywheel"
                    r = wrk(urls[name], bodies[(kind, batch)], conc, args.duration)
                    r["rss_mb"] = rss_mb(procs[name].pid)
                    results.setdefault((name, batch, conc), []).append(r)
                    console.print(f"batch {batch:>3} conc {conc:>2} {name:<15} {r['rps']:>8.0f} req/s "
                                  f"p99 {r['p99_ms']:.1f} ms errors {r['errors']}")
    for p in procs.values():
        stop(p)
    stack.stop_all(s)

    def agg(name: str, b: int, c: int) -> dict:
        runs = results[(name, b, c)]
        rps = sorted(r["rps"] for r in runs)[len(runs) // 2]
        return {"rps": rps, "rows_per_s": rps * b, "p50_ms": max(r["p50_ms"] for r in runs),
                "p99_ms": max(r["p99_ms"] for r in runs), "errors": sum(r["errors"] for r in runs),
                "rss_mb": max(r["rss_mb"] for r in runs)}

    table = Table(title=f"Serving: Flywheel (group commit / interval / log off) vs mlflow models serve and a bare "
                        f"ASGI ceiling, "
                        f"{args.workers} workers each")
    for col in ("batch", "conc", "server", "req/s", "rows/s", "p50 ms", "p99 ms", "errors", "RSS MB"):
        table.add_column(col, justify="right")
    summary = {}
    for b in (1, 256):
        for c in (1, 8, 32):
            for name in order:
                a = agg(name, b, c)
                summary[f"{name}_b{b}_c{c}"] = a
                table.add_row(str(b), str(c), name, f"{a['rps']:.0f}", f"{a['rows_per_s']:.0f}", f"{a['p50_ms']:.1f}",
                              f"{a['p99_ms']:.1f}", str(a["errors"]), f"{a['rss_mb']:.0f}")
    console.print(table)
    fw, ml, nolog = summary["flywheel_b1_c32"], summary["mlflow_b1_c32"], summary["flywheel-nolog_b1_c32"]
    ceiling = summary["ceiling_b1_c32"]
    print(json.dumps({
        "ratio_rows_per_s_vs_mlflow": round(fw["rows_per_s"] / ml["rows_per_s"], 2),
        "ratio_rows_per_s_vs_mlflow_b256_c32": round(summary["flywheel_b256_c32"]["rows_per_s"]
                                                     / summary["mlflow_b256_c32"]["rows_per_s"], 2),
        "p99_ms": fw["p99_ms"], "mlflow_p99_ms": ml["p99_ms"],
        "logging_on_vs_off": round(fw["rows_per_s"] / nolog["rows_per_s"], 3),
        "group_commit_vs_interval": round(fw["rows_per_s"] / summary["flywheel-interval_b1_c32"]["rows_per_s"], 3),
        "group_commit_vs_interval_b256_c32": round(summary["flywheel_b256_c32"]["rows_per_s"]
                                                   / summary["flywheel-interval_b256_c32"]["rows_per_s"], 3),
        "ratio_vs_ceiling": round(fw["rows_per_s"] / ceiling["rows_per_s"], 3),
        "ratio_vs_ceiling_b256_c32": round(summary["flywheel_b256_c32"]["rows_per_s"]
                                           / summary["ceiling_b256_c32"]["rows_per_s"], 3),
        "p99_over_p50": round(fw["p99_ms"] / max(fw["p50_ms"], 1e-9), 1),
        "ceiling_p99_over_p50": round(ceiling["p99_ms"] / max(ceiling["p50_ms"], 1e-9), 1),
        "cold_start_s": round(cold["flywheel"], 2), "mlflow_cold_start_s": round(cold["mlflow"], 2),
        "workers": args.workers, "errors": sum(v["errors"] for v in summary.values()),
        "results": summary,
    }))


if __name__ == "__main__":
    main()
