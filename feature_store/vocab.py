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
        return s.astype("string").map(self.ids).fillna(OOV).to_numpy(dtype=np.int64)

    def update(self, values: pd.Series | Iterable[object], min_count: int) -> list[str]:
        """Count sightings and admit values that reached `min_count`; returns the admitted values in id order."""
        s = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype="object")
        counts = s.dropna().astype("string").value_counts()
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
