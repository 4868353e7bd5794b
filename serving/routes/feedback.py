"""Labels for earlier predictions, keyed by the request id a scoring route returned and the row's index."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
from fastapi import APIRouter
from fastapi.responses import Response

from pipeline.errors import LogUnavailable
from serving.deps import ApiToken, Body, State
from serving.responses import json_response, unavailable
from serving.schema import parse_feedback

router = APIRouter()


@router.post("/feedback", status_code=202, summary="Labels for earlier predictions (one object or a list)",
             dependencies=[ApiToken])
async def post_feedback(state: State, body: Body) -> Response:
    items = parse_feedback(body, limits=state.limits)
    schema = state.feedback.schema
    ts = schema.field("label_time").type
    now = datetime.now(UTC)
    batch = pa.RecordBatch.from_pydict({
        "request_id": pa.array([i["request_id"] for i in items], pa.string()),
        "row": pa.array([i["row"] for i in items], pa.int32()),
        "label": pa.array([i["label"] for i in items], pa.float64()),
        "label_time": pa.array([i["label_time"] for i in items], ts),
        "received_at": pa.array([now] * len(items), ts),
    }, schema=schema)
    try:
        await state.feedback.durable(state.feedback.append(batch))
    except LogUnavailable as e:
        state.metrics.requests.labels("/feedback", "503").inc()
        return unavailable(f"feedback log unavailable: {e}", state.settings.serving.retry_after_s)
    state.metrics.requests.labels("/feedback", "202").inc()
    return json_response({"accepted": len(items)}, 202)
