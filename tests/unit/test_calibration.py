"""Calibration: fitted on a later slice, it repairs a miscalibrated model's log-loss and ECE without touching its
ranking, travels in the bundle, reaches every scoring path (predict, the server's batched net call, pyfunc), and
bundles from before it load as the identity."""

from __future__ import annotations

import json
from datetime import date
from types import SimpleNamespace

import numpy as np
import torch

from feature_store.spec import load_spec
from pipeline.checks.metrics import auc, ece, logloss
from pipeline.config import Settings
from pipeline.learn import calibration
from pipeline.learn.calibration import Calibration
from pipeline.learn.model import ModelBundle
from pipeline.learn.trainer import calibrate, fit, fit_increment
from tests.helpers import LOANS_SPEC, loans_frame

SPEC = load_spec(LOANS_SPEC)
CPU = torch.device("cpu")
LABEL = "defaulted"


def test_platt_recovers_a_known_affine_miscalibration():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20_000)
    y = (rng.uniform(size=len(z)) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(float)
    cal = calibration.fit(z, y, "platt")
    assert abs(cal.scale - 0.5) < 0.05 and abs(cal.shift + 1.0) < 0.08 and cal.rows == len(z)
    temp = calibration.fit(z, y, "temperature")
    assert temp.shift == 0.0 and 0 < temp.scale < 1
    # too few rows or one class: nothing to fit, the network's own scores stand
    assert calibration.fit(z[:10], y[:10], "platt", min_rows=50).identity
    assert calibration.fit(z, np.zeros_like(z), "platt").identity
    assert calibration.fit(z, y, "none").identity


def _trained_miscalibrated() -> ModelBundle:
    """A decent model whose logit is then pushed up and stretched: the scores rank as well, but lie."""
    frame = loans_frame(date(2026, 3, 1), 3000, seed=2)
    bundle = ModelBundle.create(SPEC, frame, embedding_dim=4, hidden=(8,), min_count=1, seed=0)
    fit(bundle, frame, LABEL, epochs=3, batch_size=64, lr=1e-2, seed=0, device=CPU)
    last = [m for m in bundle.net.mlp if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(3.0)
        last.bias.add_(2.0)
    return bundle


def test_calibration_repairs_log_loss_and_ece_and_keeps_auc():
    bundle = _trained_miscalibrated()
    later, test = loans_frame(date(2026, 3, 2), 1500, seed=3), loans_frame(date(2026, 3, 3), 3000, seed=4)
    y = test[LABEL].to_numpy(dtype=float)
    before = bundle.predict(test)
    cal = calibrate(bundle, later, LABEL, Settings(calibration="platt"))
    after = bundle.predict(test)
    assert bundle.calibration == cal and not cal.identity and cal.rows == 1500
    assert 0 < cal.scale < 1 and cal.shift < 0  # it undid the stretch and the upward push
    assert logloss(y, after) < logloss(y, before) - 0.1
    assert ece(y, after) < ece(y, before) / 2 and ece(y, after) < 0.05
    assert abs(auc(y, after) - auc(y, before)) < 1e-9
    assert abs(after.mean() - y.mean()) < 0.03 < abs(before.mean() - y.mean())


def test_calibration_round_trips_and_reaches_server_and_pyfunc(tmp_path):
    from pipeline.learn.pyfunc_model import FlywheelPyfunc
    from serving.scoring import score_columns

    bundle = _trained_miscalibrated()
    calibrate(bundle, loans_frame(date(2026, 3, 2), 1500, seed=3), LABEL, Settings())
    test = loans_frame(date(2026, 3, 3), 400, seed=4)
    expected = bundle.predict(test)
    path = bundle.save(tmp_path / "b")
    assert json.loads((path / "config.json").read_text())["calibration"]["scale"] == bundle.calibration.scale
    loaded = ModelBundle.load(path)
    assert loaded.calibration == bundle.calibration and loaded.weights_digest() == bundle.weights_digest()
    np.testing.assert_allclose(loaded.predict(test), expected, rtol=1e-6)
    cols = {c: test[c].astype(str).tolist() for c in loaded.categorical}
    cols |= {c: test[c].tolist() for c in loaded.numeric}
    np.testing.assert_allclose(score_columns(loaded, cols, len(test)), expected, rtol=1e-5)
    wrapper = FlywheelPyfunc()
    wrapper.load_context(SimpleNamespace(artifacts={"bundle": str(path)}))
    np.testing.assert_allclose(wrapper.predict(None, test), expected, rtol=1e-6)
    # the identity would have scored differently: the map is really applied on every path
    raw = 1 / (1 + np.exp(-loaded.raw_logits(*loaded.encode(test))))
    assert np.abs(raw - expected).max() > 0.05


def test_a_bundle_from_before_calibration_loads_as_the_identity(tmp_path):
    bundle = _trained_miscalibrated()
    test = loans_frame(date(2026, 3, 3), 300, seed=4)
    path = bundle.save(tmp_path / "old")
    config = json.loads((path / "config.json").read_text())
    del config["calibration"]
    (path / "config.json").write_text(json.dumps(config))
    old = ModelBundle.load(path)
    assert old.calibration == Calibration() and old.calibration.identity
    np.testing.assert_allclose(old.predict(test), bundle.predict(test), rtol=1e-6)


def test_a_warm_start_refits_its_own_calibration_on_the_validation_slice():
    parent = _trained_miscalibrated()
    calibrate(parent, loans_frame(date(2026, 3, 2), 1500, seed=3), LABEL, Settings())
    parent_map = parent.calibration
    s = Settings(epochs=2, batch_size=64, validation_fraction=0.2, early_stopping_patience=2)
    child_rows = loans_frame(date(2026, 3, 4), 1200, seed=6)
    result = fit_increment(parent, child_rows, LABEL, "applied_at", s, device=CPU)
    assert result.calibration == parent.calibration and result.calibration.rows == 240
    assert not result.calibration.identity and result.calibration != parent_map  # the slice moved the map
    # no validation slice (patience 0): nothing to fit on, the child keeps its parent's map rather than the
    # identity, which would describe its raw logits even less
    child_map = parent.calibration
    plain = fit_increment(parent, child_rows, LABEL, "applied_at", s.model_copy(update={"early_stopping_patience": 0}),
                          device=CPU)
    assert plain.calibration == child_map == parent.calibration and not plain.calibration.identity


def test_a_small_slice_moves_the_parent_map_by_its_evidence_only():
    """Logits whose true map is the identity, a parent map that knew it, and nights of 90 rows at a 10 % label
    rate: alone, Platt's two parameters chase each slice's noise; with the parent as a 200-row prior they stay
    near the truth. A large slice still overrules the prior."""
    rng = np.random.default_rng(3)
    parent = Calibration(1.0, 0.0, "platt", 800)
    alone, with_prior = [], []
    for _ in range(200):
        z = rng.normal(-2.6, 1.5, 90)
        y = (rng.uniform(size=90) < 1 / (1 + np.exp(-z))).astype(float)
        if 0 < y.sum() < 90:
            for out, cal in ((alone, calibration.fit(z, y)),
                             (with_prior, calibration.fit(z, y, prior=parent, prior_rows=200))):
                out.append(abs(cal.scale - 1.0) + abs(cal.shift))
    assert len(alone) > 150
    assert np.median(with_prior) < np.median(alone) / 2
    # no weight: the slice alone; too few rows: the parent's map as it is
    z = rng.normal(0, 2, 500)
    y = (rng.uniform(size=500) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(float)
    assert calibration.fit(z, y, prior=parent, prior_rows=0) == calibration.fit(z, y)
    assert calibration.fit(z[:10], y[:10], min_rows=50, prior=parent, prior_rows=200) == parent
    # 20,000 rows of a map far from the parent's: the prior barely holds it back
    z = rng.normal(0, 2, 20_000)
    y = (rng.uniform(size=len(z)) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(float)
    big = calibration.fit(z, y, prior=parent, prior_rows=200)
    assert abs(big.scale - 0.5) < 0.06 and abs(big.shift + 1.0) < 0.1 and big.rows == len(z)
