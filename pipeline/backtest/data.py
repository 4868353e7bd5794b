"""The history and the stream as the loop sees them: coerced to the spec like bootstrap coerces its file, each
row with its period, its label time, and both times on the logical (nightly) timeline."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from feature_store.spec import FeatureSpec
from pipeline.backtest.periods import Periods
from pipeline.errors import StageError
from pipeline.stages.bootstrap import read_history, to_utc

PERIOD, LABEL_TIME, REAL_TIME, REAL_LABEL_TIME = "_period", "_label_time", "_event_time_real", "_label_time_real"


@dataclass
class Inputs:
    history: pd.DataFrame
    stream: pd.DataFrame
    periods: Periods
    rejected_history: int
    rejected_stream: int


def _label_times(path: Path, frame: pd.DataFrame, kept: np.ndarray, et: str, label_time_col: str | None,
                 delay: timedelta) -> pd.Series:
    if label_time_col is None:
        return frame[et] + pd.Timedelta(delay)
    names = pq.read_schema(path).names
    if label_time_col not in names:
        raise StageError(f"{path} has no label-time column {label_time_col!r} (has: {', '.join(names)})")
    raw = pq.read_table(path, columns=[label_time_col]).column(0).to_pandas()
    times = to_utc(raw).iloc[kept].reset_index(drop=True)
    # A label cannot be known before its event: a missing or earlier label time means "at the event" + delay.
    return times.where(times.notna() & (times >= frame[et]), frame[et] + pd.Timedelta(delay))


def load(spec: FeatureSpec, history: Path, stream: Path, period: str, label_time_col: str | None,
         delay: timedelta) -> Inputs:
    et = spec.event_time
    hist, hist_bad = read_history(history, spec)
    live, live_bad = read_history(stream, spec)
    kept = np.setdiff1d(np.arange(len(live) + len(live_bad)), live_bad.index.to_numpy())
    live[LABEL_TIME] = _label_times(stream, live, kept, et, label_time_col, delay)
    live = live.sort_values(et, kind="stable").reset_index(drop=True)
    hist = hist.sort_values(et, kind="stable").reset_index(drop=True)
    periods = Periods.parse(period, live[et])
    if len(hist) and hist[et].max() >= live[et].min():
        raise StageError(f"history ({history}) runs until {hist[et].max()}, after the stream ({stream}) starts at "
                         f"{live[et].min()}: split them at one time so the backtest never trains on the future")
    for frame in (hist, live):
        frame[PERIOD] = periods.index(frame[et])
        frame[REAL_TIME] = frame[et]
        frame[et] = periods.to_logical_time(frame[et], frame[PERIOD].to_numpy())
    live[REAL_LABEL_TIME] = live[LABEL_TIME]
    live[LABEL_TIME] = periods.to_logical_time(live[LABEL_TIME], live[PERIOD].to_numpy())
    return Inputs(hist, live, periods, len(hist_bad), len(live_bad))
