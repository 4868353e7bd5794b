"""A synthetic stream with entity churn for the churn spec: every day a new cohort of customers arrives, each
cohort with branch values of its own, and makes up most of the day's rows; the rest come from earlier cohorts,
with the attributes they always had. Nothing about it is unusual for a real stream, yet an attribute of the new
customers is, day after day, a value no earlier day had."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

CHURN_SPEC = Path(__file__).parent / "data" / "churn.yaml"
START = date(2026, 5, 1)
CHANNELS = ["web", "app", "store"]


def cohort(k: int, size: int) -> pd.DataFrame:
    """Customers of day k's cohort, each with a fixed branch from the cohort's own 15 branches."""
    rng = np.random.default_rng([11, k])
    return pd.DataFrame({"customer_id": [f"c{k}-{i}" for i in range(size)],
                         "branch": [f"b{k}-{j}" for j in rng.integers(0, 15, size)],
                         "risk": rng.normal(0, 1, size)})


def churn_day(k: int, rows: int = 600, new_share: float = 0.75, cohort_size: int = 250) -> pd.DataFrame:
    """Day k's rows (day 0 = START): `new_share` of them from cohort k, the rest from cohorts 0..k-1."""
    rng = np.random.default_rng([12, k])
    new = cohort(k, cohort_size)
    old = pd.concat([cohort(j, cohort_size) for j in range(k)]) if k else new
    n_new = int(rows * new_share)
    people = pd.concat([new.iloc[rng.integers(0, len(new), n_new)],
                        old.iloc[rng.integers(0, len(old), rows - n_new)]]).reset_index(drop=True)
    channel = rng.choice(CHANNELS, rows)
    amount = rng.lognormal(3, 0.8, rows)
    logit = 1.2 * people["risk"].to_numpy() + 0.8 * (channel == "store") - 0.5 * (np.log(amount) - 3)
    start = datetime.combine(START + timedelta(days=k), datetime.min.time(), tzinfo=UTC)
    return pd.DataFrame({
        "customer_id": people["customer_id"], "branch": people["branch"], "channel": channel, "amount": amount,
        "ts": [start + timedelta(seconds=float(s)) for s in np.sort(rng.uniform(0, 86000, rows))],
        "churned": (rng.uniform(size=rows) < 1 / (1 + np.exp(-logit))).astype(int),
    })
