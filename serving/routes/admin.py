"""Operator actions behind the admin token: re-read the registry aliases, seal every worker's spools now."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response

from pipeline.errors import LogUnavailable
from pipeline.tags import Alias
from serving.deps import AdminToken, State
from serving.responses import json_response, unavailable

router = APIRouter(prefix="/admin", dependencies=[AdminToken])


@router.post("/reload", summary="Check the registry aliases now (admin token)")
async def reload(state: State) -> Response:
    versions = {slot.alias: await asyncio.to_thread(slot.refresh) for slot in state.slots}
    return json_response({"model_version": versions[Alias.CHAMPION], "versions": versions,
                          "last_error": state.champion.last_error})


@router.post("/flush", summary="Seal every worker's spools into Parquet segments now (admin token)")
async def flush(state: State) -> Response:
    """Used before collecting a day that just ended, instead of waiting a seal interval."""
    wait_s = 10 * state.settings.prediction_log.flush_interval_ms / 1000 + 5
    try:
        sealed = {lg.stream: await asyncio.to_thread(lg.seal) for lg in state.logs}
        acked, missing = await asyncio.to_thread(state.workers.request_flush, wait_s)
    except (LogUnavailable, OSError) as e:
        return unavailable(f"sealing failed: {e}", state.settings.serving.retry_after_s)
    if missing:
        return json_response({"detail": f"workers {missing} did not seal in time", "sealed": sealed}, 503,
                             {"Retry-After": str(state.settings.serving.retry_after_s)})
    return json_response({"sealed": sealed, "workers": acked})
