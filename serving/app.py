"""The model server's routes. Scores with the slot's current model, logs every scored row before answering,
and refuses (503) to serve predictions it cannot log. Flywheel's own `/predict`, MLflow's `/invocations` and
the Open Inference Protocol's `/v2/models/{name}/infer` share one validation, scoring and logging path."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import orjson
import pyarrow as pa
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from feature_store.entity_tables import lookup_features
from feature_store.log_schema import FEEDBACK, PREDICTIONS, feedback_schema, prediction_schema
from feature_store.online import open_store
from pipeline.config import Settings, get_settings
from pipeline.errors import LogUnavailable, ModelOutputInvalid, RequestError
from pipeline.runtime import runtime
from pipeline.tags import Alias
from serving.log_sink import Flusher, SegmentLog
from serving.metrics import Metrics
from serving.model_slot import Loaded, ModelSlot
from serving.protocols import mlflow_to_rows, v2_response, v2_to_rows
from serving.schema import (
    fill_from_store,
    openapi_bodies,
    parse_feedback,
    parse_rows,
    plan_lookup,
    warmup_frame,
)
from serving.scoring import Job, Scorer
from serving.workers import WorkerGroup

log = logging.getLogger("flywheel.serving")


def _json(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS), status_code=status,
                    media_type="application/json", headers=headers)


def _bucket(key: str) -> float:
    """Stable position of an entity in [0, 1): the same user lands on the same side of a canary split."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


