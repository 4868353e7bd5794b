"""What operators and orchestrators poll: liveness, readiness (model loaded and log writable), details, metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline.checks.loop_health import data_age_s
from pipeline.tags import Tag
from serving.deps import State
from serving.responses import json_response

router = APIRouter()


@router.get("/health")
async def health(state: State) -> Response:
    loaded, challenger = state.champion.current, state.challenger
    return json_response({
        "status": "ok" if loaded and not state.champion.fallback_from and not state.flusher.last_error
        and not any(lg.error or lg.seal_error for lg in state.logs) else "degraded",
        "model_name": state.rt.model_name,
        "model_version": loaded.version if loaded else None,
        "challenger_version": challenger.current.version if challenger and challenger.current else None,
        "canary_share": state.settings.serving.canary_share,
        "last_error": state.champion.last_error,
        "fallback_from": state.champion.fallback_from,
        "model_data_day": loaded.data_day.isoformat() if loaded and loaded.data_day else None,
        "model_data_age_s": data_age_s({Tag.DAY: loaded.data_day.isoformat()})
        if loaded and loaded.data_day else None,
        "log": {lg.stream: lg.health() for lg in state.logs},
        "flusher_error": state.flusher.last_error,
    })


@router.get("/health/ready")
async def ready(state: State) -> Response:
    problems = [lg.error for lg in state.logs if lg.error]
    if state.champion.current is None:
        problems.append(f"no model loaded: {state.champion.last_error}")
    return json_response({"ready": not problems, "problems": problems}, 200 if not problems else 503)


@router.get("/v2/health/ready")
async def v2_ready(state: State) -> Response:
    return await ready(state)


@router.get("/health/live")
async def live() -> Response:
    return json_response({"live": True})


@router.get("/metrics")
async def prom(state: State) -> Response:
    state.metrics.observe_logs(state.logs, state.scorer.queued_rows)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
