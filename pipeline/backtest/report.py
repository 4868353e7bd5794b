"""The backtest's answer: a CSV (one row per period), an HTML page with the plots embedded, and a summary dict
(the CLI's last JSON line): per model the mean and worst period AUC, and the loop's promotions, training gaps
and nightly cost."""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from pathlib import Path

import pandas as pd

from pipeline.backtest.run import MODELS

LABELS = {"loop": "loop (served by the server)", "frozen": "frozen bootstrap model",
          "scratch": "from-scratch retrain (same trainer)", "hgb_all": "HistGradientBoosting, all data",
          "hgb_last": "HistGradientBoosting, last K periods"}


def _longest_gap(trained: list) -> int:
    gap = best = 0
    for t in trained:
        gap = 0 if t else gap + 1
        best = max(best, gap)
    return best


def summarize(rows: list[dict], name: str, period_note: str, last_k: int, retrain_every: int) -> dict:
    out: dict = {"stream": name, "periods": len(rows), "period_note": period_note, "last_k": last_k,
                 "scratch_retrain_every": retrain_every}
    for m in MODELS:
        aucs = [r[f"{m}_auc"] for r in rows if r.get(f"{m}_auc") is not None]
        lls = [r[f"{m}_logloss"] for r in rows if r.get(f"{m}_logloss") is not None]
        out[m] = {"mean_auc": round(statistics.fmean(aucs), 4) if aucs else None,
                  "worst_auc": round(min(aucs), 4) if aucs else None,
                  "mean_logloss": round(statistics.fmean(lls), 4) if lls else None}
    refs = [out[m]["mean_auc"] for m in MODELS[1:] if out[m]["mean_auc"] is not None]
    loop = out["loop"]["mean_auc"]
    out["loop_minus_best_reference"] = round(loop - max(refs), 4) if refs and loop is not None else None
    secs = [r["nightly_s"] for r in rows]
    head, tail = secs[:3], secs[-3:]
    out |= {"promotions": sum(r["gate"] == "promoted" for r in rows),
            "trained": sum(bool(r["trained"]) for r in rows),
            "longest_run_without_training": _longest_gap([r["trained"] for r in rows]),
            "rollbacks": sum(bool(r.get("rolled_back")) for r in rows),
            "gate_outcomes": dict(pd.Series([r["gate"] for r in rows]).value_counts()) if rows else {},
            "loop_health": {status: sum(r.get("loop_health") == status for r in rows) for status in ("ok", "warn", "fail")},
            "nights_waiting_for_rows": sum(r.get("waiting_rows") is not None for r in rows),
            "nightly_s_first": secs[0] if secs else None, "nightly_s_last": secs[-1] if secs else None,
            "nightly_cost_ratio_last3_first3": round(statistics.median(tail) / statistics.median(head), 3)
            if secs and statistics.median(head) > 0 else None}
    out["gate_outcomes"] = {k: int(v) for k, v in out["gate_outcomes"].items()}
    return out


def _png(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["period"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for m in MODELS:
        style = {"linewidth": 2.5, "marker": "o"} if m == "loop" else {"linewidth": 1, "marker": "."}
        axes[0].plot(x, [math.nan if r[f"{m}_auc"] is None else r[f"{m}_auc"] for r in rows], label=LABELS[m],
                     **style)
        axes[1].plot(x, [math.nan if r[f"{m}_logloss"] is None else r[f"{m}_logloss"] for r in rows], **style)
    axes[0].set_title("AUC per period (test-then-train)")
    axes[1].set_title("log-loss per period")
    colors = ["tab:green" if r["gate"] == "promoted" else "tab:orange" if r["trained"] else "tab:red" for r in rows]
    axes[2].bar(x, [r["nightly_s"] for r in rows], color=colors,
                hatch=["//" if r.get("rolled_back") else "" for r in rows])
    axes[2].set_title("nightly s: green promoted, orange held, red untrained; hatched: champion rolled back",
                      fontsize=8)
    axes[0].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("period")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def write(rows: list[dict], summary: dict, out_dir: Path, title: str) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, page, png = out_dir / "backtest.csv", out_dir / "backtest.html", out_dir / "backtest.png"
    frame = pd.DataFrame(rows)
    frame.to_csv(csv, index=False)
    image = _png(rows)
    png.write_bytes(image)
    table = frame.drop(columns=[c for c in frame.columns if c.endswith("_ece") and not c.startswith("loop")])
    summary_rows = "".join(
        f"<tr><td>{html.escape(LABELS[m])}</td><td>{summary[m]['mean_auc']}</td><td>{summary[m]['worst_auc']}</td>"
        f"<td>{summary[m]['mean_logloss']}</td></tr>" for m in MODELS)
    page.write_text(
        f"<html><head><meta charset=utf-8><title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(summary['period_note'])}</p>"
        f"<p>Promotions {summary['promotions']}/{summary['periods']}, rollbacks by the online evaluation "
        f"{summary.get('rollbacks', 0)}, nights that trained {summary['trained']}, "
        f"longest run without training {summary['longest_run_without_training']} periods; nightly seconds first "
        f"{summary['nightly_s_first']}, last {summary['nightly_s_last']}.</p>"
        f"<table border=1 cellpadding=4><tr><th>model</th><th>mean AUC</th><th>worst AUC</th><th>mean log-loss</th>"
        f"</tr>{summary_rows}</table>"
        f"<img src='data:image/png;base64,{base64.b64encode(image).decode()}'>"
        f"{table.to_html(index=False, float_format=lambda v: f'{v:.4f}', na_rep='-')}</body></html>")
    return {"csv": str(csv), "html": str(page), "png": str(png)}
