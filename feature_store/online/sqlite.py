"""Embedded online store: one SQLite file (WAL, so the server reads while materialization writes)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import orjson

from feature_store.online.base import OnlineStore, Row, StoredValue, decode, encode, to_micros

_SCHEMA = """
CREATE TABLE IF NOT EXISTS online_values (
    ns TEXT NOT NULL, entity TEXT NOT NULL, key TEXT NOT NULL, feature TEXT NOT NULL,
    value BLOB NOT NULL, as_of INTEGER NOT NULL,
    PRIMARY KEY (ns, entity, key, feature)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS online_state (
    ns TEXT NOT NULL, entity TEXT NOT NULL, state BLOB NOT NULL, PRIMARY KEY (ns, entity)
) WITHOUT ROWID;
"""
_UPSERT = """
INSERT INTO online_values (ns, entity, key, feature, value, as_of) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (ns, entity, key, feature) DO UPDATE SET value = excluded.value, as_of = excluded.as_of
WHERE excluded.as_of >= online_values.as_of
"""
_CHUNK = 500  # keys per SELECT: well under SQLite's bound-variable limit


class SQLiteStore(OnlineStore):
    def __init__(self, path: Path, namespace: str) -> None:
        super().__init__(namespace)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._conn().executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        """One connection per thread: sqlite3 connections must not be shared across threads."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def write(self, entity: str, rows: Iterable[Row]) -> int:
        params = [(self.namespace, entity, key, feature, encode(value), to_micros(as_of))
                  for key, feature, value, as_of in rows]
        conn = self._conn()
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.executemany(_UPSERT, params)
            return cur.rowcount

    def read(self, entity: str, keys: Sequence[str], features: Sequence[str]) -> list[dict[str, StoredValue]]:
        found: dict[str, dict[str, StoredValue]] = {}
        conn = self._conn()
        fmarks = ",".join("?" * len(features))
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), _CHUNK):
            chunk = unique[i:i + _CHUNK]
            sql = (f"SELECT key, feature, value, as_of FROM online_values WHERE ns = ? AND entity = ? "
                   f"AND key IN ({','.join('?' * len(chunk))}) AND feature IN ({fmarks})")
            for key, feature, value, as_of in conn.execute(sql, (self.namespace, entity, *chunk, *features)):
                found.setdefault(key, {})[feature] = StoredValue(decode(value), as_of)
        return [found.get(k, {}) for k in keys]

    def clear(self, entity: str | None = None) -> None:
        conn = self._conn()
        where, args = ("ns = ?", (self.namespace,)) if entity is None else \
            ("ns = ? AND entity = ?", (self.namespace, entity))
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"DELETE FROM online_values WHERE {where}", args)
            conn.execute(f"DELETE FROM online_state WHERE {where}", args)

    def get_state(self, entity: str) -> dict | None:
        row = self._conn().execute("SELECT state FROM online_state WHERE ns = ? AND entity = ?",
                                   (self.namespace, entity)).fetchone()
        return None if row is None else orjson.loads(row[0])

    def set_state(self, entity: str, state: dict) -> None:
        self._conn().execute("INSERT OR REPLACE INTO online_state (ns, entity, state) VALUES (?, ?, ?)",
                             (self.namespace, entity, orjson.dumps(state)))

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
