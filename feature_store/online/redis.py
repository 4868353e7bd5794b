"""Production online store: one Redis hash per entity key under `flywheel:<namespace>:<entity>:<key>`, with
fields `<feature>` (JSON value) and `<feature>@t` (as-of, epoch microseconds).

Newer-wins is decided inside Redis by a small Lua script, so concurrent writers cannot interleave a check and a
set; reads of a whole request batch, across entities, are one pipelined round trip.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import orjson

from feature_store.online.base import OnlineStore, Row, StoredValue, decode, encode, to_micros

_NEWER_WINS = """
local n = 0
for i = 1, #ARGV, 3 do
  local stamp = ARGV[i] .. '@t'
  local cur = redis.call('HGET', KEYS[1], stamp)
  if (not cur) or tonumber(cur) <= tonumber(ARGV[i + 2]) then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1], stamp, ARGV[i + 2])
    n = n + 1
  end
end
return n
"""
_PIPELINE_KEYS = 1000


class RedisStore(OnlineStore):
    def __init__(self, uri: str, namespace: str) -> None:
        import redis

        super().__init__(namespace)
        self.uri = uri
        self.client = redis.Redis.from_url(uri, socket_timeout=5, socket_connect_timeout=5)
        self._script = self.client.register_script(_NEWER_WINS)
        self._async_client = None

    def prefix(self, entity: str) -> str:
        return f"flywheel:{self.namespace}:{entity}:"

    def _state_key(self, entity: str) -> str:
        return f"flywheel:{self.namespace}:_state:{entity}"

    def write(self, entity: str, rows: Iterable[Row]) -> int:
        by_key: dict[str, list[object]] = defaultdict(list)
        for key, feature, value, as_of in rows:
            by_key[key].extend((feature, encode(value), to_micros(as_of)))
        prefix = self.prefix(entity)
        items = list(by_key.items())
        stored = 0
        for i in range(0, len(items), _PIPELINE_KEYS):
            pipe = self.client.pipeline(transaction=False)
            for key, args in items[i:i + _PIPELINE_KEYS]:
                self._script(keys=[prefix + key], args=args, client=pipe)
            stored += sum(pipe.execute())
        return stored

    def read(self, entity: str, keys: Sequence[str], features: Sequence[str]) -> list[dict[str, StoredValue]]:
        return self.read_entities({entity: (keys, features)})[entity]

    def _queue_reads(self, pipe, wanted: dict[str, tuple[Sequence[str], Sequence[str]]]):
        for entity, (keys, features) in wanted.items():
            fields = [x for f in features for x in (f, f"{f}@t")]
            prefix = self.prefix(entity)
            for key in keys:
                pipe.hmget(prefix + key, fields)
        return pipe

    def read_entities(
        self, wanted: dict[str, tuple[Sequence[str], Sequence[str]]]
    ) -> dict[str, list[dict[str, StoredValue]]]:
        return self._parse(self._queue_reads(self.client.pipeline(transaction=False), wanted).execute(), wanted)

    async def read_entities_async(
        self, wanted: dict[str, tuple[Sequence[str], Sequence[str]]]
    ) -> dict[str, list[dict[str, StoredValue]]]:
        if self._async_client is None:  # created in the server's event loop, on first use
            import redis.asyncio

            self._async_client = redis.asyncio.Redis.from_url(self.uri, socket_timeout=5, socket_connect_timeout=5)
        pipe = self._queue_reads(self._async_client.pipeline(transaction=False), wanted)
        return self._parse(await pipe.execute(), wanted)

    @staticmethod
    def _parse(replies_list: list, wanted: dict[str, tuple[Sequence[str], Sequence[str]]]
               ) -> dict[str, list[dict[str, StoredValue]]]:
        replies = iter(replies_list)
        out: dict[str, list[dict[str, StoredValue]]] = {}
        for entity, (keys, features) in wanted.items():
            rows = []
            for _ in keys:
                got = next(replies)
                rows.append({f: StoredValue(decode(got[2 * j]), int(got[2 * j + 1]))
                             for j, f in enumerate(features) if got[2 * j] is not None})
            out[entity] = rows
        return out

    def clear(self, entity: str | None = None) -> None:
        pattern = f"flywheel:{self.namespace}:*" if entity is None else self.prefix(entity) + "*"
        batch: list[bytes] = []
        for k in self.client.scan_iter(match=pattern, count=1000):
            batch.append(k)
            if len(batch) >= 1000:
                self.client.unlink(*batch)
                batch.clear()
        if batch:
            self.client.unlink(*batch)
        if entity is not None:
            self.client.unlink(self._state_key(entity))

    def get_state(self, entity: str) -> dict | None:
        raw = self.client.get(self._state_key(entity))
        return None if raw is None else orjson.loads(raw)

    def set_state(self, entity: str, state: dict) -> None:
        self.client.set(self._state_key(entity), orjson.dumps(state))

    def close(self) -> None:
        self.client.close()

    async def aclose(self) -> None:
        if self._async_client is not None:
            await self._async_client.aclose()
            self._async_client = None
