"""The reports a person opens (validation with its drift chart, evaluation, the demo's loop report) render in
real headless Chromium: no console error, no broken image, text on the page, a screenshot saved. The reports
come from the real stages on two days of the second spec, not from fixtures written for this test."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest

from pipeline.demo.run import DayRow, _report
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap
from pipeline.stages.nightly import run_nightly
from tests.browser import render
from tests.helpers import LOANS_SPEC, loans_frame
from tests.integration.test_pipeline_stages import DAY, log_day

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reports(tmp_path_factory, mlflow_server) -> dict[str, Path]:
    from tests.helpers import make_settings

    home = tmp_path_factory.mktemp("reports-home")
    s = make_settings(home / "home", mlflow_server[1], model_name="reports-browser", spec_path=LOANS_SPEC,
                      epochs=2, batch_size=64, max_auc_regression=0.5)
    rt = runtime(s)
    history = pd.concat([loans_frame(DAY - timedelta(days=d), 400, seed=1) for d in (3, 2, 1)])
    history.to_parquet(home / "history.parquet")
    bootstrap(home / "history.parquet", rt)
    for i in range(2):
        frame = loans_frame(DAY + timedelta(days=i), 500, seed=10 + i)
        if i:  # a shifted numeric on day 2, so the drift chart has something to show
            frame["amount"] = frame["amount"] * 3
        log_day(rt, frame)
        run_nightly(DAY + timedelta(days=i), rt)
    root = s.reports_dir
    day2 = root / "validation" / f"dt={(DAY + timedelta(days=1)).isoformat()}"
    demo = root / "demo.html"
    _report([DayRow("2026-03-10", "1", 500, 0.71, 0.69, 0.52, 0.55, "success", "2", True),
             DayRow("2026-03-11", "2", 480, 0.72, 0.68, 0.51, 0.56, "success", "3", True)], demo)
    return {"validation": day2 / "index.html",
            "evaluation": next(root.glob("evaluation/*/report.html")),
            "demo": demo}


@pytest.mark.parametrize("name", ["validation", "evaluation", "demo"])
def test_report_renders_in_chromium(reports, name, tmp_path):
    page = reports[name]
    assert page.is_file(), f"{name} report not written at {page}"
    shot = tmp_path / f"{name}.png"
    seen = render(page, shot)
    assert seen.errors == [], f"{name}: console errors {seen.errors}"
    assert seen.broken_images == [], f"{name}: broken images {seen.broken_images}"
    assert seen.images >= 1, f"{name}: no chart on the page"
    assert seen.text_chars > 100, f"{name}: page nearly empty ({seen.text_chars} characters)"
    assert shot.stat().st_size > 10_000, f"{name}: screenshot looks blank"
    if out := os.environ.get("FLYWHEEL_SCREENSHOTS_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out) / shot.name)
