"""The online store's small interface: latest entity feature values by key, for the model server.

One module per backend beside this one (`sqlite.py` embedded default, `redis.py` for production), chosen by
`open_store` from `settings.online_store_uri`. Each value is kept with its as-of time and a write never
replaces a newer value with an older one, so materialization can be re-run, backfilled or run concurrently in
any order and the store still converges on the latest values. Values are stored JSON-encoded so a store needs
no knowledge of the spec's types.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

import orjson

Row = tuple[str, str, object, datetime]
"""(entity key, feature, value, as-of time): one value to write."""


class StoredValue(NamedTuple):
    value: object
    as_of_us: int
    """As-of time in epoch microseconds: the server only needs `value`, so the datetime is built on demand."""

    @property
    def as_of(self) -> datetime:
        return from_micros(self.as_of_us)


def to_micros(t: datetime) -> int:
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return int(t.timestamp()) * 1_000_000 + t.microsecond


def from_micros(us: int) -> datetime:
    return datetime.fromtimestamp(us // 1_000_000, tz=UTC).replace(microsecond=us % 1_000_000)


def encode(value: object) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def decode(raw: bytes | str) -> object:
    return orjson.loads(raw)


class OnlineStore(ABC):
    """Values live under a namespace (the spec's name), then entity, key and feature."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    @abstractmethod
    def write(self, entity: str, rows: Iterable[Row]) -> int:
        """Store values unless the store already holds a newer one; returns how many were stored."""

    @abstractmethod
    def read(self, entity: str, keys: Sequence[str], features: Sequence[str]) -> list[dict[str, StoredValue]]:
        """One dict per key, in order, with the features the store knows for it (a missing key: empty)."""

    def read_entities(
        self, wanted: dict[str, tuple[Sequence[str], Sequence[str]]]
    ) -> dict[str, list[dict[str, StoredValue]]]:
        """Several entities' reads at once ({entity: (keys, features)}); remote stores make it one round trip."""
        return {entity: self.read(entity, keys, features) for entity, (keys, features) in wanted.items()}

    async def read_entities_async(
        self, wanted: dict[str, tuple[Sequence[str], Sequence[str]]]
    ) -> dict[str, list[dict[str, StoredValue]]]:
        """The server's read. An embedded store answers in microseconds, so it reads in place; a networked store
        overrides this with a native async client (a thread hop per request was measured queueing behind the
        default pool: 16 ms mean for a 0.2 ms Redis read at concurrency 32)."""
        return self.read_entities(wanted)

    async def aclose(self) -> None:  # noqa: B027 - optional for backends without async connections
        """Release async connections (the server's shutdown)."""

    @abstractmethod
    def clear(self, entity: str | None = None) -> None:
        """Forget an entity's values and state (default: the whole namespace)."""

    @abstractmethod
    def get_state(self, entity: str) -> dict | None:
        """Bookkeeping kept with the values (materialization's watermark), so clearing the store resets it."""

    @abstractmethod
    def set_state(self, entity: str, state: dict) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional for backends without connections
        """Release connections."""

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
