"""The fresh drift challenger forgets the old weights, never the old ids."""

from __future__ import annotations

from datetime import date

from feature_store.spec import load_spec
from pipeline.config import Settings
from pipeline.learn.model import ModelBundle
from pipeline.learn.policies import fit_fresh
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
