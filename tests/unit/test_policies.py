"""The fresh drift challenger forgets the old weights, never the old ids."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd

from feature_store.spec import load_spec
from pipeline.config import Settings
from pipeline.learn.model import ModelBundle
from pipeline.learn.policies import fit_fresh, fit_refit
from tests.helpers import LOANS_SPEC, loans_frame


def test_a_fresh_model_keeps_every_id_its_parent_knew_and_adds_the_windows(tmp_path):
    spec = load_spec(LOANS_SPEC)
    s = Settings(home=tmp_path, epochs=1, bootstrap_min_steps=5, batch_size=64, vocab_min_count=1)
    parent = ModelBundle.create(spec, loans_frame(date(2026, 1, 1), 600, seed=1, regions=5), s.training.embedding_dim,
                                s.training.hidden_units, 1)
    window = loans_frame(date(2026, 1, 9), 400, seed=2, regions=1)  # a window that holds one region only
    window["region"] = "r_new"
    fresh, _ = fit_fresh(spec, window, None, s, known=parent)
    for c in spec.categorical:
        old = parent.vocabs[c].ids
        assert {v: fresh.vocabs[c].ids[v] for v in old} == old, f"{c}: an id changed meaning"
    assert "r_new" in fresh.vocabs["region"].ids
    assert fresh.net.embeddings[spec.categorical.index("region")].num_embeddings == fresh.vocabs["region"].size
    assert parent.vocabs["region"].ids.keys() == {f"r{i}" for i in range(5)}, "the parent was not touched"
    alone, _ = fit_fresh(spec, window, None, s)
    assert set(alone.vocabs["region"].ids) == {"r_new"}  # without a parent: only what the window holds


def test_a_refit_picks_its_epochs_on_the_newest_rows_then_trains_on_all_of_them(tmp_path):
    """The newest rows are the ones most like tomorrow's traffic: the validation slice that picked the epoch and
    fitted the calibration is trained on too, as bootstrap refits after measuring (scikit-learn's `refit`)."""
    spec = load_spec(LOANS_SPEC)
    s = Settings(home=tmp_path, bootstrap_min_steps=60, batch_size=64, validation_fraction=0.2,
                 early_stopping_patience=2)
    rows = pd.concat([loans_frame(date(2026, 1, d), 300, seed=d) for d in (1, 2, 3)], ignore_index=True)
    parent = ModelBundle.create(spec, rows.iloc[:300], s.training.embedding_dim, s.training.hidden_units, 1)
    bundle, result = fit_refit(spec, rows, s, known=parent)
    assert result.best_epoch is not None and result.val_losses  # an epoch was chosen on a validation slice
    assert result.epochs == result.best_epoch + 1 and result.samples == len(rows) * result.epochs  # every row
    assert not result.calibration.identity and result.calibration.rows == 180  # the newest fifth fitted it
    assert bundle.net.calibration == result.calibration
    for c in spec.categorical:  # the parent's ids as they are: admitting and expiring values is the nights' job
        assert bundle.vocabs[c].ids == parent.vocabs[c].ids and bundle.vocabs[c] is not parent.vocabs[c]
    assert np.isfinite(bundle.predict(rows.tail(50))).all()
