"""What every stage needs, resolved once from settings: the spec, the lake and the model name."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from feature_store.offline import Lake
from feature_store.spec import FeatureSpec, load_spec
from pipeline.config import Settings, get_settings


class StageError(RuntimeError):
    """A stage refused to proceed; the message says why and what to do. Not retried by Airflow."""


class NoDataError(StageError):
    pass


class GateFailed(StageError):
    pass


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held for the block, shared by every process on this host: overlapping runs of one
    step (an Airflow retry racing its zombie) take turns instead of interleaving their writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class Runtime:
    settings: Settings

    @cached_property
    def spec(self) -> FeatureSpec:
        return load_spec(self.settings.spec_path)

    @cached_property
    def lake(self) -> Lake:
        return Lake(self.settings.lake_root)

    @property
    def model_name(self) -> str:
        return self.settings.resolved_model_name(self.spec.name)

    @property
    def cache_dir(self):
        return self.settings.home_abs / "cache"

    def client(self):
        from pipeline.registry import connect

        return connect(self.settings)


def runtime(settings: Settings | None = None) -> Runtime:
    return Runtime(settings or get_settings())


def parse_day(value: str | date) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(value[:10])
    except ValueError as e:
        raise StageError(f"not a day: {value!r} (expected YYYY-MM-DD)") from e


def day_bounds(day: date) -> tuple[datetime, datetime]:
    start = datetime.combine(day, time(0), tzinfo=UTC)
    return start, start + timedelta(days=1)


TIE_BREAKERS = ("request_id", "row")


def split_positions(keys: pa.Table, time_col: str, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the earlier and the time-latest `holdout_fraction` of a day, each in time order (ties
    broken by request id and row, so the cut is reproducible; a stable sort, missing times last). Needs only the
    key columns, so a large day is split without being loaded whole: the one definition of "holdout" that train
    and evaluate share. Arrow's sort: a 2M-row day in 0.1 s, where pandas' multi-key sort took 4 s and 450 MB."""
    sort_keys = [(time_col, "ascending"), *((c, "ascending") for c in TIE_BREAKERS if c in keys.column_names)]
    order = pc.sort_indices(keys, sort_keys=sort_keys).to_numpy().astype(np.int64)  # nulls last
    cut = int(round(len(order) * (1 - holdout_fraction)))
    return order[:cut], order[cut:]


def key_table(frame: pd.DataFrame, time_col: str) -> pa.Table:
    """The split's key columns of a pandas frame as Arrow (tz-aware times as UTC instants: same order)."""
    arrays = {}
    for c in [time_col, *(c for c in TIE_BREAKERS if c in frame.columns)]:
        col = frame[c]
        if isinstance(col.dtype, pd.DatetimeTZDtype):
            col = col.dt.tz_convert(None)
        arrays[c] = pa.array(col.to_numpy() if pd.api.types.is_datetime64_dtype(col) else col, from_pandas=True)
    return pa.table(arrays)


def split_by_time(frame: pd.DataFrame, time_col: str, holdout_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train on the earlier part of a day and hold out the latest part: evaluation always looks forward."""
    early, late = split_positions(key_table(frame, time_col), time_col, holdout_fraction)
    ordered = frame.iloc[np.concatenate([early, late])].reset_index(drop=True)
    return ordered.iloc[:len(early)], ordered.iloc[len(early):]
