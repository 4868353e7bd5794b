from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from feature_store.offline import Lake
from feature_store.spec import load_spec
from pipeline.learn import replay
from pipeline.learn.model import ModelBundle
from pipeline.learn.replay import ReplayPolicy
from pipeline.learn.trainer import encode_parquet, fit, restore_optimizer
from tests.helpers import LOANS_SPEC, loans_frame

SPEC = load_spec(LOANS_SPEC)
COLUMNS = [*SPEC.feature_names, SPEC.event_time, SPEC.label.name]
LABEL = SPEC.label.name
D0 = date(2026, 3, 1)


def policy(**kw) -> ReplayPolicy:
    base = {"capacity": 300, "ratio": 1.0, "half_life_days": 0.0, "min_class_share": 0.3, "seed": 5}
    return ReplayPolicy(**{**base, **kw})


def feed(lake: Lake, days: int, p: ReplayPolicy, n: int = 250) -> None:
    for i in range(days):
        d = D0 + timedelta(days=i)
        replay.update(lake, d, loans_frame(d, n, seed=1), COLUMNS, LABEL, p)


def test_reservoir_is_bounded_stratified_and_counts_the_stream(tmp_path):
    lake, p = Lake(str(tmp_path / "lake")), policy()
    feed(lake, 4, p)
    res = replay.read_before(lake, D0 + timedelta(days=10))
    assert len(res.rows) == p.capacity
    assert sum(res.seen.values()) == 4 * 250
    stream_pos = res.seen["1"] / sum(res.seen.values())
    kept_pos = (res.rows[LABEL] == 1).mean()
    assert stream_pos < p.min_class_share and abs(kept_pos - p.min_class_share) < 0.01  # floor lifts the rare class
    assert set(res.rows[replay.ORIGIN]) == {(D0 + timedelta(days=i)).isoformat() for i in range(4)}
    picked, w = replay.sample(res, 200, LABEL, D0 + timedelta(days=4), p)
    assert len(picked) == 200 and list(picked.columns) == COLUMNS
    # importance weights undo the floor: the weighted label rate is the stream's
    assert abs(float(np.average(picked[LABEL], weights=w)) - stream_pos) < 0.02


def test_rerunning_a_day_gives_the_same_reservoir_and_reads_only_the_past(tmp_path):
    lake, p = Lake(str(tmp_path / "lake")), policy()
    feed(lake, 3, p)
    day2 = D0 + timedelta(days=2)
    before = lake.read_partition(replay.TABLE, day2).to_pandas()
    feed(lake, 3, p)  # re-run every day, later days already present
    pd.testing.assert_frame_equal(lake.read_partition(replay.TABLE, day2).to_pandas(), before)
    assert replay.read_before(lake, day2).as_of == D0 + timedelta(days=1)
    assert lake.read_manifest(replay.TABLE, day2)["inputs"]["as_of"] == (D0 + timedelta(days=1)).isoformat()


def test_half_life_favours_recent_days(tmp_path):
    uniform, recent = Lake(str(tmp_path / "u")), Lake(str(tmp_path / "r"))
    feed(uniform, 6, policy())
    feed(recent, 6, policy(half_life_days=1.0))
    last = D0 + timedelta(days=5)

    def newest_share(lake: Lake) -> float:
        rows = replay.read_before(lake, last + timedelta(days=1)).rows
        return float((rows[replay.ORIGIN] == last.isoformat()).mean())

    assert newest_share(recent) > newest_share(uniform) + 0.15


def test_reservoir_refuses_a_spec_change_instead_of_misaligning(tmp_path):
    lake, p = Lake(str(tmp_path / "lake")), policy()
    feed(lake, 1, p)
    d = D0 + timedelta(days=1)
    frame = loans_frame(d, 100, seed=1).assign(score_band="a")
    try:
        replay.update(lake, d, frame, [*COLUMNS, "score_band"], LABEL, p)
    except ValueError as e:
        assert "score_band" in str(e) and "migration" in str(e)
    else:
        raise AssertionError("a reservoir without the new feature must not be silently padded")


