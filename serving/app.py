"""The model server, assembled: the shared state, one router per concern, the error handler and the published
request bodies. Scores with the slot's current model, logs every scored row before answering, and refuses (503)
to serve predictions it cannot log."""

from __future__ import annotations

import gc
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from pipeline.config import Settings, get_settings
from pipeline.errors import RequestError
from serving.fast_path import FastRoutes
from serving.limits import InFlightLimit
from serving.responses import refused
from serving.routes import admin, feedback, health, predict
from serving.schema import openapi_bodies
from serving.state import ServerState

ROUTERS = (predict.router, feedback.router, health.router, admin.router)


def _publish_bodies(app: FastAPI, state: ServerState) -> None:
    """Routes read their JSON through a dependency (streamed, size-limited), so FastAPI cannot infer the bodies:
    the spec-derived schemas are put into the OpenAPI document here, for clients and fuzzers."""
    s, spec = state.settings, state.spec
    bodies = openapi_bodies(spec, s.serving.max_rows_per_request,
                            {n: spec.entities[e].key for n, e in state.entity_of.items()}, state.limits)
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path, name in (("/predict", "predict"), ("/feedback", "feedback")):
                schema["paths"][path]["post"].update(bodies[name])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    state = ServerState.build(settings or get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        # What start-up built (the model, vocabularies, the framework) lives as long as the process: kept out of
        # the collector's generations, a full collection under load no longer walks it (a source of tail latency).
        gc.collect()
        gc.freeze()
        yield
        await state.stop()

    app = FastAPI(title="Flywheel model server", version="0.1.0", lifespan=lifespan,
                  description=f"Scores rows of the feature spec '{state.spec.name}' with "
                              f"{state.rt.model_name}@champion.")
    app.state.server = state
    for router in ROUTERS:
        app.include_router(router)

    app.add_middleware(FastRoutes, state=state)  # inside the in-flight limit, which is added after it
    app.add_middleware(InFlightLimit, limit=state.settings.serving.max_concurrency,
                       retry_after_s=state.settings.serving.retry_after_s,
                       on_reject=lambda path: state.metrics.requests.labels("overload", "503").inc())

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> Response:
        route = getattr(request.scope.get("route"), "path", "unmatched")  # a template: bounded label values
        return refused(exc, route, state.metrics)

    _publish_bodies(app, state)
    return app
