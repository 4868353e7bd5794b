"""Per-worker request limits that need memory across requests: the in-flight cap and the recent client ids."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

# Probes must see the truth during overload: an orchestrator that cannot reach /health restarts a busy server.
EXEMPT = ("/health", "/v2/health", "/metrics")


class InFlightLimit:
    """Answers 503 (JSON, Retry-After) once `limit` requests are being processed in this worker. It counts ASGI
    requests, which exist only after a request's headers arrived, so silent connections never take a slot."""

    def __init__(self, app: ASGIApp, limit: int, retry_after_s: int,
                 on_reject: Callable[[str], None] = lambda path: None) -> None:
        self.app, self.limit, self.on_reject = app, limit, on_reject
        self.retry_after = str(retry_after_s).encode()
        self.active = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(EXEMPT):
            await self.app(scope, receive, send)
            return
        if self.active >= self.limit:
            self.on_reject(scope["path"])
            body = orjson.dumps({"detail": f"server busy: {self.limit} requests in progress in this worker"})
            await send({"type": "http.response.start", "status": 503, "headers": [
                (b"content-type", b"application/json"), (b"retry-after", self.retry_after),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class RecentIds:
    """The last `capacity` client-chosen request ids of this worker, each with a digest of its rows. A retry (same
    id, same rows) is allowed, it logs the same keys that collect deduplicates; the same id with other rows would
    make collect drop one request's rows as duplicates, so it is refused. The guarantee is per worker and per
    window: with several workers, or after `capacity` newer ids, a reuse is no longer seen here (collect then
    keeps the first logged and counts the rest in `duplicates_dropped`)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._seen: OrderedDict[str, bytes] = OrderedDict()

    def claim(self, request_id: str, digest: bytes) -> bool:
        """False when the id was seen with different rows."""
        if self.capacity == 0:
            return True
        known = self._seen.get(request_id)
        if known is not None:
            self._seen.move_to_end(request_id)
            return known == digest
        self._seen[request_id] = digest
        if len(self._seen) > self.capacity:
            self._seen.popitem(last=False)
        return True