def test_optimizer_moments_survive_a_grown_vocabulary(tmp_path):
    frame = loans_frame(D0, 400, seed=1)
    bundle = ModelBundle.create(SPEC, frame, embedding_dim=4, hidden=(8,), min_count=1)
    fit(bundle, frame, LABEL, epochs=1, batch_size=64, lr=1e-2, seed=0, device=torch.device("cpu"))
    loaded = ModelBundle.load(bundle.save(tmp_path / "b"))
    assert loaded.optimizer_state is not None
    loaded.grow_vocab(frame.assign(account_no=[f"new{i % 5}" for i in range(len(frame))]), min_count=1)
    opt = torch.optim.Adam(loaded.net.parameters())
    assert restore_optimizer(opt, loaded.optimizer_state)
    idx = SPEC.categorical.index("account_no")
    table = loaded.net.embeddings[idx].weight
    moment = opt.state[table]["exp_avg_sq"]
    old_rows = bundle.net.embeddings[idx].weight.shape[0]
    assert moment.shape == table.shape and torch.all(moment[old_rows:] == 0) and moment[:old_rows].abs().sum() > 0
    other = ModelBundle.create(SPEC, frame, embedding_dim=4, hidden=(8, 8), min_count=1)
    assert not restore_optimizer(torch.optim.Adam(other.net.parameters()), loaded.optimizer_state)


def test_early_stopping_keeps_the_best_epoch_on_the_later_slice():
    frame = loans_frame(D0, 600, seed=2)
    bundle = ModelBundle.create(SPEC, frame, embedding_dim=4, hidden=(8,), min_count=1)
    train, valid = frame.iloc[:500], frame.iloc[500:]
    r = fit(bundle, train, LABEL, epochs=30, batch_size=32, lr=5e-2, seed=0, device=torch.device("cpu"),
            valid=valid, patience=2)
    assert r.epochs < 30 and r.best_epoch is not None
    assert r.val_losses[r.best_epoch] == min(r.val_losses)
    p = np.clip(bundle.predict(valid), 1e-7, 1 - 1e-7)
    y = valid[LABEL].to_numpy()
    kept = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    assert abs(kept - min(r.val_losses)) < 1e-4  # the weights kept are the best epoch's, not the last


def test_parquet_streams_into_the_same_tensors_and_training(tmp_path):
    frame = loans_frame(D0, 700, seed=6)
    path = tmp_path / "day.parquet"
    frame.to_parquet(path)
    a = ModelBundle.create(SPEC, frame, embedding_dim=4, hidden=(8,), min_count=1, seed=3)
    b = ModelBundle.create(SPEC, frame, embedding_dim=4, hidden=(8,), min_count=1, seed=3)
    rows = encode_parquet(b, path, LABEL, batch_rows=128)  # 6 record batches
    cat, num = a.encode(frame)
    assert torch.equal(rows.cat, cat) and torch.equal(rows.num, num)
    ra = fit(a, frame, LABEL, epochs=2, batch_size=64, lr=1e-2, seed=0, device=torch.device("cpu"))
    rb = fit(b, rows, LABEL, epochs=2, batch_size=64, lr=1e-2, seed=0, device=torch.device("cpu"))
    assert ra.losses == rb.losses and a.weights_digest() == b.weights_digest()


def test_the_reservoir_samples_the_same_rows_however_the_day_was_written(tmp_path):
    """Segments are named per server process, so one day's rows come back in a different order from two replays
    of the same traffic; the reservoir draws by position, so the nightly puts the rows in time order first."""
    from pipeline.runtime import runtime
    from pipeline.stages.train import DayReader, update_replay
    from tests.helpers import make_settings

    day = D0 + timedelta(days=1)
    rows = loans_frame(day, 900, seed=8).assign(request_id=lambda f: [f"r{i:04d}" for i in range(len(f))], row=0)
    rows["applied_at"] = rows["applied_at"].dt.floor("h")  # many ties: broken by request id and row
    reservoirs = []
    for name, order in (("a", rows), ("b", rows.sample(frac=1.0, random_state=1))):
        rt = runtime(make_settings(tmp_path / name, 1, spec_path=LOANS_SPEC, replay_rows=100))
        ref = rt.lake.write_partition("validated", day, pa.Table.from_pandas(order, preserve_index=False), {})
        reader = DayReader(rt.lake, day, rt.lake.read_manifest("validated", day))
        update_replay(rt, reader, replay.Reservoir.empty(), day)
        reservoirs.append(replay.read_before(rt.lake, day + timedelta(days=1)).rows)
        assert ref.rows == 900
    a, b = (r.sort_values([SPEC.event_time, "amount"]).reset_index(drop=True) for r in reservoirs)
    assert len(a) == 100 and a.equals(b)
