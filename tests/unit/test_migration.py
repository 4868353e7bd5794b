"""Declared feature-spec migrations on warm start: the parent's weights follow their features, new inputs start
at zero (same predictions at step 0), and any difference the spec does not declare is refused by name."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from feature_store.spec import load_spec
from pipeline.errors import SpecError
from pipeline.learn.model import ModelBundle
from pipeline.learn.trainer import fit
from tests.helpers import LOANS_SPEC, loans_frame

DAY = pd.Timestamp("2026-03-01").date()


def _spec(tmp_path, mutate, name="spec.yaml"):
    data = yaml.safe_load(LOANS_SPEC.read_text())
    mutate(data)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_spec(path)


def _parent():
    spec = load_spec(LOANS_SPEC)
    frame = loans_frame(DAY, 400, seed=1)
    bundle = ModelBundle.create(spec, frame, embedding_dim=4, hidden=(8,), min_count=1)
    fit(bundle, frame, "defaulted", epochs=2, batch_size=64, lr=1e-2, seed=0, device=torch.device("cpu"))
    return bundle, frame


def _add(data):
    data["features"]["channel"] = {"type": "categorical"}
    data["features"]["credit_score"] = {"type": "numeric"}
    data["migrations"] = [{"added": ["channel", "credit_score"], "description": "new upstream fields"}]


def test_added_features_start_at_zero_so_step_zero_predictions_are_the_parents(tmp_path):
    parent, frame = _parent()
    before = parent.predict(frame)
    spec = _spec(tmp_path, _add)
    rng = np.random.default_rng(0)
    wider = frame.assign(channel=rng.choice(["web", "app", "branch"], len(frame)),
                         credit_score=rng.normal(600, 50, len(frame)))
    bundle = ModelBundle.load(parent.save(tmp_path / "parent"))
    plan = bundle.migrate_to(spec, seed=3, numeric_stats={"credit_score": (600.0, 50.0)})
    assert plan is not None and plan.added == ["channel", "credit_score"] and plan.removed == []
    assert bundle.spec_digest == spec.digest and bundle.categorical == spec.categorical
    bundle.check_spec(spec)
    np.testing.assert_allclose(bundle.predict(wider), before, rtol=1e-6)
    assert bundle.norm["credit_score"] == (600.0, 50.0) and bundle.optimizer_state is None

    bundle.grow_vocab(wider, min_count=1)
    j = spec.numeric.index("credit_score")
    column = len(spec.categorical) * bundle.embedding_dim + j
    result = fit(bundle, wider, "defaulted", epochs=2, batch_size=64, lr=1e-2, seed=0, device=torch.device("cpu"))
    assert all(np.isfinite(result.losses))
    assert float(bundle.net.mlp[0].weight[:, column].abs().sum()) > 0  # the new input is being learned
    loaded = ModelBundle.load(bundle.save(tmp_path / "migrated"))
    np.testing.assert_array_equal(loaded.predict(wider), bundle.predict(wider))


def test_removed_feature_drops_its_weights_and_keeps_the_others(tmp_path):
    parent, frame = _parent()

    def drop(data):
        del data["features"]["product"]
        data["migrations"] = [{"removed": ["product"]}]

    spec = _spec(tmp_path, drop)
    bundle = ModelBundle.load(parent.save(tmp_path / "parent"))
    plan = bundle.migrate_to(spec)
    assert plan.removed == ["product"] and "product" not in bundle.vocabs
    d = bundle.embedding_dim
    old_w, new_w = parent.net.mlp[0].weight, bundle.net.mlp[0].weight
    assert new_w.shape[1] == old_w.shape[1] - d
    k = parent.categorical.index("product")
    torch.testing.assert_close(new_w, torch.cat([old_w[:, :k * d], old_w[:, (k + 1) * d:]], dim=1))
    r = spec.categorical.index("region")
    torch.testing.assert_close(bundle.net.embeddings[r].weight,
                               parent.net.embeddings[parent.categorical.index("region")].weight)
    assert np.all(np.isfinite(bundle.predict(frame.drop(columns=["product"]))))


def test_renamed_feature_keeps_its_weights_and_vocabulary(tmp_path):
    parent, frame = _parent()

    def rename(data):
        data["features"]["area"] = data["features"].pop("region")
        data["migrations"] = [{"renamed": {"region": "area"}}]

    spec = _spec(tmp_path, rename)
    bundle = ModelBundle.load(parent.save(tmp_path / "parent"))
    assert bundle.migrate_to(spec).renamed == {"region": "area"}
    assert bundle.vocabs["area"].ids == parent.vocabs["region"].ids
    renamed = frame.rename(columns={"region": "area"})
    np.testing.assert_allclose(bundle.predict(renamed), parent.predict(frame), rtol=1e-6)


def test_chained_migrations_bring_a_model_two_changes_behind(tmp_path):
    parent, frame = _parent()

    def two(data):
        _add(data)
        data["features"]["area"] = data["features"].pop("region")
        data["migrations"].append({"renamed": {"region": "area"}})

    spec = _spec(tmp_path, two)
    plan = ModelBundle.load(parent.save(tmp_path / "p")).migrate_to(spec)
    assert len(plan.steps) == 2 and plan.renamed == {"region": "area"}
    assert plan.added == ["channel", "credit_score"]

    def added_then_renamed(data):
        two(data)
        data["features"]["channel_v2"] = data["features"].pop("channel")
        data["migrations"].append({"renamed": {"channel": "channel_v2"}})

    later = _spec(tmp_path, added_then_renamed, "three.yaml")
    bundle = ModelBundle.load(parent.save(tmp_path / "p3"))
    plan = bundle.migrate_to(later)
    assert plan.added == ["channel_v2", "credit_score"] and plan.renamed == {"region": "area"}
    assert bundle.vocabs["channel_v2"].size == 1  # a new input: only the OOV row


def test_undeclared_change_is_refused_naming_features_and_yaml_key(tmp_path):
    parent, _ = _parent()

    def sneak(data):
        data["features"]["channel"] = {"type": "categorical"}
        del data["features"]["income_ratio"]

    spec = _spec(tmp_path, sneak)
    with pytest.raises(SpecError) as e:
        parent.migrate_to(spec)
    msg = str(e.value)
    assert "added ['channel']" in msg and "removed ['income_ratio']" in msg and "'migrations:'" in msg
    assert parent.spec_digest != spec.digest and parent.categorical == load_spec(LOANS_SPEC).categorical


def test_declared_migration_that_does_not_match_is_refused(tmp_path):
    parent, _ = _parent()

    def half(data):  # channel declared, but product's removal is not
        data["features"]["channel"] = {"type": "categorical"}
        del data["features"]["product"]
        data["migrations"] = [{"added": ["channel"]}]

    with pytest.raises(SpecError, match=r"removed \['product'\].*do not explain it"):
        parent.migrate_to(_spec(tmp_path, half))

    def retype(data):  # a type change is not a rename
        data["features"]["tenure_months"] = {"type": "categorical"}
        data["features"]["channel"] = {"type": "categorical"}
        data["migrations"] = [{"added": ["channel"]}]

    with pytest.raises(SpecError, match=r"type changed \['tenure_months'\]"):
        parent.migrate_to(_spec(tmp_path, retype, "retype.yaml"))


@pytest.mark.parametrize(
    ("migration", "expected"),
    [
        ({"added": ["nowhere"]}, "not declared under features"),
        ({"removed": ["region"]}, "still declared under features"),
        ({"added": ["region"], "removed": ["region"]}, "more than once"),
        ({}, "empty migration"),
        ({"dropped": ["region"]}, r"migrations\[0\]\.dropped"),
    ],
)
def test_malformed_migrations_fail_at_load(tmp_path, migration, expected):
    with pytest.raises(SpecError, match=expected):
        _spec(tmp_path, lambda d: d.update(migrations=[migration]))


def test_for_spec_scores_new_spec_rows_with_a_migrated_twin_and_leaves_the_parent_alone(tmp_path):
    """What evaluate and the server do with a champion from before the spec change."""
    parent, frame = _parent()
    assert parent.for_spec(load_spec(LOANS_SPEC)) is parent

    def drop(data):
        del data["features"]["product"]
        data["migrations"] = [{"removed": ["product"]}]

    spec = _spec(tmp_path, drop)
    twin = parent.for_spec(spec)
    assert twin is not parent and twin.spec_digest == spec.digest and "product" in parent.vocabs
    scores = twin.predict(frame.drop(columns=["product"]))
    assert scores.shape == (len(frame),) and np.isfinite(scores).all()
    with pytest.raises(SpecError, match="migrations"):
        parent.for_spec(_spec(tmp_path, lambda d: d["features"].pop("region"), "undeclared.yaml"))
