"""Replay reservoir: a bounded, label-stratified sample of past validated rows, kept in the lake.

Warm-starting on the new day alone forgets what older days taught and chases one day's noise; retraining on all
history costs more every night. A fixed-size reservoir mixed into each night keeps both the memory and a flat
cost. Every row gets a priority key once, when its day arrives (Efraimidis-Spirakis weighted sampling, the weight
doubling every `half_life_days` so recent days are favoured), and each label keeps its rows with the smallest keys.
Keys come from (seed, day) and day D's reservoir is built from the newest partition before D, so re-running a day
rewrites the same partition, and a skipped day simply carries the reservoir over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import date

import numpy as np
import pandas as pd
import pyarrow as pa

from feature_store.offline import Lake, PartitionRef
from pipeline.config import Settings

TABLE = "replay"
KEY = "_replay_key"
ORIGIN = "_replay_day"


@dataclass(frozen=True)
class ReplayPolicy:
    capacity: int
    ratio: float
    half_life_days: float
    min_class_share: float
    seed: int

    @classmethod
    def from_settings(cls, s: Settings) -> ReplayPolicy:
        """By keyword from the `replay` section, whose fields are these: a reorder cannot swap two knobs."""
        return cls(**s.replay.model_dump(), seed=s.seed)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0 and self.ratio > 0


@dataclass(frozen=True)
class Reservoir:
    """The rows kept, and how many of each label the stream has shown so far (for importance weights)."""

    rows: pd.DataFrame
    seen: dict[str, int]
    as_of: date | None

    @classmethod
    def empty(cls) -> Reservoir:
        return cls(pd.DataFrame(), {}, None)


def label_key(values: pd.Series) -> pd.Series:
    return values.astype("float64").round().astype("int64").astype(str)


def priority(n: int, day: date, policy: ReplayPolicy) -> np.ndarray:
    """log E - t ln2 / h with E ~ Exp(1): the smallest n of these is a weighted sample, weight 2^(t/h)."""
    keys = np.log(np.random.default_rng([policy.seed, day.toordinal()]).exponential(size=n))
    if policy.half_life_days > 0:
        keys = keys - day.toordinal() * math.log(2) / policy.half_life_days
    return keys


def quotas(seen: dict[str, int], available: dict[str, int], capacity: int, floor: float) -> dict[str, int]:
    """Each label's slots: its share of the stream, but never below `floor` (a rare class keeps a usable number
    of rows), nor above what is available; slots a class cannot fill go to the others."""
    classes = sorted(available)
    total = sum(seen.get(c, 0) for c in classes) or 1
    raw = {c: seen.get(c, 0) / total for c in classes}
    low = [c for c in classes if raw[c] < floor]
    rest = sum(raw[c] for c in classes if c not in low) or 1.0
    left = max(0.0, 1.0 - floor * len(low))
    share = {c: floor if c in low else raw[c] / rest * left for c in classes}
    q = {c: min(available[c], int(round(capacity * share[c]))) for c in classes}
    spare = capacity - sum(q.values())
    for c in sorted(classes, key=lambda c: available[c] - q[c], reverse=True):
        take = max(0, min(spare, available[c] - q[c]))
        q[c] += take
        spare -= take
    return q


def merge(previous: Reservoir, day_rows: pd.DataFrame, day: date, label: str, policy: ReplayPolicy,
          keys: np.ndarray | None = None, day_counts: dict[str, int] | None = None) -> Reservoir:
    """The reservoir after seeing `day_rows`: a pure function of its inputs (no clock, no global RNG). `keys` and
    `day_counts` let a caller pass only the day's candidate rows (see `candidates`) with their priorities and
    the whole day's label counts: the result is the same as for the whole day."""
    keys = priority(len(day_rows), day, policy) if keys is None else keys
    fresh = day_rows.reset_index(drop=True).assign(**{KEY: keys, ORIGIN: day.isoformat()})
    pool = pd.concat([previous.rows, fresh], ignore_index=True) if len(previous.rows) else fresh
    labels = label_key(pool[label])
    if day_counts is None:
        day_counts = {str(c): int(n) for c, n in label_key(day_rows[label]).value_counts().items()}
    seen = dict(previous.seen)
    for c, n in day_counts.items():
        seen[c] = seen.get(c, 0) + n
    available = {str(c): int(n) for c, n in label_key(previous.rows[label]).value_counts().items()} \
        if len(previous.rows) else {}
    for c, n in day_counts.items():
        available[c] = available.get(c, 0) + n
    q = quotas(seen, available, policy.capacity, policy.min_class_share)
    order = np.argsort(pool[KEY].to_numpy(), kind="stable")
    ranked = labels.to_numpy()[order]
    keep = np.zeros(len(order), dtype=bool)
    for c, n in q.items():
        keep[np.flatnonzero(ranked == c)[:n]] = True
    return Reservoir(pool.take(order[keep]).reset_index(drop=True), seen, day)


def read_before(lake: Lake, day: date) -> Reservoir:
    """The reservoir as it stood before `day`: the newest partition strictly earlier than it."""
    earlier = [d for d in lake.partition_days(TABLE) if d < day]
    if not earlier:
        return Reservoir.empty()
    manifest = lake.read_manifest(TABLE, earlier[-1]) or {}
    seen = {str(k): int(v) for k, v in manifest.get("inputs", {}).get("seen", {}).items()}
    return Reservoir(lake.read_partition(TABLE, earlier[-1]).to_pandas(), seen, earlier[-1])


