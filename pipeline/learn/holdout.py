"""The one definition of "holdout": the time-latest share of a day, which training never sees and evaluation
scores. Train, evaluate, bootstrap and the trainer's validation slice all cut with these functions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

TIE_BREAKERS = ("request_id", "row")


def time_order(keys: pa.Table, time_col: str) -> np.ndarray:
    """Row positions in time order, ties broken by request id and row (a stable sort, missing times last): one
    order for the same rows however the day's files happened to be written (segments are named per server
    process), so whatever depends on row order (the split, the replay sample) is reproducible."""
    sort_keys = [(time_col, "ascending"), *((c, "ascending") for c in TIE_BREAKERS if c in keys.column_names)]
    return pc.sort_indices(keys, sort_keys=sort_keys).to_numpy().astype(np.int64)


def split_positions(keys: pa.Table, time_col: str, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Row positions of the earlier and the time-latest `holdout_fraction` of a day, each in `time_order`. Needs
    only the key columns, so a large day is split without being loaded whole: the one definition of "holdout"
    that train and evaluate share. Arrow's sort: a 2M-row day in 0.1 s, where pandas' multi-key sort took 4 s
    and 450 MB."""
    order = time_order(keys, time_col)
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
