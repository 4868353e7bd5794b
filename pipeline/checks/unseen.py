"""Unseen categories: the share of a day's rows carrying a category value nothing before it had.

"Before" is what the model being trained on the day already knows (the champion's vocabularies, which include
everything bootstrap saw) together with the recent *collected* days, whatever their gate outcome. Measuring
against validated days only let a single failed day freeze the loop: a failed day never becomes reference, so
every later day looked just as new and failed too.

Entity keys (user and item ids) are identities: new ones are normal and never counted. An attribute of an
entity (a feature declared with `entity: E` that is not E's key, a customer's region) is counted only on rows
whose entity key is already known: a new customer arriving with a region of its own is churn, not an unseen
category; a known customer suddenly showing a never-seen region is what this check is for.

Known keys are kept as a sorted array of 64-bit hashes, so the set of known entities costs 8 bytes each.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import pandas as pd

from feature_store.spec import FeatureSpec
from feature_store.vocab import Vocabulary, canonical

EXAMPLES = 3


def rules(spec: FeatureSpec) -> dict[str, str | None]:
    """Each tracked categorical -> the key column of the entity it describes (None: counted on every row)."""
    keys = {e.key for e in spec.entities.values()}
    out: dict[str, str | None] = {}
    for name in spec.categorical:
        if name in keys:
            continue
        f = spec.features[name]
        out[name] = spec.entities[f.entity].key if f.entity is not None else None
    return out


def _hashes(values: pd.Series) -> np.ndarray:
    present = values.dropna()
    return pd.util.hash_array(present.to_numpy(dtype=object)) if len(present) else np.zeros(0, np.uint64)


def vocabulary_values(vocab: Vocabulary) -> set[str]:
    """Every value a vocabulary has met: admitted, retired, and still pending below `vocab_min_count`."""
    return set(vocab.ids) | set(vocab.retired) | set(vocab.pending) | set(vocab.last_seen)


class KnownCategories:
    """What counts as seen, per tracked column, plus the known keys of every entity with tracked attributes.
    `sources` says what it was built from, for the report and the failure message."""

    def __init__(self, spec: FeatureSpec) -> None:
        self.rules = rules(spec)
        self.values: dict[str, set[str]] = {c: set() for c in self.rules}
        self.key_columns = sorted({k for k in self.rules.values() if k is not None})
        self._key_parts: dict[str, list[np.ndarray]] = {k: [] for k in self.key_columns}
        self._keys: dict[str, np.ndarray] = {}
        self.sources: list[str] = []

    @property
    def columns(self) -> list[str]:
        """The columns a collected day must provide: tracked values and entity keys."""
        return [*self.rules, *self.key_columns]

    def add_vocabularies(self, vocabs: dict[str, Vocabulary], source: str) -> None:
        for c, v in vocabs.items():
            if c in self.values:
                self.values[c] |= vocabulary_values(v)
            if c in self._key_parts:
                self._key_parts[c].append(_hashes(pd.Series(sorted(vocabulary_values(v)), dtype=object)))
        self.sources.append(source)

    def add_frame(self, frame: pd.DataFrame) -> None:
        """Values of one record batch of a collected day (columns it lacks are skipped)."""
        for c in self.values:
            if c in frame:
                self.values[c].update(canonical(frame[c]).dropna().unique().tolist())
        for k in self._key_parts:
            if k in frame:
                self._key_parts[k].append(np.unique(_hashes(canonical(frame[k]))))

    def add_source(self, source: str) -> None:
        self.sources.append(source)

    def known_keys(self, key: str, values: pd.Series) -> np.ndarray:
        """Per row: is its entity key one seen before (null keys are not)."""
        if key not in self._keys:
            parts = self._key_parts.pop(key, [])
            self._keys[key] = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
        known = self._keys[key]
        canon = canonical(values)
        out = np.zeros(len(canon), dtype=bool)
        present = canon.notna().to_numpy()
        if len(known) and present.any():
            h = pd.util.hash_array(canon[present].to_numpy(dtype=object))
            at = np.minimum(np.searchsorted(known, h), len(known) - 1)
            out[present] = known[at] == h
        return out


class UnseenCounter:
    """Counts, chunk by chunk, the rows each check applies to and those among them with an unseen value."""

    def __init__(self, known: KnownCategories | None) -> None:
        self.known = known
        cols = list(known.rules) if known is not None else []
        self.eligible = dict.fromkeys(cols, 0)
        self.unseen = dict.fromkeys(cols, 0)
        self.examples: dict[str, Counter[str]] = {c: Counter() for c in cols}

    def update(self, frame: pd.DataFrame) -> None:
        if self.known is None or not len(frame):
            return
        key_known = {k: self.known.known_keys(k, frame[k]) for k in self.known.key_columns}
        for c, key in self.known.rules.items():
            values = canonical(frame[c])
            applies = values.notna().to_numpy()
            if key is not None:
                applies = applies & key_known[key]
            new = applies & ~values.isin(self.known.values[c]).fillna(False).to_numpy(dtype=bool)
            self.eligible[c] += int(applies.sum())
            self.unseen[c] += int(new.sum())
            if new.any():
                self.examples[c].update(values[new].value_counts().head(EXAMPLES).to_dict())

    def shares(self) -> dict[str, float] | None:
        """Unseen share per column over the rows it applies to; None when there was nothing to compare with."""
        if self.known is None:
            return None
        return {c: self.unseen[c] / n if (n := self.eligible[c]) else 0.0 for c in self.eligible}

    def top_examples(self, column: str) -> list[str]:
        return [v for v, _ in self.examples[column].most_common(EXAMPLES)]


def describe_sources(sources: Iterable[str]) -> str:
    return ", ".join(sources) or "nothing"
