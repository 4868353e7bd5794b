from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from feature_store.spec import load_spec
from feature_store.vocab import OOV, Vocabulary
from pipeline.config import DEFAULT_SPEC
from pipeline.learn.model import ModelBundle
from pipeline.learn.trainer import fit
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


def test_expired_values_map_to_oov_keep_their_ids_and_return_when_seen_again():
    d = pd.Timestamp("2026-03-01").date()
    v = Vocabulary()
    v.update(["a", "b"], min_count=1, day=d)
    v.update(["b"], min_count=1, day=d + pd.Timedelta(days=4))
    assert v.expire(d + pd.Timedelta(days=3), 3) == []  # unseen exactly 3 days: still known
    assert v.expire(d + pd.Timedelta(days=4), 3) == ["a"]
    assert v.encode(["a", "b"]).tolist() == [OOV, 2] and v.size == 3  # the row is kept, not reused
    assert v.update(["c"], min_count=1, day=d + pd.Timedelta(days=5)) == ["c"]
    assert v.ids["c"] == 3
    again = Vocabulary.from_dict(v.to_dict())
    assert again.encode(["a"]).tolist() == [OOV] and again.retired == {"a": 1}
    assert again.update(["a"], min_count=1, day=d + pd.Timedelta(days=6)) == []  # revived, not re-admitted
    assert again.encode(["a", "b", "c"]).tolist() == [1, 2, 3] and again.size == 4
    assert Vocabulary().expire(d, 0) == [] and Vocabulary({"x": 1}).expire(d, 1) == []  # no record: seen today


def test_expiry_is_carried_by_the_bundle_into_serving(tmp_path):
    from serving.scoring import score_columns

    spec, frame, bundle = _bundle()
    d = pd.Timestamp("2026-03-01").date()
    bundle.grow_vocab(frame, min_count=1, day=d)
    later = frame.assign(region="r1")
    bundle.grow_vocab(later, min_count=1, day=d + pd.Timedelta(days=10))
    rows_before = bundle.vocabs["region"].size
    expired = bundle.expire_vocab(d + pd.Timedelta(days=10), 7)
    assert expired["region"] == bundle.vocabs["region"].size - 2 and bundle.vocabs["region"].size == rows_before
    loaded = ModelBundle.load(bundle.save(tmp_path / "b"))
    assert loaded.vocabs["region"].retired == bundle.vocabs["region"].retired
    probe = frame.head(20).assign(region="r0")
    unknown = probe.assign(region="never-seen")
    np.testing.assert_array_equal(loaded.predict(probe), loaded.predict(unknown))  # r0 expired: the OOV row
    cols = {c: probe[c].tolist() for c in spec.feature_names}
    np.testing.assert_allclose(score_columns(loaded, cols, len(probe)), loaded.predict(unknown), rtol=1e-6)
    assert not np.array_equal(loaded.predict(probe.assign(region="r1")), loaded.predict(unknown))


def test_streamed_vocab_growth_gives_the_ids_of_the_whole_frame():
    spec, frame, a = _bundle()
    _, _, b = _bundle()
    new = frame.assign(account_no=[f"n{i % 37}" for i in range(len(frame))])
    a.grow_vocab(new, min_count=3)
    b.grow_vocab((new.iloc[i:i + 50] for i in range(0, len(new), 50)), min_count=3)
    assert a.vocabs["account_no"].ids == b.vocabs["account_no"].ids
