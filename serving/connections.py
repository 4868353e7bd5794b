"""Connection-level defences uvicorn does not have: a connection that opens and sends nothing (or dribbles its
headers) is closed after `header_timeout_s`, and the concurrency limit counts requests being processed rather
than open sockets. Before, 600 silent connections held every slot of uvicorn's `limit_concurrency` (which counts
connections) and every legitimate request got 503 for as long as they stayed open.

The timer is armed when a connection opens and when each request on it begins, and disarmed once its headers
are complete; idle keep-alive connections between requests are closed by uvicorn's own keep-alive timeout."""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from pipeline.config import Settings, get_settings


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a header deadline. uvicorn builds it by class in every worker process,
    so it reads the deadline from the (environment-driven) settings rather than a constructor argument."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = get_settings().serving.header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._arm()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()


def uvicorn_options(s: Settings) -> dict:
    """What `flywheel serve` hands uvicorn. No `limit_concurrency`: it counts open connections, so the app's
    `InFlightLimit` enforces `max_concurrency` on requests instead."""
    return dict(host=s.serving.host, port=s.serving.port, log_level="warning", timeout_graceful_shutdown=30,
                access_log=False, http=HeaderTimeoutProtocol, timeout_keep_alive=s.serving.keep_alive_timeout_s)
