"""What every stage needs, resolved once from settings: the spec, the lake and the model name."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cached_property

import pandas as pd

from feature_store.offline import Lake
from feature_store.spec import FeatureSpec, load_spec
from pipeline.config import Settings, get_settings


class StageError(RuntimeError):
    """A stage refused to proceed; the message says why and what to do. Not retried by Airflow."""


class NoDataError(StageError):
    pass


class GateFailed(StageError):
    pass


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


def split_by_time(frame: pd.DataFrame, time_col: str, holdout_fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train on the earlier part of a day and hold out the latest part: evaluation always looks forward."""
    keys = [time_col, *(c for c in ("request_id", "row") if c in frame.columns)]
    ordered = frame.sort_values(keys, kind="stable").reset_index(drop=True)
    cut = int(round(len(ordered) * (1 - holdout_fraction)))
    return ordered.iloc[:cut], ordered.iloc[cut:]
