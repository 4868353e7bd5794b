"""Reference models scored on the same rows as the loop, each trained only on labels known before the period:
a from-scratch retrain by the loop's own trainer (what the loop would reach if it retrained on everything every
night) and scikit-learn's HistGradientBoosting refit on all data and on the last K periods (is the neural loop
competitive on this data at all?)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from threadpoolctl import threadpool_limits

from feature_store.spec import FeatureSpec
from pipeline.config import Settings
from pipeline.learn.model import ModelBundle
from pipeline.learn.trainer import first_epochs, fit, pick_device

MAX_CODES = 254  # HistGradientBoosting's categorical limit (max_bins 255, one left for missing)


def scratch_model(spec: FeatureSpec, frame: pd.DataFrame, s: Settings) -> ModelBundle:
    """Trained as bootstrap trains the first champion (same bundle, epoch rule, optimizer settings)."""
    bundle = ModelBundle.create(spec, frame, s.training.embedding_dim, s.training.hidden_units, s.training.vocab_min_count, s.seed,
                                numeric_clip=s.training.numeric_clip)
    epochs = first_epochs(s, len(frame))
    fit(bundle, frame, spec.label.name, epochs=epochs, batch_size=s.training.batch_size, lr=s.training.learning_rate, seed=s.seed,
        device=pick_device())
    return bundle


class GradientBoosted:
    """HistGradientBoosting on the spec's features: numerics as they are, each categorical as codes of its most
    frequent values in the training rows (rarer and unseen values are missing, which the trees handle)."""

    def __init__(self, spec: FeatureSpec, seed: int) -> None:
        self.spec, self.seed = spec, seed
        self.codes: dict[str, dict[object, int]] = {}
        self.model: HistGradientBoostingClassifier | None = None

    def _matrix(self, frame: pd.DataFrame) -> np.ndarray:
        cols = []
        for name in self.spec.feature_names:
            if name in self.codes:
                cols.append(frame[name].map(self.codes[name]).to_numpy(dtype=np.float64, na_value=np.nan))
            else:
                cols.append(pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan))
        return np.column_stack(cols)

    def fit(self, frame: pd.DataFrame) -> GradientBoosted:
        cats = set(self.spec.categorical)
        self.codes = {c: {v: i for i, v in enumerate(frame[c].value_counts().index[:MAX_CODES])}
                      for c in self.spec.feature_names if c in cats}
        mask = [c in cats for c in self.spec.feature_names]
        y = frame[self.spec.label.name].to_numpy(dtype=np.int64)
        self.model = HistGradientBoostingClassifier(categorical_features=mask if any(mask) else None,
                                                    random_state=self.seed)
        if len(np.unique(y)) < 2:
            self.model = None
            self.constant = float(y.mean()) if len(y) else 0.5
            return self
        with threadpool_limits(limits=1, user_api="openmp"):  # a few thousand rows: threads only contend
            self.model.fit(self._matrix(frame), y)
        return self

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        if self.model is None:
            return np.full(len(frame), self.constant)
        with threadpool_limits(limits=1, user_api="openmp"):
            return self.model.predict_proba(self._matrix(frame))[:, 1]
