"""Periods of a stream and the logical dates the loop replays them on.

The nightly runs once per logical date. A stream whose period is a day replays as is; any other period (hours,
weeks, months, years) is replayed one period per logical date: period k of the stream becomes synthetic day
D0 + k, and a time inside the period maps linearly into that day. Durations (label delays, the attribution
window) therefore shrink or stretch by the same factor, which the report states.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np
import pandas as pd

from pipeline.errors import StageError

_DURATION = re.compile(r"^\s*(\d+)\s*(h|d|w)\s*$")
_CALENDAR = {"month": "M", "1mo": "M", "m": "M", "quarter": "Q", "1q": "Q", "q": "Q", "year": "Y", "1y": "Y",
             "y": "Y", "week": "W", "w": "W"}
DAY = pd.Timedelta(days=1)


@dataclass(frozen=True)
class Periods:
    """Either a fixed duration anchored at midnight UTC of the stream's first day, or a calendar period."""

    text: str
    step: pd.Timedelta | None
    freq: str | None
    anchor: pd.Timestamp
    origin: int = 0

    @classmethod
    def parse(cls, text: str, stream_times: pd.Series) -> Periods:
        if not len(stream_times):
            raise StageError("the stream file has no usable rows")
        first = stream_times.min()
        anchor = first.floor("D")
        if m := _DURATION.match(text.lower()):
            n, unit = int(m.group(1)), m.group(2)
            step = pd.Timedelta(hours=n) if unit == "h" else pd.Timedelta(days=n * (7 if unit == "w" else 1))
            if n == 0:
                raise StageError(f"--period {text!r}: must be longer than zero")
            return cls(text, step, None, anchor)
        freq = _CALENDAR.get(text.lower())
        if freq is None:
            raise StageError(f"--period {text!r}: expected a duration like 1d, 7d, 12h, 2w or one of "
                             f"{', '.join(sorted(set(_CALENDAR)))}")
        return cls(text, None, freq, anchor, _ordinal(pd.Series([first]), freq)[0])

    @property
    def is_day(self) -> bool:
        return self.step == DAY

    def index(self, times: pd.Series) -> np.ndarray:
        """Period number of each time; history before the stream gets negative numbers."""
        if self.step is not None:
            return np.floor((times - self.anchor) / self.step).astype(np.int64).to_numpy()
        return _ordinal(times, self.freq) - self.origin

    def bounds(self, k: np.ndarray) -> tuple[pd.Series, pd.Series]:
        k = np.asarray(k, dtype=np.int64)
        if self.step is not None:
            start = self.anchor + pd.to_timedelta(k * self.step.value, unit="ns")
            return pd.Series(start), pd.Series(start + self.step)
        periods = pd.PeriodIndex.from_ordinals(k + self.origin, freq=self.freq)
        return (pd.Series(periods.start_time.tz_localize("UTC")),
                pd.Series((periods + 1).start_time.tz_localize("UTC")))

    def logical_date(self, k: int) -> date:
        """The nightly's logical date for period k."""
        if self.is_day:
            return (self.anchor + k * DAY).date()
        return self.anchor.date() + timedelta(days=int(k))

    def to_logical_time(self, times: pd.Series, k: np.ndarray) -> pd.Series:
        """Map times of rows in period k onto the logical timeline (identity for daily periods). A time after
        its period (a label that arrives later) maps past the end of the logical day by the same scale."""
        if self.is_day:
            return times
        start, end = self.bounds(k)
        frac = (times.to_numpy() - start.to_numpy()) / (end.to_numpy() - start.to_numpy())
        day0 = pd.Timestamp(self.anchor.date(), tz="UTC")
        return pd.Series(day0 + pd.to_timedelta(np.asarray(k, dtype=np.float64) + frac, unit="D"), index=times.index)


def _ordinal(times: pd.Series, freq: str) -> np.ndarray:
    naive = pd.to_datetime(times, utc=True).dt.tz_convert(None)
    return naive.dt.to_period(freq).map(lambda p: p.ordinal).to_numpy(dtype=np.int64)
