"""The evaluation report a reviewer opens from the model version: every gate check with its numbers, the
reliability plot and per-slice AUC, as one self-contained HTML file (plots embedded) plus the PNGs beside it."""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from pipeline.checks.gate import Check, Interval, SliceMetrics
from pipeline.checks.metrics import reliability


def _reliability_png(y: np.ndarray, scores: dict[str, np.ndarray], bins: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfectly calibrated")
    for name, p in scores.items():
        if not np.all(np.isfinite(p)):
            continue
        mean_p, rate, counts = reliability(y, p, bins)
        full = counts > 0
        ax.plot(mean_p[full], rate[full], marker="o", label=name)
    ax.set(xlabel="mean predicted score", ylabel="observed positive rate", xlim=(0, 1), ylim=(0, 1),
           title="Reliability (holdout)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _slices_png(slices: list[SliceMetrics], path: Path) -> Path | None:
    shown = [s for s in slices if s.candidate_auc is not None]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(shown) + 1.5))
    pos = np.arange(len(shown))
    ax.barh(pos - 0.2, [s.champion_auc for s in shown], height=0.4, label="champion")
    ax.barh(pos + 0.2, [s.candidate_auc for s in shown], height=0.4, label="candidate")
    ax.set_yticks(pos, [f"{s.slice}={s.value} (n={s.rows})" for s in shown])
    ax.set(xlabel="AUC", xlim=(0.0, 1.0), title="AUC per slice (holdout)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _img(path: Path | None) -> str:
    if path is None:
        return "<p>No slice has both classes: nothing to plot.</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{path.name}" src="data:image/png;base64,{data}">'


def _fmt(v: object) -> str:
    return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def _ci(ci: Interval | None) -> str:
    return "n/a" if ci is None else f"{ci.estimate:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]"


def write_report(directory: Path, *, title: str, passed: bool, reason: str, checks: list[Check],
                 candidate: dict, champion: dict, eces: dict[str, float], auc_ci: Interval | None,
                 logloss_ci: Interval | None, slices: list[SliceMetrics], y: np.ndarray,
                 scores: dict[str, np.ndarray], bins: int) -> Path:
    """Write report.html, reliability.png and slices.png into `directory`; returns the HTML path."""
    directory.mkdir(parents=True, exist_ok=True)
    rel = _reliability_png(y, scores, bins, directory / "reliability.png")
    sl = _slices_png(slices, directory / "slices.png")
    metric_rows = "".join(
        f"<tr><td>{k}</td><td>{_fmt(candidate.get(k))}</td><td>{_fmt(champion.get(k))}</td></tr>"
        for k in ("auc", "logloss", "rows", "mean_score", "label_rate"))
    metric_rows += f"<tr><td>ece</td><td>{_fmt(eces['candidate'])}</td><td>{_fmt(eces['champion'])}</td></tr>"
    check_rows = "".join(
        f"<tr class={'ok' if c.passed else 'bad'}><td>{html.escape(c.name)}</td>"
        f"<td>{'pass' if c.passed else 'FAIL'}</td><td>{html.escape(c.detail)}</td></tr>" for c in checks)
    slice_rows = "".join(
        f"<tr><td>{html.escape(s.slice)}</td><td>{html.escape(s.value)}</td><td>{s.rows}</td><td>{s.positives}</td>"
        f"<td>{_fmt(s.candidate_auc)}</td><td>{_fmt(s.champion_auc)}</td><td>{_ci(s.auc_diff)}</td>"
        f"<td>{'yes' if s.gated else 'no (too small or one class)'}</td></tr>" for s in slices)
    verdict = "PASSED" if passed else "FAILED"
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}.ok td:nth-child(2){{color:green}}
.bad td:nth-child(2){{color:#b00;font-weight:bold}}h1 span{{color:{'green' if passed else '#b00'}}}</style></head>
<body><h1>{html.escape(title)}: <span>{verdict}</span></h1><p>{html.escape(reason)}</p>
<h2>Gate checks</h2><table><tr><th>check</th><th>result</th><th>detail</th></tr>{check_rows}</table>
<h2>Holdout metrics</h2><table><tr><th>metric</th><th>candidate</th><th>champion</th></tr>{metric_rows}</table>
<p>Paired bootstrap, candidate minus champion: AUC {_ci(auc_ci)}; log-loss {_ci(logloss_ci)}.</p>
<h2>Calibration</h2>{_img(rel)}
<h2>Slices</h2><table><tr><th>slice</th><th>value</th><th>rows</th><th>positives</th><th>candidate AUC</th>
<th>champion AUC</th><th>AUC diff CI</th><th>gated</th></tr>{slice_rows}</table>{_img(sl)}
</body></html>"""
    out = directory / "report.html"
    out.write_text(doc)
    return out
