"""Incremental training vs full retraining on drifting streams (issue 5): quality and nightly cost.

Replays a stream day by day, test-then-train: every model scores day D before it may learn from it. Strategies:
  a frozen   the day-0 model, never updated
  b full     retrained from scratch on all history every night (the quality reference; cost grows)
  c warm     warm start from last night's model on the new day only
  d replay   warm start on the new day plus a sample of the replay reservoir (what `pipeline/stages/train.py` does)
Two streams: the demo simulator (pipeline/demo/simulate.py) and River's Agrawal generator pushed through three concept
drifts (bench/specs/agrawal.yaml), so the method is checked on a stream it was not designed around. Everything
runs in-process with the project's own ModelBundle / fit / replay code and default settings; no MLflow, no Airflow.

    .venv/bin/python bench/incremental.py            # 31 days x 4000 rows, both streams, a few minutes on 2 cores

Prints a table per stream, writes bench/results/incremental.{png,json}, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from feature_store.offline import Lake  # noqa: E402
from feature_store.spec import FeatureSpec, load_spec  # noqa: E402
from pipeline.checks.metrics import summary  # noqa: E402
from pipeline.config import DEFAULT_SPEC, Settings, locate  # noqa: E402
from pipeline.demo.simulate import Simulator  # noqa: E402
from pipeline.learn import replay  # noqa: E402
from pipeline.learn.model import ModelBundle  # noqa: E402
from pipeline.learn.trainer import first_epochs, fit, fit_increment  # noqa: E402

STRATEGIES = {"a": "frozen day-0", "b": "full retrain", "c": "warm, new day only", "d": "warm + replay"}
START = date(2026, 1, 1)


@dataclass
class Stream:
    name: str
    spec: FeatureSpec
    day: Callable[[int], pd.DataFrame]


def simulator_stream(rows: int, seed: int) -> Stream:
    sim = Simulator(seed=seed, rows_per_day=rows, start=START)
    return Stream("simulator", load_spec(DEFAULT_SPEC), lambda i: sim.day(i).drop(columns=["feedback_delay_s"]))


def agrawal_stream(rows: int, days: int, seed: int) -> Stream:
    """River's Agrawal generator moving through classification functions 1 -> 2 -> 4 -> 6 (abrupt-ish drifts,
    one day wide, at about a quarter, half and three quarters of the run), 5% feature perturbation."""
    from river.datasets import synth

    def agrawal(f: int, s: int) -> synth.Agrawal:
        return synth.Agrawal(classification_function=f, seed=seed * 10 + s, balance_classes=False, perturbation=0.05)

    cuts = [max(1, days * k // 4) * rows for k in (1, 2, 3)]
    stream = synth.ConceptDriftStream(
        agrawal(1, 0), synth.ConceptDriftStream(
            agrawal(2, 1), synth.ConceptDriftStream(agrawal(4, 2), agrawal(6, 3), position=cuts[2] - cuts[1],
                                                    width=rows, seed=seed),
            position=cuts[1] - cuts[0], width=rows, seed=seed),
        position=cuts[0], width=rows, seed=seed)
    xs = list(itertools.islice(stream, rows * days))
    spec = load_spec(ROOT / "bench" / "specs" / "agrawal.yaml")
    frame = pd.DataFrame([x for x, _ in xs])
    frame["approved"] = [int(y) for _, y in xs]
    for c in spec.categorical:
        frame[c] = frame[c].astype(str)
    for c in spec.numeric:
        frame[c] = frame[c].astype("float64")

    def day(i: int) -> pd.DataFrame:
        part = frame.iloc[i * rows:(i + 1) * rows].reset_index(drop=True)
        base = pd.Timestamp(datetime.combine(START + timedelta(days=i), datetime.min.time(), tzinfo=UTC))
        seconds = np.sort(np.random.default_rng([seed, i]).uniform(0, 86400, len(part)))
        return part.assign(event_time=base + pd.to_timedelta(seconds, unit="s"))

    return Stream("agrawal", spec, day)


@dataclass
class Track:
    auc: list[float] = field(default_factory=list)
    logloss: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    history_rows: list[int] = field(default_factory=list)
    train_rows: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)


def full_fit(spec: FeatureSpec, frame: pd.DataFrame, s: Settings) -> tuple[ModelBundle, int]:
    """Train from scratch the way bootstrap does (same epoch rule), so (a) and (b) are the project's own models."""
    bundle = ModelBundle.create(spec, frame, s.training.embedding_dim, s.training.hidden_units, s.training.vocab_min_count, s.seed)
    epochs = first_epochs(s, len(frame))
    fit(bundle, frame, spec.label.name, epochs=epochs, batch_size=s.training.batch_size, lr=s.training.learning_rate, seed=s.seed)
    return bundle, epochs