def candidates(day_rows: pa.Table, day: date, label: str, policy: ReplayPolicy
               ) -> tuple[pd.DataFrame, np.ndarray, dict[str, int]]:
    """The only rows of a day that can enter the reservoir (per label, the `capacity` smallest priority keys),
    their keys, and the whole day's label counts: a large day is merged without becoming one pandas frame."""
    keys = priority(day_rows.num_rows, day, policy)
    labels = label_key(pd.Series(day_rows.column(label).to_numpy(zero_copy_only=False))).to_numpy()
    counts: dict[str, int] = {}
    picked = []
    for c in sorted(set(labels.tolist())):
        rows = np.flatnonzero(labels == c)
        counts[c] = len(rows)
        if len(rows) > policy.capacity:
            rows = rows[np.argpartition(keys[rows], policy.capacity - 1)[:policy.capacity]]
        picked.append(rows)
    take = np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)
    return day_rows.take(pa.array(take)).to_pandas(), keys[take], counts


def migrate(reservoir: Reservoir, renamed: dict[str, str], added: list[str]) -> Reservoir:
    """Past rows under a declared spec migration: renamed columns take their new names, added features are
    missing (they encode as OOV / the mean, which the migrated model's zero input weights ignore anyway).
    Removed columns are left for `update` to drop."""
    if not len(reservoir.rows):
        return reservoir
    rows = reservoir.rows.rename(columns=renamed)
    rows = rows.assign(**{c: pd.Series(pd.NA, index=rows.index, dtype="object") for c in added
                          if c not in rows.columns})
    return Reservoir(rows, reservoir.seen, reservoir.as_of)


def update(lake: Lake, day: date, day_rows: pd.DataFrame | pa.Table, columns: list[str], label: str,
           policy: ReplayPolicy, previous: Reservoir | None = None) -> PartitionRef:
    """Write the reservoir for `day` (idempotent: rebuilt from the partition before `day` every time; pass
    `previous` when it was already read with `read_before(lake, day)`). `day_rows` may be an Arrow table with
    at least `columns`: only the rows that can enter the reservoir are converted."""
    previous = read_before(lake, day) if previous is None else previous
    if len(previous.rows):
        missing = [c for c in columns if c not in previous.rows.columns]
        if missing:
            raise ValueError(f"replay reservoir as of {previous.as_of} lacks columns {missing}: the feature spec "
                             f"changed; declare a migration or clear the '{TABLE}' table")
        previous = Reservoir(previous.rows[[*columns, KEY, ORIGIN]], previous.seen, previous.as_of)
    if isinstance(day_rows, pa.Table):
        rows, keys, counts = candidates(day_rows.select(columns), day, label, policy)
        after = merge(previous, rows, day, label, policy, keys, counts)
    else:
        after = merge(previous, day_rows[columns], day, label, policy)
    inputs = {"as_of": previous.as_of.isoformat() if previous.as_of else None, "seen": after.seen,
              "capacity": policy.capacity, "half_life_days": policy.half_life_days, "seed": policy.seed}
    return lake.write_partition(TABLE, day, pa.Table.from_pandas(after.rows, preserve_index=False), inputs)


def seed(lake: Lake, history: pd.DataFrame, time_col: str, columns: list[str], label: str,
         policy: ReplayPolicy) -> PartitionRef | None:
    """The first reservoir, from a bootstrap history: its days merged in order, written under the last day."""
    if not policy.enabled or not len(history):
        return None
    days = pd.to_datetime(history[time_col], utc=True).dt.date
    res = Reservoir.empty()
    for d in sorted(days.unique()):
        res = merge(res, history.loc[days == d, columns], d, label, policy)
    inputs = {"as_of": None, "seen": res.seen, "capacity": policy.capacity,
              "half_life_days": policy.half_life_days, "seed": policy.seed}
    return lake.write_partition(TABLE, res.as_of, pa.Table.from_pandas(res.rows, preserve_index=False), inputs)


def sample(reservoir: Reservoir, n: int, label: str, day: date, policy: ReplayPolicy
           ) -> tuple[pd.DataFrame, np.ndarray]:
    """Up to n reservoir rows for tonight, with importance weights that undo the class floor's oversampling so
    the replayed loss stays calibrated to the stream's label rate."""
    rows = reservoir.rows
    if n <= 0 or not len(rows):
        return rows.iloc[:0], np.zeros(0, dtype=np.float32)
    rng = np.random.default_rng([policy.seed, day.toordinal(), 1])
    picked = rows.iloc[np.sort(rng.choice(len(rows), size=min(n, len(rows)), replace=False))]
    labels = label_key(picked[label])
    held = label_key(rows[label]).value_counts(normalize=True)
    total = sum(reservoir.seen.values()) or 1
    factor = {c: (reservoir.seen.get(c, 0) / total) / share for c, share in held.items()}
    weight = labels.map(factor).to_numpy(dtype=np.float32)
    return picked.drop(columns=[KEY, ORIGIN]).reset_index(drop=True), weight


def replay_rows_for(train_rows: int, policy: ReplayPolicy) -> int:
    return int(round(train_rows * policy.ratio)) if policy.enabled else 0
