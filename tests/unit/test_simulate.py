from __future__ import annotations

import numpy as np

from pipeline.demo.simulate import Simulator


def test_deterministic_under_seed_and_different_across_seeds():
    a, b, c = Simulator(seed=1, rows_per_day=500), Simulator(seed=1, rows_per_day=500), Simulator(seed=2,
                                                                                                  rows_per_day=500)
    assert a.day(3).equals(b.day(3))
    assert not a.day(3).equals(c.day(3))


def test_stream_has_new_entities_delayed_lost_feedback_and_drift():
    sim = Simulator(seed=0, rows_per_day=3000, drift=0.2)
    d0, d5 = sim.day(0), sim.day(5)
    assert set(d5.user_id) - set(d0.user_id)
    assert (d0.event_time.dt.date == sim.day_date(0)).all()
    assert d0.feedback_delay_s.isna().mean() > 0.02 and (d0.feedback_delay_s.dropna() > 0).all()
    assert 0.02 < d0.clicked.mean() < 0.5
    # Drift: the same segment x category cell clicks at a different rate late in the stream.
    late = sim.day(9)
    rate = lambda d: d.groupby(["user_segment", "item_category"]).clicked.mean()  # noqa: E731
    joined = rate(d0).to_frame("a").join(rate(late).to_frame("b")).dropna()
    assert np.abs(joined.a - joined.b).mean() > 0.03