def run_stream(stream: Stream, days: int, s: Settings, lake_dir: Path) -> dict[str, Track]:
    spec, label, et = stream.spec, stream.spec.label.name, stream.spec.event_time
    columns = [*spec.feature_names, et, label]
    policy = replay.ReplayPolicy.from_settings(s)
    lake = Lake(str(lake_dir / stream.name))
    day0 = stream.day(0)[columns]
    frozen, _ = full_fit(spec, day0, s)
    replay.update(lake, START, day0, columns, label, policy)
    models = {"a": frozen, "b": frozen, "c": copy.deepcopy(frozen), "d": copy.deepcopy(frozen)}
    history = [day0]
    tracks = {k: Track() for k in STRATEGIES}
    for i in range(1, days):
        today, d = stream.day(i)[columns], START + timedelta(days=i)
        y = today[label].to_numpy(dtype=np.float64)
        for k, m in models.items():
            m_summary = summary(y, m.predict(today))
            tracks[k].auc.append(m_summary["auc"] if m_summary["auc"] is not None else float("nan"))
            tracks[k].logloss.append(m_summary["logloss"])
        history.append(today)
        hist_rows = sum(len(h) for h in history)

        t0 = time.process_time()
        models["b"], epochs = full_fit(spec, pd.concat(history, ignore_index=True), s)
        record(tracks["b"], time.process_time() - t0, hist_rows, hist_rows, epochs)

        t0 = time.process_time()
        models["c"].grow_vocab(today, s.training.vocab_min_count, s.seed)
        r = fit_increment(models["c"], today, label, et, s)
        record(tracks["c"], time.process_time() - t0, hist_rows, r.samples // max(r.epochs, 1), r.epochs)

        t0 = time.process_time()
        models["d"].grow_vocab(today, s.training.vocab_min_count, s.seed)
        past = replay.read_before(lake, d)
        sample, weight = replay.sample(past, replay.replay_rows_for(len(today), policy), label, d, policy)
        r = fit_increment(models["d"], today, label, et, s, replay=sample, replay_weight=weight)
        replay.update(lake, d, today, columns, label, policy, previous=past)
        record(tracks["d"], time.process_time() - t0, hist_rows, r.samples // max(r.epochs, 1), r.epochs)
        print(f"[{stream.name}] day {i:>2}: " + "  ".join(
            f"{k} auc={tracks[k].auc[-1]:.4f}" for k in STRATEGIES)
            + f"  train s: b={tracks['b'].seconds[-1]:.2f} d={tracks['d'].seconds[-1]:.2f}", flush=True)
    return tracks


def record(track: Track, seconds: float, history_rows: int, train_rows: int, epochs: int) -> None:
    track.epochs.append(epochs)
    track.seconds.append(seconds)
    track.history_rows.append(history_rows)
    track.train_rows.append(train_rows)


def cost_ratio(seconds: list[float], k: int = 5) -> float:
    """Last nights over first nights, medians of k each: one night's CPU time moves with early stopping (1 to
    `epochs` epochs) and with the other users of a shared machine, so single nights are compared too coarsely."""
    k = min(k, max(1, len(seconds) // 2))
    return statistics.median(seconds[-k:]) / statistics.median(seconds[:k])


def stats(t: Track) -> dict[str, float]:
    auc = np.array(t.auc, dtype=float)
    out = {"mean_auc": float(np.nanmean(auc)), "worst_auc": float(np.nanmin(auc)),
           "mean_logloss": float(np.mean(t.logloss)), "worst_logloss": float(np.max(t.logloss)),
           "mean_train_s": 0.0, "first_train_s": 0.0, "last_train_s": 0.0, "cost_ratio_last_vs_first": 0.0}
    if t.seconds:  # the frozen model never trains after day 0
        out |= {"mean_train_s": float(np.mean(t.seconds)), "first_train_s": float(t.seconds[0]),
                "last_train_s": float(t.seconds[-1]), "cost_ratio_last_vs_first": cost_ratio(t.seconds),
                "mean_epochs": float(np.mean(t.epochs)),
                "work_ratio_last_vs_first": cost_ratio([r * e for r, e in zip(t.train_rows, t.epochs, strict=True)]),
                "cost_per_epoch_ratio_last_vs_first": cost_ratio([x / e for x, e in zip(t.seconds, t.epochs,
                                                                                        strict=True)])}
    return out


def report(results: dict[str, dict[str, Track]], out: Path) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    summary_out: dict[str, dict] = {}
    for name, tracks in results.items():
        table = Table(title=f"{name}: {len(tracks['a'].auc)} test-then-train days")
        for col in ("strategy", "mean AUC", "worst AUC", "mean log-loss", "worst log-loss", "train CPU s/night",
                    "first night s", "last night s", "last/first"):
            table.add_column(col, justify="right" if col != "strategy" else "left")
        summary_out[name] = {}
        for k, t in tracks.items():
            st = stats(t)
            summary_out[name][k] = st
            table.add_row(f"({k}) {STRATEGIES[k]}", f"{st['mean_auc']:.4f}", f"{st['worst_auc']:.4f}",
                          f"{st['mean_logloss']:.4f}", f"{st['worst_logloss']:.4f}", f"{st['mean_train_s']:.2f}",
                          f"{st['first_train_s']:.2f}", f"{st['last_train_s']:.2f}",
                          "-" if k == "a" else f"{st['cost_ratio_last_vs_first']:.2f}")
        console.print(table)
    plot(results, out / "incremental.png")
    per_day = {name: {k: {"auc": t.auc, "logloss": t.logloss, "seconds": t.seconds, "history_rows": t.history_rows,
                          "train_rows": t.train_rows, "epochs": t.epochs} for k, t in tracks.items()} for name, tracks in results.items()}
    (out / "incremental.json").write_text(json.dumps({"summary": summary_out, "per_day": per_day}, indent=1))
    return summary_out


def plot(results: dict[str, dict[str, Track]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 8), squeeze=False)
    for j, (name, tracks) in enumerate(results.items()):
        for k, t in tracks.items():
            days = range(1, len(t.auc) + 1)
            axes[0][j].plot(days, t.auc, label=f"({k}) {STRATEGIES[k]}")
            if k != "a":
                axes[1][j].plot(t.history_rows, t.seconds, marker=".", label=f"({k}) {STRATEGIES[k]}")
        axes[0][j].set(title=f"{name}: AUC on each new day (test, then train)", xlabel="day", ylabel="AUC")
        axes[1][j].set(title=f"{name}: training CPU seconds per night", xlabel="history rows", ylabel="seconds")
        axes[0][j].legend(fontsize=8)
        axes[1][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--days", type=int, default=31, help="stream days; day 0 trains the first model")
    ap.add_argument("--rows-per-day", type=int, default=4000)
    ap.add_argument("--streams", default="simulator,agrawal")
    ap.add_argument("--seed", type=int, default=0, help="stream seed (training uses Settings().seed)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    s = Settings()
    # One thread and process CPU time: the other users of a shared machine then barely move the measured cost.
    torch.set_num_threads(1)
    makers = {"simulator": lambda: simulator_stream(args.rows_per_day, args.seed),
              "agrawal": lambda: agrawal_stream(args.rows_per_day, args.days, args.seed)}
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.streams.split(","):
            results[name] = run_stream(makers[name](), args.days, s, Path(tmp))
    summ = report(results, args.out)
    gap = {n: float(np.nanmean(np.array(r["d"].auc) - np.array(r["b"].auc))) for n, r in results.items()}
    gap_frozen = {n: float(np.nanmean(np.array(r["d"].auc) - np.array(r["a"].auc))) for n, r in results.items()}
    line = {
        "bench": "incremental", "days": args.days, "rows_per_day": args.rows_per_day,
        "auc_gap_vs_full": float(np.mean(list(gap.values()))),
        "auc_gap_vs_full_worst_stream": min(gap.values()),
        "auc_gap_vs_frozen": float(np.mean(list(gap_frozen.values()))),
        "cost_ratio_night_last_vs_first": {
            "d": max(summ[n]["d"]["cost_ratio_last_vs_first"] for n in results),
            "b": min(summ[n]["b"]["cost_ratio_last_vs_first"] for n in results)},
        "streams": {n: {"auc_gap_vs_full": gap[n], "auc_gap_vs_frozen": gap_frozen[n],
                        **{f"mean_auc_{k}": round(summ[n][k]["mean_auc"], 4) for k in STRATEGIES},
                        **{f"mean_logloss_{k}": round(summ[n][k]["mean_logloss"], 4) for k in STRATEGIES},
                        "cost_ratio_d": round(summ[n]["d"]["cost_ratio_last_vs_first"], 3),
                        "cost_ratio_b": round(summ[n]["b"]["cost_ratio_last_vs_first"], 3),
                        "mean_epochs_d": round(summ[n]["d"]["mean_epochs"], 2),
                        "cost_per_epoch_ratio_d": round(summ[n]["d"]["cost_per_epoch_ratio_last_vs_first"], 3),
                        "cost_per_epoch_ratio_b": round(summ[n]["b"]["cost_per_epoch_ratio_last_vs_first"], 3),
                        "work_ratio_d": round(summ[n]["d"]["work_ratio_last_vs_first"], 3),
                        "work_ratio_b": round(summ[n]["b"]["work_ratio_last_vs_first"], 3)}
                    for n in results},
        "settings": {k: getattr(getattr(s, section), field) for k in (
            "epochs", "learning_rate", "batch_size", "replay_rows", "replay_ratio", "replay_half_life_days",
            "anchor_l2", "early_stopping_patience", "validation_fraction") for section, field in [locate(k)]},
        "cost_per_epoch_ratio_last_vs_first": {  # early stopping varies epochs per night; this factors it out
            "d": max(summ[n]["d"]["cost_per_epoch_ratio_last_vs_first"] for n in results),
            "b": min(summ[n]["b"]["cost_per_epoch_ratio_last_vs_first"] for n in results)},
        "work_ratio_night_last_vs_first": {  # rows x epochs trained: the cost without timing noise
            "d": max(summ[n]["d"]["work_ratio_last_vs_first"] for n in results),
            "b": min(summ[n]["b"]["work_ratio_last_vs_first"] for n in results)},
        "cost_ratio_single_night": {k: {n: round(r[k].seconds[-1] / r[k].seconds[0], 3) for n, r in results.items()}
                                    for k in ("b", "d")},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
