"""Drift against the reference window on a real local lake: identical days give PSI ~ 0, a shifted numeric
feature is severe, and `drift_action` decides whether that blocks the day."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from pipeline.checks.drift import DRIFT, psi
from pipeline.errors import GateFailed
from pipeline.stages.validate import VALIDATED, validate
from tests.unit.test_validate import make_rt, sim_day, write_training, write_validated


def test_psi_of_count_vectors():
    a = np.array([10.0, 20.0, 30.0, 40.0])
    assert psi(a, a) == 0.0 and psi(a, 3 * a) == pytest.approx(0.0)
    assert psi(a, a[::-1]) > 0.25


def _days(tmp_path: Path, shift: float, **overrides):
    ref_day, ref = sim_day(3, rows=3000)
    day = ref_day + timedelta(days=1)
    frame = ref.copy()
    frame["event_time"] = frame["event_time"] + timedelta(days=1)
    frame["served_at"] = frame["event_time"]
    frame["label_time"] = frame["label_time"] + timedelta(days=1)
    frame["price"] = frame["price"] * shift
    rt = make_rt(tmp_path / f"home-{shift}-{overrides.get('drift_action', 'warn')}", **overrides)
    write_validated(rt, ref_day, ref)
    write_training(rt, day, frame)
    return rt, day


def test_identical_distributions_give_psi_near_zero(tmp_path):
    rt, day = _days(tmp_path, shift=1.0, drift_action="block")
    result = validate(day, rt)
    stored = rt.lake.read_partition(DRIFT, day).to_pandas()
    assert set(stored.name) >= {"price", "position", "score", "device", "clicked"}
    assert stored.psi.max() < 1e-6 and (stored.severity == "none").all()
    assert result.passed and result.drift["max_psi"] < 1e-6 and result.drift["reference_days"]


def test_shifted_numeric_feature_is_severe_and_blocks_only_when_asked(tmp_path):
    rt, day = _days(tmp_path, shift=3.0, drift_action="warn")
    result = validate(day, rt)
    stored = rt.lake.read_partition(DRIFT, day).to_pandas().set_index("name")
    assert stored.loc["price", "psi"] > rt.settings.drift.psi_severe and stored.loc["price", "severity"] == "severe"
    assert stored.loc["position", "psi"] < rt.settings.drift.psi_warn
    assert result.passed and result.drift["severe"] == ["price"]
    assert any("severe drift in price" in w for w in result.warnings)
    directory = Path(result.report).parent
    assert (directory / "drift.png").stat().st_size > 1000 and "price" in (directory / "drift.html").read_text()

    blocking, day = _days(tmp_path, shift=3.0, drift_action="block")
    with pytest.raises(GateFailed, match="severe drift in price"):
        validate(day, blocking)
    assert blocking.lake.read_manifest(VALIDATED, day) is None
    assert blocking.lake.read_partition(DRIFT, day).num_rows == len(stored)  # the evidence is kept


def test_first_day_has_no_reference(tmp_path):
    day, frame = sim_day(2, rows=500)
    rt = make_rt(tmp_path / "home")
    write_training(rt, day, frame)
    result = validate(day, rt)
    assert result.drift["skipped"] and rt.lake.read_manifest(DRIFT, day)["inputs"]["skipped"]
    assert rt.lake.read_partition(DRIFT, day).num_rows == 0


def test_a_small_day_is_measured_not_judged(tmp_path):
    """PSI over a few dozen rows is mostly sampling noise: on a small day nothing is graded severe (so no drift
    night, and `block` does not fail it), the PSI is still stored, and the report says why."""
    ref_day, ref = sim_day(3, rows=3000)
    day = ref_day + timedelta(days=1)
    same = sim_day(3, rows=3000, seed=11)[1].head(60)  # the same distribution, a different sample of 60 rows
    for c in ("event_time", "served_at", "label_time"):
        same[c] = same[c] + timedelta(days=1)
    rt = make_rt(tmp_path / "home", drift_action="block")
    write_validated(rt, ref_day, ref)
    write_training(rt, day, same)
    result = validate(day, rt)
    stored = rt.lake.read_partition(DRIFT, day).to_pandas()
    assert stored.psi.max() > rt.settings.drift.psi_severe  # noise alone crosses the threshold on 60 rows
    assert (stored.severity == "none").all() and result.passed and not result.drift["severe"]
    assert "60 rows, fewer than drift.min_rows=200" in result.drift["skipped"]

    judged = make_rt(tmp_path / "judged", drift_action="block", drift_min_rows=50)
    write_validated(judged, ref_day, ref)
    write_training(judged, day, same)
    with pytest.raises(GateFailed, match="severe drift"):
        validate(day, judged)