def create_app(settings: Settings | None = None) -> FastAPI:
    s = settings or get_settings()
    # Small-batch inference is latency-bound: one intra-op thread per worker avoids oversubscribing the cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // s.serving_workers))
    rt = runtime(s)
    spec = rt.spec
    metrics = Metrics()
    pred_schema, fb_schema = prediction_schema(spec), feedback_schema()
    predictions = SegmentLog("predictions", pred_schema, s.spool_dir, rt.lake, PREDICTIONS,
                             (spec.event_time, "served_at"), durability=s.log_durability)
    feedback = SegmentLog("feedback", fb_schema, s.spool_dir, rt.lake, FEEDBACK, ("label_time", "received_at"),
                          durability=s.log_durability)
    logs = [predictions, feedback]

    def on_event(kind: str, version: str, alias: str) -> None:
        metrics.reloads.labels(kind, alias).inc()
        if kind == "swapped":
            metrics.version.labels(alias).set(float(version))

    champion = ModelSlot(rt, warmup_frame(spec), on_event=on_event)
    challenger = ModelSlot(rt, warmup_frame(spec), on_event=on_event, alias=Alias.CHALLENGER) \
        if s.canary_share > 0 else None
    slots = [x for x in (champion, challenger) if x is not None]
    workers = WorkerGroup(s.spool_dir / "workers")
    flusher = Flusher(logs, s.log_flush_interval_ms / 1000, s.log_seal_interval_s,
                      on_tick=lambda: workers.answer_flush_request(lambda: [lg.seal() for lg in logs]))
    scorer = Scorer(spec, predictions if s.log_predictions else None, s.max_batch_rows,
                    on_batch=lambda rows, jobs: metrics.microbatch.observe(rows))
    admin_token = s.resolved_admin_token()
    # Entity features a request may omit: filled from the online store by the entity's key (one batched read).
    entity_of = lookup_features(spec)
    fillable = frozenset(entity_of)
    store = open_store(s.online_store_uri, s.home_abs, spec.name) if entity_of else None
    api_tokens = [t.encode() for t in s.api_tokens]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        workers.join()
        for lg in logs:
            recovered = lg.recover()
            if recovered:
                log.warning("recovered rows from spools of a previous process",
                            extra={"stream": lg.stream, "rows": recovered})
        for slot in slots:
            await asyncio.to_thread(slot.refresh)
            slot.start(s.alias_poll_interval_s)
        flusher.start()
        yield
        for slot in slots:
            slot.stop()
        flusher.stop()
        workers.leave()
        if store is not None:
            await store.aclose()
            store.close()

    app = FastAPI(title="Flywheel model server", version="0.1.0", lifespan=lifespan,
                  description=f"Scores rows of the feature spec '{spec.name}' with {rt.model_name}@champion.")
    app.state.slot, app.state.logs = champion, logs

    def bearer(request: Request) -> bytes:
        return request.headers.get("authorization", "").removeprefix("Bearer ").encode()

    def admin_ok(request: Request) -> bool:
        return hmac.compare_digest(bearer(request), admin_token.encode())

    def api_ok(request: Request) -> bool:
        if not api_tokens:
            return True
        got = bearer(request)
        return any(hmac.compare_digest(got, t) for t in api_tokens)

    async def body_json(request: Request) -> object:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > s.max_body_bytes:
            raise RequestError(f"body: {declared} bytes exceed the limit of {s.max_body_bytes}", status=413)
        raw = await request.body()
        if len(raw) > s.max_body_bytes:
            raise RequestError(f"body: {len(raw)} bytes exceed the limit of {s.max_body_bytes}", status=413)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise RequestError(f"body: not valid JSON ({e})") from e

    def route(cols: dict[str, list]) -> Loaded | None:
        if challenger is not None and challenger.current is not None and spec.sticky_key:
            if _bucket(str(cols[spec.sticky_key][0])) < s.canary_share:
                return challenger.current
        return champion.current

    async def score(route_name: str, request: Request, rows_of: Callable[[object], tuple[object, str | None]],
                    respond: Callable[[Job, list[float]], object]) -> Response:
        start = time.perf_counter()
        if not api_ok(request):
            metrics.requests.labels(route_name, "401").inc()
            return _json({"detail": "a valid API token is required (Authorization: Bearer ...)"}, 401)
        body, request_id = rows_of(await body_json(request))
        cols, times = parse_rows(body, spec, s.max_rows_per_request, fillable)
        if store is not None and (lookup := plan_lookup(cols, spec, entity_of)) is not None:
            started = time.perf_counter()
            try:
                found = await store.read_entities_async(lookup.wanted)
            except Exception as e:  # store down: refuse rather than score rows with invented features
                log.error("online store lookup failed", extra={"error": str(e)})
                for entity, (keys, _) in lookup.wanted.items():
                    metrics.lookups.labels(entity, "error").inc(len(keys))
                metrics.requests.labels(route_name, "503").inc()
                return _json({"detail": f"online store unavailable for entity features: {e}"}, 503,
                             {"Retry-After": "5"})
            metrics.lookup_latency.observe(time.perf_counter() - started)
            for entity, (keys, _) in lookup.wanted.items():
                hits = sum(1 for values in found[entity] if values)
                metrics.lookups.labels(entity, "hit").inc(hits)
                metrics.lookups.labels(entity, "miss").inc(len(keys) - hits)
            fill_from_store(cols, spec, lookup, found)
        loaded = route(cols)
        if loaded is None:
            metrics.requests.labels(route_name, "503").inc()
            return _json({"detail": f"no model loaded: {champion.last_error}"}, 503, {"Retry-After": "5"})
        n = len(times)
        job = Job(loaded, cols, times, n, request_id or uuid.uuid4().hex)
        try:
            scores = await scorer.submit(job)
        except LogUnavailable as e:
            metrics.requests.labels(route_name, "503").inc()
            return _json({"detail": f"prediction log unavailable, not serving unlogged predictions: {e}"}, 503)
        except ModelOutputInvalid as e:
            metrics.nonfinite.labels(loaded.version).inc()
            metrics.requests.labels(route_name, "500").inc()
            return _json({"detail": str(e)}, 500)
        metrics.rows.labels(loaded.version).inc(n)
        metrics.batch.observe(n)
        metrics.requests.labels(route_name, "200").inc()
        metrics.latency.labels(route_name).observe(time.perf_counter() - start)
        return _json(respond(job, scores.tolist()))

    def own_rows(body: object) -> tuple[object, str | None]:
        request_id = body.get("request_id") if isinstance(body, dict) else None
        if request_id is not None and (not isinstance(request_id, str) or not request_id):
            raise RequestError("request_id: expected a non-empty string")
        return body, request_id

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    bodies = openapi_bodies(spec, s.max_rows_per_request,
                            {n: spec.entities[e].key for n, e in entity_of.items()})

    @app.post("/predict", summary="Score rows of the feature spec; every scored row is logged",
              openapi_extra=bodies["predict"])
    async def predict(request: Request) -> Response:
        return await score("/predict", request, own_rows, lambda job, scores: {
            "request_id": job.request_id, "model_version": job.loaded.version, "scores": scores})

    @app.post("/invocations", summary="MLflow scoring protocol (dataframe_split, dataframe_records, inputs)")
    async def invocations(request: Request) -> Response:
        return await score("/invocations", request, lambda b: ({"rows": mlflow_to_rows(b)}, None),
                           lambda job, scores: {"predictions": scores})

    @app.post("/v2/models/{name}/infer", summary="Open Inference Protocol v2")
    async def v2_infer(name: str, request: Request) -> Response:
        if name != rt.model_name:
            return _json({"error": f"unknown model {name!r}; this server serves {rt.model_name!r}"}, 404)
        holder: dict[str, str | None] = {}

        def rows_of(body: object) -> tuple[object, str | None]:
            holder["id"] = body.get("id") if isinstance(body, dict) else None
            return {"rows": v2_to_rows(body)}, None

        return await score("/v2/infer", request, rows_of, lambda job, scores: v2_response(
            rt.model_name, job.loaded.version, holder.get("id") or job.request_id, scores))

    @app.get("/v2/models/{name}", summary="Open Inference Protocol v2 model metadata")
    async def v2_metadata(name: str) -> Response:
        if name != rt.model_name:
            return _json({"error": f"unknown model {name!r}"}, 404)
        loaded = champion.current
        inputs = [{"name": n, "datatype": "FP64" if f.type.value == "numeric" else "BYTES", "shape": [-1]}
                  for n, f in spec.features.items()]
        return _json({"name": rt.model_name, "versions": [loaded.version] if loaded else [], "platform": "flywheel",
                      "inputs": inputs, "outputs": [{"name": "score", "datatype": "FP64", "shape": [-1]}]})

    @app.get("/v2/health/ready")
    async def v2_ready() -> Response:
        return await ready()

    @app.post("/feedback", status_code=202, summary="Labels for earlier predictions (one object or a list)",
              openapi_extra=bodies["feedback"])
    async def post_feedback(request: Request) -> Response:
        if not api_ok(request):
            return _json({"detail": "a valid API token is required (Authorization: Bearer ...)"}, 401)
        items = parse_feedback(await body_json(request))
        now = datetime.now(UTC)
        ts = fb_schema.field("label_time").type
        batch = pa.RecordBatch.from_pydict({
            "request_id": pa.array([i["request_id"] for i in items], pa.string()),
            "row": pa.array([i["row"] for i in items], pa.int32()),
            "label": pa.array([i["label"] for i in items], pa.float64()),
            "label_time": pa.array([i["label_time"] for i in items], ts),
            "received_at": pa.array([now] * len(items), ts),
        }, schema=fb_schema)
        try:
            await feedback.durable(feedback.append(batch))
        except LogUnavailable as e:
            metrics.requests.labels("/feedback", "503").inc()
            return _json({"detail": f"feedback log unavailable: {e}"}, 503)
        metrics.requests.labels("/feedback", "202").inc()
        return _json({"accepted": len(items)}, 202)

    @app.get("/health")
    async def health() -> Response:
        loaded = champion.current
        return _json({
            "status": "ok" if loaded and not champion.fallback_from and not flusher.last_error
            and not any(lg.error or lg.seal_error for lg in logs) else "degraded",
            "model_name": rt.model_name,
            "model_version": loaded.version if loaded else None,
            "challenger_version": challenger.current.version if challenger and challenger.current else None,
            "canary_share": s.canary_share,
            "last_error": champion.last_error,
            "fallback_from": champion.fallback_from,
            "log": {lg.stream: lg.health() for lg in logs},
            "flusher_error": flusher.last_error,
        })

    @app.get("/health/ready")
    async def ready() -> Response:
        problems = [lg.error for lg in logs if lg.error]
        if champion.current is None:
            problems.append(f"no model loaded: {champion.last_error}")
        return _json({"ready": not problems, "problems": problems}, 200 if not problems else 503)

    @app.get("/health/live")
    async def live() -> Response:
        return _json({"live": True})

    @app.get("/metrics")
    async def prom() -> Response:
        metrics.observe_logs(logs, scorer.queued_rows)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", summary="Check the registry aliases now (admin token)")
    async def reload(request: Request) -> Response:
        if not admin_ok(request):
            return _json({"detail": "admin token required (Authorization: Bearer ...)"}, 401)
        versions = {slot.alias: await asyncio.to_thread(slot.refresh) for slot in slots}
        return _json({"model_version": versions[Alias.CHAMPION], "versions": versions,
                      "last_error": champion.last_error})

    @app.post("/admin/flush", summary="Seal every worker's spools into Parquet segments now (admin token)")
    async def flush(request: Request) -> Response:
        """Used before collecting a day that just ended, instead of waiting a seal interval."""
        if not admin_ok(request):
            return _json({"detail": "admin token required (Authorization: Bearer ...)"}, 401)
        try:
            sealed = {lg.stream: await asyncio.to_thread(lg.seal) for lg in logs}
            acked, missing = await asyncio.to_thread(workers.request_flush, 10 * s.log_flush_interval_ms / 1000 + 5)
        except (LogUnavailable, OSError) as e:
            return _json({"detail": f"sealing failed: {e}"}, 503)
        if missing:
            return _json({"detail": f"workers {missing} did not seal in time", "sealed": sealed}, 503)
        return _json({"sealed": sealed, "workers": acked})

    return app
