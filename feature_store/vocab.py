"""Growing vocabularies for categorical features, with ids that never change once given.

Id 0 is the shared bucket for values not (yet) in the vocabulary. A new value gets its own id only after it has
been seen `min_count` times, so one-off noise does not bloat the embedding tables, and ids are appended, never
reassigned, so a warm-started embedding row keeps meaning the same value across nights.

Expiry: each known value remembers the last day it was seen; one unseen for longer than the expiry window is
moved from `ids` (the lookup every encoder uses, training and serving alike) to `retired`, so it encodes as OOV
while its id and embedding row stay reserved. Seen again, it comes back under the same id.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import date, timedelta

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


def count(values: pd.Series | Iterable[object]) -> Counter[str]:
    """Sightings per canonical value: what `Vocabulary.admit` takes, summable over record batches."""
    s = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype="object")
    return Counter({str(k): int(n) for k, n in canonical(s.dropna()).value_counts().items()})


class Vocabulary:
    def __init__(self, ids: dict[str, int] | None = None, pending: dict[str, int] | None = None,
                 last_seen: dict[str, str] | None = None, retired: dict[str, int] | None = None) -> None:
        self.ids: dict[str, int] = dict(ids or {})
        self.pending: Counter[str] = Counter(pending or {})
        self.last_seen: dict[str, str] = dict(last_seen or {})
        self.retired: dict[str, int] = dict(retired or {})

    @property
    def size(self) -> int:
        """Rows the embedding table needs: the OOV row plus one per value ever admitted (retired ones too)."""
        return len(self.ids) + len(self.retired) + 1

    def encode(self, values: pd.Series | Iterable[object]) -> np.ndarray:
        s = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype="object")
        return canonical(s).map(self.ids).fillna(OOV).to_numpy(dtype=np.int64)

    def update(self, values: pd.Series | Iterable[object], min_count: int, day: date | None = None) -> list[str]:
        """Count sightings and admit values that reached `min_count`; returns the admitted values in id order."""
        return self.admit(count(values), min_count, day)

    def admit(self, counts: Mapping[str, int], min_count: int, day: date | None = None) -> list[str]:
        """Admit from summed sightings (so a day streamed in batches gets the ids the whole day would); `day`
        marks every value seen as last seen then, and brings a retired value back under its old id."""
        added: list[str] = []
        for value in sorted(counts):
            if value in self.retired:
                self.ids[value] = self.retired.pop(value)
            elif value not in self.ids:
                self.pending[value] += int(counts[value])
                if self.pending[value] < min_count:
                    continue
                self.ids[value] = self.size
                del self.pending[value]
                added.append(value)
            if day is not None:
                self.last_seen[value] = day.isoformat()
        return added

    def expire(self, today: date, days: int) -> list[str]:
        """Retire values unseen for more than `days` days (0: never). A value with no sighting on record (a
        vocabulary from before expiry existed) counts as seen today, so turning expiry on retires nothing at once."""
        if days <= 0:
            return []
        cutoff = (today - timedelta(days=days)).isoformat()
        gone = [v for v in self.ids if self.last_seen.setdefault(v, today.isoformat()) < cutoff]
        for v in gone:
            self.retired[v] = self.ids.pop(v)
        return sorted(gone)

    def to_dict(self) -> dict[str, dict]:
        return {"ids": self.ids, "pending": dict(self.pending), "last_seen": self.last_seen,
                "retired": self.retired}

    @classmethod
    def from_dict(cls, data: dict[str, dict]) -> Vocabulary:
        return cls(data["ids"], data.get("pending"), data.get("last_seen"), data.get("retired"))
