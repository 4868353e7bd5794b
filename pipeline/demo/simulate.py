"""A CTR-like traffic simulator for the demo and the tests: users and items with attributes, a hidden click
function that drifts from day to day, new users and items appearing, and feedback that arrives late or never.

It speaks the demo spec's column names (`feature_store/specs/ctr.yaml`). Everything is a pure function of
(seed, day index), so a day can be regenerated exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from functools import cached_property

import numpy as np
import pandas as pd

SEGMENTS = [f"seg{i}" for i in range(6)]
CATEGORIES = [f"cat{i}" for i in range(10)]
DEVICES = ["mobile", "desktop", "tablet"]
LABEL, EVENT_TIME = "clicked", "event_time"


@dataclass(frozen=True)
class Simulator:
    seed: int = 0
    start: date = date(2026, 1, 1)
    users: int = 3000
    items: int = 600
    new_users_per_day: int = 150
    new_items_per_day: int = 30
    rows_per_day: int = 4000
    horizon_days: int = 120
    drift: float = 0.08
    feedback_loss: float = 0.1
    mean_feedback_delay_s: float = 300.0
    latent_dim: int = 4

    @cached_property
    def _world(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0])
        nu = self.users + self.new_users_per_day * self.horizon_days
        ni = self.items + self.new_items_per_day * self.horizon_days
        return {
            "user_birth": np.concatenate([np.full(self.users, -1),
                                          np.repeat(np.arange(self.horizon_days), self.new_users_per_day)]),
            "item_birth": np.concatenate([np.full(self.items, -1),
                                          np.repeat(np.arange(self.horizon_days), self.new_items_per_day)]),
            "user_seg": rng.integers(0, len(SEGMENTS), nu),
            "user_age0": rng.gamma(2.0, 200.0, nu),
            "user_vec": rng.normal(0, 1, (nu, self.latent_dim)),
            "user_bias": rng.normal(0, 0.5, nu),
            "item_cat": rng.integers(0, len(CATEGORIES), ni),
            "item_price": np.round(rng.lognormal(3.0, 0.8, ni), 2),
            "item_vec": rng.normal(0, 1, (ni, self.latent_dim)),
            "item_bias": rng.normal(0, 0.7, ni),
            "affinity_a": rng.normal(0, 1.0, (len(SEGMENTS), len(CATEGORIES))),
            "affinity_b": rng.normal(0, 1.0, (len(SEGMENTS), len(CATEGORIES))),
            "device_effect": np.array([0.2, 0.0, -0.3]),
        }

    def day_date(self, index: int) -> date:
        return self.start + timedelta(days=index)

    def day(self, index: int) -> pd.DataFrame:
        """Day `index`'s requests (features + event time), the hidden click and its feedback delay (NaN: lost)."""
        if not 0 <= index < self.horizon_days:
            raise ValueError(f"day index {index} outside the simulator's horizon 0..{self.horizon_days - 1}")
        w = self._world
        rng = np.random.default_rng([self.seed, 1, index])
        n = self.rows_per_day
        users = np.flatnonzero(w["user_birth"] <= index)
        items = np.flatnonzero(w["item_birth"] <= index)
        # Heavy-tailed popularity: a few users and items account for much of the traffic.
        u = users[np.minimum((rng.pareto(1.2, n) * len(users) / 8).astype(int), len(users) - 1)]
        it = items[np.minimum((rng.pareto(1.1, n) * len(items) / 6).astype(int), len(items) - 1)]
        seconds = np.sort(rng.uniform(0, 86400, n))
        hour = (seconds // 3600).astype(int)
        position = rng.integers(1, 11, n)
        device = rng.choice(len(DEVICES), n, p=[0.6, 0.3, 0.1])
        t = min(1.0, index * self.drift)
        affinity = (1 - t) * w["affinity_a"] + t * w["affinity_b"]
        logit = (
            -2.2
            + w["user_bias"][u] + w["item_bias"][it]
            + 0.6 * np.sum(w["user_vec"][u] * w["item_vec"][it], axis=1) / np.sqrt(self.latent_dim)
            + affinity[w["user_seg"][u], w["item_cat"][it]]
            - 0.35 * np.log(position)
            - 0.25 * (np.log(w["item_price"][it]) - 3.0)
            + 0.3 * np.sin(2 * np.pi * hour / 24)
            + w["device_effect"][device]
        )
        clicked = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        delay = rng.exponential(self.mean_feedback_delay_s, n)
        delay[rng.uniform(size=n) < self.feedback_loss] = np.nan
        base = datetime.combine(self.day_date(index), datetime.min.time(), tzinfo=UTC)
        return pd.DataFrame({
            "user_id": [f"u{x}" for x in u],
            "item_id": [f"i{x}" for x in it],
            "user_segment": [SEGMENTS[x] for x in w["user_seg"][u]],
            "item_category": [CATEGORIES[x] for x in w["item_cat"][it]],
            "device": [DEVICES[x] for x in device],
            "hour_of_day": hour.astype(float),
            "price": w["item_price"][it],
            "position": position.astype(float),
            "user_age_days": np.round(w["user_age0"][u] + np.maximum(index - w["user_birth"][u], 0), 1),
            EVENT_TIME: pd.to_datetime(base) + pd.to_timedelta(seconds, unit="s"),
            LABEL: clicked,
            "feedback_delay_s": delay,
        })

    def history(self, days: int) -> pd.DataFrame:
        """Days 0..days-1 as a labeled historical log: the file a user bootstraps from. Live traffic then
        continues the same timeline at day index `days`."""
        frames = [self.day(i) for i in range(days)]
        return pd.concat(frames, ignore_index=True).drop(columns=["feedback_delay_s"])
