from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from feature_store.spec import load_spec
from feature_store.vocab import OOV, Vocabulary
from pipeline.config import DEFAULT_SPEC
from pipeline.model import ModelBundle
from pipeline.trainer import fit
from tests.helpers import LOANS_SPEC, loans_frame


def test_vocabulary_admits_after_min_count_and_keeps_ids():
    v = Vocabulary()
    assert v.update(["a", "a", "b"], min_count=2) == ["a"]
    assert v.encode(["a", "b", "zzz"]).tolist() == [1, OOV, OOV]
    assert v.update(["b", "c", "c"], min_count=2) == ["b", "c"]
    assert v.encode(["a", "b", "c"]).tolist() == [1, 2, 3]
    assert Vocabulary.from_dict(v.to_dict()).encode(["c", "a"]).tolist() == [3, 1]


def _bundle(seed=1):
    spec = load_spec(LOANS_SPEC)
    frame = loans_frame(pd.Timestamp("2026-03-01").date(), 400, seed)
    return spec, frame, ModelBundle.create(spec, frame, embedding_dim=4, hidden=(8,), min_count=1)


def test_grow_keeps_old_rows_and_gives_new_values_their_own_rows():
    spec, frame, bundle = _bundle()
    fit(bundle, frame, "defaulted", epochs=1, batch_size=64, lr=1e-2, seed=0, device=torch.device("cpu"))
    idx = spec.categorical.index("region")
    old = bundle.net.embeddings[idx].weight.detach().clone()
    new = frame.assign(region="r-new", account_no=[f"new{i % 7}" for i in range(len(frame))])
    added = bundle.grow_vocab(new, min_count=1)
    assert added["region"] == 1 and added["account_no"] == 7
    grown = bundle.net.embeddings[idx].weight.detach()
    assert grown.shape[0] == old.shape[0] + 1
    assert torch.equal(grown[: old.shape[0]], old)
    codes = bundle.encode(new)[0][:, idx]
    assert set(codes.tolist()) == {bundle.vocabs["region"].ids["r-new"]}  # its own id, not the OOV bucket
    p = bundle.predict(new)
    assert np.all(np.isfinite(p))


def test_save_load_roundtrip_is_exact_and_spec_checked(tmp_path):
    spec, frame, bundle = _bundle()
    before = bundle.predict(frame)
    loaded = ModelBundle.load(bundle.save(tmp_path / "b"))
    np.testing.assert_array_equal(loaded.predict(frame), before)
    assert loaded.weights_digest() == bundle.weights_digest()
    ctr = load_spec(DEFAULT_SPEC)
    with pytest.raises(ValueError, match="spec digest"):
        loaded.check_spec(ctr)


def test_training_is_deterministic_under_seed_and_learns():
    spec, frame, a = _bundle()
    _, _, b = _bundle()
    ra = fit(a, frame, "defaulted", epochs=3, batch_size=64, lr=1e-2, seed=3, device=torch.device("cpu"))
    rb = fit(b, frame, "defaulted", epochs=3, batch_size=64, lr=1e-2, seed=3, device=torch.device("cpu"))
    assert ra.losses == rb.losses
    assert ra.losses[-1] < ra.losses[0]


def test_refuses_to_train_on_nothing():
    spec, frame, bundle = _bundle()
    with pytest.raises(ValueError, match="zero rows"):
        fit(bundle, frame.iloc[:0], "defaulted", epochs=1, batch_size=8, lr=1e-2, seed=0)


def test_category_values_are_canonical_across_types():
    v = Vocabulary()
    v.update(pd.Series([7.0, 7.0, 8.5]), min_count=1)
    assert v.encode([7, "7", 7.0, 8.5, None]).tolist() == [1, 1, 1, 2, OOV]


def test_numeric_outliers_are_clipped_identically_offline_and_online(tmp_path):
    from serving.scoring import score_columns

    spec, frame, bundle = _bundle()
    wild = frame.head(3).copy()
    wild["amount"] = [1e12, -1e12, float("nan")]
    _, num = bundle.encode(wild)
    j = bundle.numeric.index("amount")
    assert num[:, j].tolist() == [bundle.numeric_clip, -bundle.numeric_clip, 0.0]
    cols = {c: wild[c].tolist() for c in spec.feature_names}
    np.testing.assert_allclose(score_columns(bundle, cols, 3), bundle.predict(wild), rtol=1e-6)
    assert ModelBundle.load(bundle.save(tmp_path / "b")).numeric_clip == bundle.numeric_clip
