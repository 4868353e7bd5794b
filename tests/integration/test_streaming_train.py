"""The nightly train stage streams the validated day from the lake: the same split, the same tensors and the same
loss curve as the whole-day pandas path, and it warm-starts across a declared spec migration end to end."""

from __future__ import annotations

import copy
import uuid
from datetime import date, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
import yaml

from feature_store.offline import Lake
from feature_store.spec import load_spec
from pipeline import registry
from pipeline.learn import replay
from pipeline.learn.holdout import TIE_BREAKERS, split_by_time, split_positions
from pipeline.learn.model import ModelBundle
from pipeline.learn.trainer import Encoded, encode_groups, fit_increment
from pipeline.runtime import runtime
from pipeline.stages.bootstrap import bootstrap
from pipeline.stages.evaluate import evaluate
from pipeline.stages.register import register_candidate
from pipeline.stages.train import DayReader, train
from pipeline.stages.validate import VALIDATED
from pipeline.tags import Tag
from tests.helpers import LOANS_SPEC, loans_frame, make_settings

pytestmark = pytest.mark.integration
SPEC = load_spec(LOANS_SPEC)
DAY = date(2026, 4, 20)


def validated(frame: pd.DataFrame) -> pd.DataFrame:
    """A day as validate leaves it: the spec's columns plus request id and row, with tied event times."""
    rng = np.random.default_rng(7)
    out = frame.assign(request_id=[uuid.UUID(int=int(x)).hex for x in rng.integers(0, 2**62, len(frame))],
                       row=rng.integers(0, 3, len(frame)))
    out[SPEC.event_time] = out[SPEC.event_time].iloc[rng.integers(0, len(frame) // 4, len(frame))].array
    return out.sample(frac=1, random_state=1).reset_index(drop=True)  # file order is not time order


def test_streamed_split_and_encoding_equal_the_pandas_path(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    frame = validated(loans_frame(DAY, 1500, seed=4))
    manifest = lake.write_partition(VALIDATED, DAY, pa.Table.from_pandas(frame, preserve_index=False))
    reader = DayReader(lake, DAY, lake.read_manifest(VALIDATED, DAY), batch_rows=97)
    assert manifest.rows == 1500
    keys = reader.table([SPEC.event_time, *TIE_BREAKERS])
    train_pos, holdout_pos = split_positions(keys, SPEC.event_time, 0.2)
    train_df, holdout_df = split_by_time(lake.read_partition(VALIDATED, DAY).to_pandas(), SPEC.event_time, 0.2)
    assert train_df.request_id.tolist() == frame.request_id.iloc[train_pos].tolist()
    assert holdout_df.request_id.tolist() == frame.request_id.iloc[holdout_pos].tolist()

    settings = make_settings(tmp_path / "home", 1, epochs=4, batch_size=64, early_stopping_patience=2,
                             validation_fraction=0.1, lr_candidates=[0.01, 0.003])
    parent = ModelBundle.create(SPEC, loans_frame(DAY - timedelta(days=1), 600, seed=1), 4, (8,), 1, seed=0)
    a, b = copy.deepcopy(parent), copy.deepcopy(parent)
    a.grow_vocab(train_df, 2, day=DAY)
    keep = np.zeros(len(frame), dtype=bool)
    keep[train_pos] = True
    b.grow_vocab(reader.frames(b.categorical, keep), 2, day=DAY)
    assert {c: v.to_dict() for c, v in a.vocabs.items()} == {c: v.to_dict() for c, v in b.vocabs.items()}

    cut = int(round(len(train_pos) * (1 - settings.training.validation_fraction)))
    fit_rows, val_rows = encode_groups(b, reader.batches([*b.categorical, *b.numeric, SPEC.label.name]),
                                       SPEC.label.name, [train_pos[:cut], train_pos[cut:]])
    fit_df, val_df = split_by_time(train_df, SPEC.event_time, settings.training.validation_fraction)
    expected = Encoded.of(a, fit_df, SPEC.label.name)
    for k in ("cat", "num", "y"):
        assert torch.equal(getattr(fit_rows, k), getattr(expected, k))
    assert torch.equal(val_rows.cat, Encoded.of(a, val_df, SPEC.label.name).cat)

    replay_df = loans_frame(DAY - timedelta(days=3), 200, seed=9)
    ra = fit_increment(a, train_df, SPEC.label.name, SPEC.event_time, settings, replay=replay_df,
                       device=torch.device("cpu"))
    rb = fit_increment(b, fit_rows, SPEC.label.name, SPEC.event_time, settings, replay=replay_df,
                       device=torch.device("cpu"), valid=val_rows)
    assert ra.losses == rb.losses and ra.val_losses == rb.val_losses and ra.lr == rb.lr
    assert a.weights_digest() == b.weights_digest()


@pytest.mark.parametrize("times", ["utc", "naive", "objects"])
def test_split_by_time_is_a_stable_sort_on_time_request_and_row(times):
    rng = np.random.default_rng(2)
    frame = validated(loans_frame(DAY, 600, seed=3))
    if times == "naive":
        frame[SPEC.event_time] = frame[SPEC.event_time].dt.tz_convert(None)
    elif times == "objects":
        frame[SPEC.event_time] = pd.Series(frame[SPEC.event_time].dt.to_pydatetime(), dtype="object")
    frame["request_id"] = rng.choice(["a", "b", "c"], len(frame))
    keys = [SPEC.event_time, "request_id", "row"]
    reference = frame.sort_values(keys, kind="stable").reset_index(drop=True)
    cut = int(round(len(frame) * 0.75))
    early, late = split_by_time(frame, SPEC.event_time, 0.25)
    pd.testing.assert_frame_equal(early, reference.iloc[:cut])
    pd.testing.assert_frame_equal(late, reference.iloc[cut:])


def test_replay_merge_from_an_arrow_day_equals_the_pandas_day(tmp_path):
    columns = [*SPEC.feature_names, SPEC.event_time, SPEC.label.name]
    policy = replay.ReplayPolicy(capacity=120, ratio=1.0, half_life_days=2.0, min_class_share=0.3, seed=5)
    lakes = Lake(str(tmp_path / "a")), Lake(str(tmp_path / "b"))
    for i in range(3):
        d = DAY + timedelta(days=i)
        day = loans_frame(d, 700, seed=2)
        replay.update(lakes[0], d, day, columns, SPEC.label.name, policy)
        replay.update(lakes[1], d, pa.Table.from_pandas(day, preserve_index=False), columns, SPEC.label.name,
                      policy)
        pd.testing.assert_frame_equal(lakes[0].read_partition(replay.TABLE, d).to_pandas(),
                                      lakes[1].read_partition(replay.TABLE, d).to_pandas())
        assert lakes[0].read_manifest(replay.TABLE, d)["inputs"] == lakes[1].read_manifest(replay.TABLE, d)["inputs"]


def test_nightly_train_streams_applies_the_declared_migration_and_logs_lineage(settings_factory, tmp_path):
    s = settings_factory(spec_path=LOANS_SPEC, epochs=2, batch_size=64, vocab_expiry_days=1,
                         max_auc_regression=0.5)
    history = pd.concat([loans_frame(DAY - timedelta(days=d), 300, seed=1) for d in (3, 2, 1)])
    history.to_parquet(tmp_path / "history.parquet")
    boot = bootstrap(tmp_path / "history.parquet", runtime(s))

    data = yaml.safe_load(LOANS_SPEC.read_text())
    data["features"]["channel"] = {"type": "categorical"}
    data["features"]["credit_score"] = {"type": "numeric", "min": 0}
    data["migrations"] = [{"added": ["channel", "credit_score"]}]
    (tmp_path / "loans_v2.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    rt = runtime(settings_factory(spec_path=tmp_path / "loans_v2.yaml", model_name=s.model_name, epochs=2,
                                  batch_size=64, vocab_expiry_days=1, max_auc_regression=0.5))
    rng = np.random.default_rng(3)
    frame = validated(loans_frame(DAY, 800, seed=5)).assign(
        channel=lambda f: rng.choice(["web", "app"], len(f)), credit_score=lambda f: rng.normal(650, 40, len(f)))
    rt.lake.write_partition(VALIDATED, DAY, pa.Table.from_pandas(frame, preserve_index=False))
    reports = rt.settings.reports_dir / "validation" / f"dt={DAY.isoformat()}"
    reports.mkdir(parents=True)
    (reports / "suite.html").write_text("<html>validation</html>")

    out = train(DAY, rt)
    assert out.migration is not None and '"added": ["channel", "credit_score"]' in out.migration
    assert out.train_rows == 640 and out.holdout_rows == 160 and out.new_vocab["channel"] == 2
    # the bootstrap's vocabularies predate expiry: their values count as seen today, none retire at once
    assert out.expired_vocab == dict.fromkeys(rt.spec.categorical, 0)
    client = rt.client()
    run = client.get_run(out.run_id)
    assert run.data.tags[Tag.MIGRATION] == out.migration and run.data.params["spec_digest"] == rt.spec.digest
    artifacts = {f.path for f in client.list_artifacts(out.run_id, "validation")}
    assert artifacts == {"validation/suite.html"}
    vocab = {f.path for f in client.list_artifacts(out.run_id, "vocab")}
    assert vocab == {"vocab/vocabularies.json"}
    assert run.inputs.dataset_inputs[0].dataset.name == f"{VALIDATED}/dt={DAY.isoformat()}"

    candidate = registry.load_run_bundle(out.run_id, rt.cache_dir)
    assert candidate.spec_digest == rt.spec.digest and candidate.categorical == rt.spec.categorical
    assert set(candidate.vocabs["channel"].ids) == {"web", "app"} and candidate.norm["credit_score"][0] > 600
    accounts = candidate.vocabs["account_no"]
    assert set(accounts.last_seen) == set(accounts.ids) and DAY.isoformat() in accounts.last_seen.values()
    ev = evaluate(DAY, out.run_id, rt)
    version = register_candidate(DAY, ev, rt).version
    assert version != boot.version
    registered = registry.load_version(client, rt.model_name, version, rt.cache_dir)
    assert registered.spec_digest == rt.spec.digest
    assert client.get_model_version(rt.model_name, version).tags[Tag.MIGRATION] == out.migration
    again = train(DAY, rt)
    assert again.reused and again.migration == out.migration


def test_undeclared_spec_change_stops_training_with_the_difference_named(settings_factory, tmp_path):
    s = settings_factory(spec_path=LOANS_SPEC, epochs=1, batch_size=64)
    history = pd.concat([loans_frame(DAY - timedelta(days=d), 300, seed=1) for d in (2, 1)])
    history.to_parquet(tmp_path / "history.parquet")
    bootstrap(tmp_path / "history.parquet", runtime(s))
    data = yaml.safe_load(LOANS_SPEC.read_text())
    del data["features"]["product"]
    (tmp_path / "loans_v2.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    rt = runtime(settings_factory(spec_path=tmp_path / "loans_v2.yaml", model_name=s.model_name, epochs=1))
    frame = validated(loans_frame(DAY + timedelta(days=1), 300, seed=5)).drop(columns=["product"])
    rt.lake.write_partition(VALIDATED, DAY + timedelta(days=1), pa.Table.from_pandas(frame, preserve_index=False))
    from pipeline.errors import StageError

    with pytest.raises(StageError, match=r"removed \['product'\].*'migrations:'"):
        train(DAY + timedelta(days=1), rt)
