"""Scoring routes: Flywheel's own `/predict`, MLflow's `/invocations` and the Open Inference Protocol's
`/v2/models/{name}/infer` share one path (validate, fill entity features, route to a model, score, log) and differ
only in how rows come in and how scores go out."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from fastapi import APIRouter
from fastapi.responses import Response

from pipeline.errors import LogUnavailable, RequestError
from serving.deps import ApiToken, Body, State
from serving.protocols import mlflow_to_rows, v2_response, v2_to_rows
from serving.responses import json_response, unavailable
from serving.schema import fill_from_store, parse_rows, plan_lookup
from serving.scoring import Job
from serving.state import ServerState

log = logging.getLogger("flywheel.serving")
router = APIRouter()


async def _fill_entities(state: ServerState, cols: dict[str, list]) -> str | None:
    """Fill omitted entity features from the online store; the reason when the store cannot answer."""
    if state.store is None or (lookup := plan_lookup(cols, state.spec, state.entity_of)) is None:
        return None
    metrics, started = state.metrics, time.perf_counter()
    try:
        found = await state.store.read_entities_async(lookup.wanted)
    except Exception as e:  # store down: refuse rather than score rows with invented features
        log.error("online store lookup failed", extra={"error": str(e)})
        for entity, (keys, _) in lookup.wanted.items():
            metrics.lookups.labels(entity, "error").inc(len(keys))
        return f"online store unavailable for entity features: {e}"
    metrics.lookup_latency.observe(time.perf_counter() - started)
    for entity, (keys, _) in lookup.wanted.items():
        hits = sum(1 for values in found[entity] if values)
        metrics.lookups.labels(entity, "hit").inc(hits)
        metrics.lookups.labels(entity, "miss").inc(len(keys) - hits)
    fill_from_store(cols, state.spec, lookup, found)
    return None


async def score(state: ServerState, route: str, body: object, request_id: str | None,
                respond: Callable[[Job, list[float]], object]) -> Response:
    """The one scoring path; `body` is `{"rows": [...]}` whatever the protocol."""
    start, s, metrics = time.perf_counter(), state.settings, state.metrics
    cols, times = parse_rows(body, state.spec, s.max_rows_per_request, state.fillable)
    problem = await _fill_entities(state, cols)
    loaded = state.route(cols) if problem is None else None
    if problem is None and loaded is None:
        problem = f"no model loaded: {state.champion.last_error}"
    if problem is not None:
        metrics.requests.labels(route, "503").inc()
        return unavailable(problem, s.retry_after_s)
    job = Job(loaded, cols, times, len(times), request_id or uuid.uuid4().hex)
    try:
        scores = await state.scorer.submit(job)
    except LogUnavailable as e:
        metrics.requests.labels(route, "503").inc()
        return unavailable(f"prediction log unavailable, not serving unlogged predictions: {e}", s.retry_after_s)
    metrics.rows.labels(loaded.version).inc(job.n)
    metrics.batch.observe(job.n)
    metrics.requests.labels(route, "200").inc()
    metrics.latency.labels(route).observe(time.perf_counter() - start)
    return json_response(respond(job, scores.tolist()))


def _own_request_id(body: object) -> str | None:
    request_id = body.get("request_id") if isinstance(body, dict) else None
    if request_id is not None and (not isinstance(request_id, str) or not request_id):
        raise RequestError("request_id: expected a non-empty string")
    return request_id


@router.post("/predict", summary="Score rows of the feature spec; every scored row is logged",
             dependencies=[ApiToken])
async def predict(state: State, body: Body) -> Response:
    return await score(state, "/predict", body, _own_request_id(body), lambda job, scores: {
        "request_id": job.request_id, "model_version": job.loaded.version, "scores": scores})


@router.post("/invocations", summary="MLflow scoring protocol (dataframe_split, dataframe_records, inputs)",
             dependencies=[ApiToken])
async def invocations(state: State, body: Body) -> Response:
    return await score(state, "/invocations", {"rows": mlflow_to_rows(body)}, None,
                       lambda job, scores: {"predictions": scores})


@router.post("/v2/models/{name}/infer", summary="Open Inference Protocol v2", dependencies=[ApiToken])
async def v2_infer(name: str, state: State, body: Body) -> Response:
    model = state.rt.model_name
    if name != model:
        return json_response({"error": f"unknown model {name!r}; this server serves {model!r}"}, 404)
    client_id = body.get("id") if isinstance(body, dict) else None
    return await score(state, "/v2/infer", {"rows": v2_to_rows(body)}, None, lambda job, scores: v2_response(
        model, job.loaded.version, client_id or job.request_id, scores))


@router.get("/v2/models/{name}", summary="Open Inference Protocol v2 model metadata")
async def v2_metadata(name: str, state: State) -> Response:
    model = state.rt.model_name
    if name != model:
        return json_response({"error": f"unknown model {name!r}"}, 404)
    loaded = state.champion.current
    inputs = [{"name": n, "datatype": "FP64" if f.type.value == "numeric" else "BYTES", "shape": [-1]}
              for n, f in state.spec.features.items()]
    return json_response({"name": model, "versions": [loaded.version] if loaded else [], "platform": "flywheel",
                          "inputs": inputs, "outputs": [{"name": "score", "datatype": "FP64", "shape": [-1]}]})
