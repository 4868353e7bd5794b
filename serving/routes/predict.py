"""Scoring routes: Flywheel's own `/predict`, MLflow's `/invocations` and the Open Inference Protocol's
`/v2/models/{name}/infer` share one path (validate, fill entity features, route to a model, score, log) and differ
only in how rows come in and how scores go out."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from typing import Annotated

import orjson
from fastapi import APIRouter, Header
from fastapi.responses import Response

from pipeline.errors import LogUnavailable, ModelOutputInvalid, RequestError
from serving.deps import ApiToken, Body, State
from serving.protocols import mlflow_to_rows, v2_response, v2_to_rows
from serving.request_ids import new_request_id
from serving.responses import json_response, unavailable
from serving.schema import fill_from_store, parse_request_id, parse_rows, plan_lookup
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


def _claim(state: ServerState, request_id: str, where: str, cols: dict[str, list], times: list) -> None:
    """Refuse (409) a client id this worker recently logged with other rows: collect would keep only one."""
    digest = hashlib.blake2b(orjson.dumps([cols, times], option=orjson.OPT_NON_STR_KEYS), digest_size=16).digest()
    if not state.recent_ids.claim(request_id, digest):
        raise RequestError(f"{where}: {request_id!r} was already used for different rows; a retry must resend "
                           "the same rows, a new request needs a new id", status=409)


async def score(state: ServerState, route: str, body: object, client_id: tuple[str | None, str],
                respond: Callable[[Job, list[float]], object]) -> Response:
    """The one scoring path; `body` is `{"rows": [...]}` whatever the protocol, `client_id` the id the client
    chose (or None) and where it came from. The id that is logged is the id that is returned (header
    `X-Request-Id` on every protocol), so feedback can always join on it."""
    start, s, metrics = time.perf_counter(), state.settings, state.metrics
    cols, times = parse_rows(body, state.spec, s.serving.max_rows_per_request, state.fillable, state.limits)
    request_id, where = client_id
    if request_id is not None:
        _claim(state, request_id, where, cols, times)
    problem = await _fill_entities(state, cols)
    loaded = state.route(cols) if problem is None else None
    if problem is None and loaded is None:
        problem = f"no model loaded: {state.champion.last_error}"
    if problem is not None:
        metrics.requests.labels(route, "503").inc()
        return unavailable(problem, s.serving.retry_after_s)
    job = Job(loaded, cols, times, len(times), request_id or new_request_id())
    try:
        scores = await state.scorer.submit(job)
    except LogUnavailable as e:
        metrics.requests.labels(route, "503").inc()
        return unavailable(f"prediction log unavailable, not serving unlogged predictions: {e}", s.serving.retry_after_s)
    except ModelOutputInvalid as e:
        metrics.nonfinite.labels(loaded.version).inc()
        metrics.requests.labels(route, "500").inc()
        return json_response({"detail": str(e)}, 500)
    metrics.answered(route, loaded.version, job.n, time.perf_counter() - start)
    return json_response(respond(job, scores.tolist()), headers={"X-Request-Id": job.request_id})


def _body_id(state: ServerState, body: object, key: str) -> tuple[str | None, str]:
    return parse_request_id(body.get(key) if isinstance(body, dict) else None, key, state.limits), key


@router.post("/predict", summary="Score rows of the feature spec; every scored row is logged",
             dependencies=[ApiToken])
async def predict(state: State, body: Body) -> Response:
    return await score(state, "/predict", body, _body_id(state, body, "request_id"), lambda job, scores: {
        "request_id": job.request_id, "model_version": job.loaded.version, "scores": scores})


@router.post("/invocations", summary="MLflow scoring protocol (dataframe_split, dataframe_records, inputs)",
             description="MLflow's body has no id field: the logged request id travels in the `X-Request-Id` "
                         "header, chosen by the client when it sends one, else made by the server, and returned "
                         "in the response's `X-Request-Id` header for `/feedback`.",
             dependencies=[ApiToken])
async def invocations(state: State, body: Body,
                      x_request_id: Annotated[str | None, Header(description="Optional client request id")] = None,
                      ) -> Response:
    client_id = parse_request_id(x_request_id, "X-Request-Id header", state.limits), "X-Request-Id header"
    return await score(state, "/invocations", {"rows": mlflow_to_rows(body)}, client_id,
                       lambda job, scores: {"predictions": scores})


@router.post("/v2/models/{name}/infer", summary="Open Inference Protocol v2",
             description="The client's `id`, when sent, is the logged request id; else the server makes one. "
                         "Either way the response's `id` is the one to send feedback with.",
             dependencies=[ApiToken])
async def v2_infer(name: str, state: State, body: Body) -> Response:
    model = state.rt.model_name
    if name != model:
        return json_response({"error": f"unknown model {name!r}; this server serves {model!r}"}, 404)
    return await score(state, "/v2/models/{name}/infer", {"rows": v2_to_rows(body)}, _body_id(state, body, "id"),
                       lambda job, scores: v2_response(model, job.loaded.version, job.request_id, scores))


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
