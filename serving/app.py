"""The model server's routes. Scores with the slot's current model, logs every scored row before answering,
and refuses (503) to serve predictions it cannot log."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import orjson
import pandas as pd
import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from feature_store.log_schema import FEEDBACK, PREDICTIONS, feedback_schema, prediction_schema
from pipeline.config import Settings, get_settings
from pipeline.runtime import runtime
from serving.log_sink import Flusher, LogUnavailable, SegmentLog
from serving.model_slot import ModelSlot
from serving.schema import RequestError, parse_feedback, parse_rows, warmup_frame

log = logging.getLogger("flywheel.serving")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("flywheel_requests_total", "Requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("flywheel_request_seconds", "Latency by route", ["route"], registry=self.registry)
        self.rows = Counter("flywheel_rows_scored_total", "Rows scored by model version", ["model_version"],
                            registry=self.registry)
        self.batch = Histogram("flywheel_request_rows", "Rows per predict request", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096))
        self.version = Gauge("flywheel_model_version", "Served model version", registry=self.registry)
        self.reloads = Counter("flywheel_model_reloads_total", "Model reload events", ["outcome"],
                               registry=self.registry)
        self.pending = Gauge("flywheel_log_pending_rows", "Rows buffered, not yet in the spool", ["stream"],
                             registry=self.registry)
        self.logged = Gauge("flywheel_log_rows_total", "Rows appended to the log since start", ["stream"],
                            registry=self.registry)


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


def create_app(settings: Settings | None = None) -> FastAPI:
    s = settings or get_settings()
    rt = runtime(s)
    spec = rt.spec
    metrics = Metrics()
    pred_schema, fb_schema = prediction_schema(spec), feedback_schema()
    predictions = SegmentLog("predictions", pred_schema, s.spool_dir, rt.lake, PREDICTIONS,
                             (spec.event_time, "served_at"))
    feedback = SegmentLog("feedback", fb_schema, s.spool_dir, rt.lake, FEEDBACK, ("label_time", "received_at"))
    logs = [predictions, feedback]
    slot = ModelSlot(rt, warmup_frame(spec),
                     on_event=lambda kind, v: (metrics.reloads.labels(kind).inc(),
                                               kind == "swapped" and metrics.version.set(float(v))))
    flusher = Flusher(logs, s.log_flush_interval_ms / 1000, s.log_seal_interval_s)
    admin_token = s.resolved_admin_token()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for lg in logs:
            recovered = lg.recover()
            if recovered:
                log.warning("recovered %d %s rows from spools of a previous process", recovered, lg.stream)
        await asyncio.to_thread(slot.refresh)
        slot.start(s.alias_poll_interval_s)
        flusher.start()
        yield
        slot.stop()
        flusher.stop()

    app = FastAPI(title="Flywheel model server", version="0.1.0", lifespan=lifespan)
    app.state.slot, app.state.logs = slot, logs

    def authorized(request: Request) -> bool:
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {admin_token}".encode())

    async def body_json(request: Request) -> object:
        raw = await request.body()
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise RequestError(f"body: not valid JSON ({e})") from e

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        start = time.perf_counter()
        body = await body_json(request)
        cols, times = parse_rows(body, spec, s.max_rows_per_request)
        loaded = slot.current
        if loaded is None:
            metrics.requests.labels("/predict", "503").inc()
            return _json({"detail": f"no model loaded: {slot.last_error}"}, 503)
        frame = pd.DataFrame(cols)
        scores = await asyncio.to_thread(loaded.bundle.predict, frame)
        request_id = body.get("request_id") or uuid.uuid4().hex
        if not isinstance(request_id, str):
            raise RequestError("request_id: expected a string")
        now = datetime.now(UTC)
        n = len(frame)
        arrays = {
            "request_id": pa.array([request_id] * n, pa.string()),
            "row": pa.array(range(n), pa.int32()),
            "served_at": pa.array([now] * n, pred_schema.field("served_at").type),
            spec.event_time: pa.array(times, pred_schema.field(spec.event_time).type),
            "model_version": pa.array([loaded.version] * n, pa.string()),
            "score": pa.array(scores, pa.float64()),
        }
        for name in spec.features:
            arrays[name] = pa.array(cols[name], pred_schema.field(name).type)
        try:
            predictions.append(pa.RecordBatch.from_pydict(arrays, schema=pred_schema))
        except LogUnavailable as e:
            metrics.requests.labels("/predict", "503").inc()
            return _json({"detail": f"prediction log unavailable, not serving unlogged predictions: {e}"}, 503)
        metrics.rows.labels(loaded.version).inc(n)
        metrics.batch.observe(n)
        metrics.requests.labels("/predict", "200").inc()
        metrics.latency.labels("/predict").observe(time.perf_counter() - start)
        return _json({"request_id": request_id, "model_version": loaded.version, "scores": scores})

    @app.post("/feedback")
    async def post_feedback(request: Request) -> Response:
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
            feedback.append(batch)
        except LogUnavailable as e:
            metrics.requests.labels("/feedback", "503").inc()
            return _json({"detail": f"feedback log unavailable: {e}"}, 503)
        metrics.requests.labels("/feedback", "202").inc()
        return _json({"accepted": len(items)}, 202)

    @app.get("/health")
    async def health() -> Response:
        loaded = slot.current
        return _json({
            "status": "ok" if loaded and not any(lg.error for lg in logs) else "degraded",
            "model_name": rt.model_name,
            "model_version": loaded.version if loaded else None,
            "last_error": slot.last_error,
            "log": {lg.stream: {"appended": lg.rows_appended, "sealed": lg.rows_sealed, "error": lg.error}
                    for lg in logs},
        })

    @app.get("/health/ready")
    async def ready() -> Response:
        problems = [lg.error for lg in logs if lg.error]
        if slot.current is None:
            problems.append(f"no model loaded: {slot.last_error}")
        return _json({"ready": not problems, "problems": problems}, 200 if not problems else 503)

    @app.get("/metrics")
    async def prom() -> Response:
        for lg in logs:
            metrics.pending.labels(lg.stream).set(lg.pending_rows)
            metrics.logged.labels(lg.stream).set(lg.rows_appended)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload")
    async def reload(request: Request) -> Response:
        if not authorized(request):
            return _json({"detail": "admin token required (Authorization: Bearer ...)"}, 401)
        version = await asyncio.to_thread(slot.refresh)
        return _json({"model_version": version, "last_error": slot.last_error})

    @app.post("/admin/flush")
    async def flush(request: Request) -> Response:
        """Seal the spools now: used before collecting a day that just ended, instead of waiting a seal interval."""
        if not authorized(request):
            return _json({"detail": "admin token required (Authorization: Bearer ...)"}, 401)
        try:
            sealed = {lg.stream: await asyncio.to_thread(lg.seal) for lg in logs}
        except (LogUnavailable, OSError) as e:
            return _json({"detail": f"sealing failed: {e}"}, 503)
        return _json({"sealed": sealed})

    return app
