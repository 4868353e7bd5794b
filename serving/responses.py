"""JSON answers, one encoder for every route (orjson: numpy scores and enum keys serialise without copies)."""

from __future__ import annotations

import orjson
from fastapi.responses import Response

from pipeline.errors import RequestError


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS),
                    status_code=status, media_type="application/json", headers=headers)


def unavailable(detail: str, retry_after_s: int) -> Response:
    """Every 503 says when to come back, so well-behaved clients back off instead of hammering."""
    return json_response({"detail": detail}, 503, {"Retry-After": str(retry_after_s)})


def refused(exc: RequestError, route: str, metrics) -> Response:
    """A refused request's answer (4xx with the reason), counted under its route template."""
    metrics.requests.labels(route, str(exc.status)).inc()
    # A refused body may still be arriving: closing the connection stops the upload instead of draining it.
    close = {"Connection": "close"} if exc.status in (408, 413) else None
    return json_response({"detail": str(exc)}, exc.status, close)
