"""Growing vocabularies for categorical features, with ids that never change once given.

Id 0 is the shared bucket for values not (yet) in the vocabulary. A new value gets its own id only after it has
been seen `min_count` times, so one-off noise does not bloat the embedding tables, and ids are appended, never
reassigned, so a warm-started embedding row keeps meaning the same value across nights.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import pandas as pd

OOV = 0


def canonical(values: pd.Series) -> pd.Series:
    """Category values as the strings the vocabulary keys on: integral numbers lose their '.0' (an id column
    that went through float in Parquet or JSON is still the same id), missing stays missing."""
    if pd.api.types.is_bool_dtype(values):
        return values.map(lambda v: None if pd.isna(v) else ("true" if v else "false")).astype("string")
    if pd.api.types.is_float_dtype(values):
        integral = values.notna() & (values == values.round())
        out = values.astype("string")
        out[integral] = values[integral].astype("int64").astype("string")
        return out
    if pd.api.types.infer_dtype(values, skipna=True) not in ("string", "empty"):
        return values.map(lambda v: None if pd.isna(v) else canonical_value(v)).astype("string")
    return values.astype("string")


def canonical_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class Vocabulary:
    def __init__(self, ids: dict[str, int] | None = None, pending: dict[str, int] | None = None) -> None:
        self.ids: dict[str, int] = dict(ids or {})
        self.pending: Counter[str] = Counter(pending or {})

    @property
    def size(self) -> int:
        """Rows the embedding table needs: the OOV row plus one per known value."""
        return len(self.ids) + 1

    def encode(self, values: pd.Series | Iterable[object]) -> np.ndarray:
        s = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype="object")
        return canonical(s).map(self.ids).fillna(OOV).to_numpy(dtype=np.int64)

    def update(self, values: pd.Series | Iterable[object], min_count: int) -> list[str]:
        """Count sightings and admit values that reached `min_count`; returns the admitted values in id order."""
        s = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype="object")
        counts = canonical(s.dropna()).value_counts()
        added: list[str] = []
        for value in sorted(counts.index):
            if value in self.ids:
                continue
            self.pending[value] += int(counts[value])
            if self.pending[value] >= min_count:
                self.ids[value] = len(self.ids) + 1
                del self.pending[value]
                added.append(value)
        return added

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {"ids": self.ids, "pending": dict(self.pending)}

    @classmethod
    def from_dict(cls, data: dict[str, dict[str, int]]) -> Vocabulary:
        return cls(data["ids"], data.get("pending"))
