"""Online feature store: latest entity feature values by key for the model server (see base.py)."""

from __future__ import annotations

from pathlib import Path

from feature_store.online.base import OnlineStore, StoredValue
from pipeline.errors import OnlineStoreError


def open_store(uri: str | None, home: Path, namespace: str) -> OnlineStore:
    """The backend `uri` names: None -> SQLite at `home/online.db`; `sqlite:///relative/or/absolute` (a
    relative path is under `home`); `redis://host:port/db` (or `rediss://`)."""
    if uri is None:
        from feature_store.online.sqlite import SQLiteStore

        return SQLiteStore(home / "online.db", namespace)
    if uri.startswith("sqlite:///"):
        from feature_store.online.sqlite import SQLiteStore

        path = Path(uri.removeprefix("sqlite:///"))
        return SQLiteStore(path if path.is_absolute() else home / path, namespace)
    if uri.startswith(("redis://", "rediss://", "unix://")):
        from feature_store.online.redis import RedisStore

        return RedisStore(uri, namespace)
    raise OnlineStoreError(f"online_store_uri {uri!r}: expected sqlite:///path or redis://host:port/db")


__all__ = ["OnlineStore", "OnlineStoreError", "StoredValue", "open_store"]
