"""What every stage needs, resolved once from settings: the spec, the lake and the model name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import cached_property
from pathlib import Path

from filelock import FileLock

from feature_store.offline import Lake
from feature_store.spec import FeatureSpec, load_spec
from pipeline.config import Settings, get_settings
from pipeline.errors import StageError


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held for the block, shared by every process on this host: overlapping runs of one
    step (an Airflow retry racing its zombie) take turns instead of interleaving their writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


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
