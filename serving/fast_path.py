"""The scoring and feedback routes dispatched before the framework's per-request machinery.

Profiled under load (py-spy, one worker, batch 1, 32 connections), Starlette's exception and exit-stack
middlewares, its router and FastAPI's dependency solving took about 40% of a worker's CPU: more than parsing,
scoring and logging together. The four hot routes are therefore matched here and handed to the very same route
functions, with the same bearer check, the same size- and time-limited JSON body and the same refusals. FastAPI
still declares them (the OpenAPI document, the in-process test client) and serves every other route. This sits
inside the in-flight limit and the server-error middleware, so overload and crashes are handled as before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.errors import RequestError
from serving.deps import api_bearer, json_body, require_api_token
from serving.responses import refused
from serving.routes.feedback import post_feedback
from serving.routes.predict import invocations, predict, v2_infer
from serving.state import ServerState

Handler = Callable[[ServerState, Request, object], Awaitable[Response]]
V2_PREFIX, V2_SUFFIX = "/v2/models/", "/infer"


async def _predict(state: ServerState, request: Request, body: object) -> Response:
    return await predict(state, body)


async def _invocations(state: ServerState, request: Request, body: object) -> Response:
    return await invocations(state, body, request.headers.get("x-request-id"))


async def _feedback(state: ServerState, request: Request, body: object) -> Response:
    return await post_feedback(state, body)


async def _v2(state: ServerState, request: Request, body: object) -> Response:
    path = request.scope["path"]
    return await v2_infer(path[len(V2_PREFIX):-len(V2_SUFFIX)], state, body)


ROUTES: dict[str, Handler] = {"/predict": _predict, "/invocations": _invocations, "/feedback": _feedback}
V2_ROUTE = "/v2/models/{name}/infer"


def match(path: str) -> tuple[str, Handler] | None:
    """The route template and its handler for a POST to `path`, None for every other route."""
    if (handler := ROUTES.get(path)) is not None:
        return path, handler
    if path.startswith(V2_PREFIX) and path.endswith(V2_SUFFIX) and "/" not in path[len(V2_PREFIX):-len(V2_SUFFIX)] \
            and len(path) > len(V2_PREFIX) + len(V2_SUFFIX):
        return V2_ROUTE, _v2
    return None


class FastRoutes:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        route, handler = found
        request = Request(scope, receive)
        try:
            await require_api_token(self.state, await api_bearer(request))
            response = await handler(self.state, request, await json_body(request, self.state))
        except RequestError as exc:
            response = refused(exc, route, self.state.metrics)
        await response(scope, receive, send)


__all__ = ["FastRoutes", "match"]
