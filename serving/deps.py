"""FastAPI dependencies the routers share: the server state, bearer-token auth (declared in the OpenAPI document
as security schemes, so clients and fuzzers see which routes need which token) and the JSON body, read under the
size limit."""

from __future__ import annotations

import asyncio
import hmac
from typing import Annotated

import orjson
from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pipeline.errors import RequestError
from serving.state import ServerState

api_bearer = HTTPBearer(scheme_name="apiToken", auto_error=False,
                        description="One of FLYWHEEL_SERVING__API_TOKENS; not required when that list is empty.")
admin_bearer = HTTPBearer(scheme_name="adminToken", auto_error=False,
                          description="The admin token (FLYWHEEL_SERVING__ADMIN_TOKEN or the home's secret).")
Credentials = HTTPAuthorizationCredentials | None


async def server_state(request: Request) -> ServerState:
    """Async although it never awaits, like every dependency here: FastAPI runs a plain `def` dependency in a
    thread pool, and those hops were 13% of a worker's CPU under load (py-spy, batch 1, 32 connections)."""
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]


def _token(creds: Credentials) -> bytes:
    return creds.credentials.encode() if creds is not None else b""


async def require_api_token(state: State, creds: Annotated[Credentials, Security(api_bearer)]) -> None:
    if not state.api_tokens:
        return
    got = _token(creds)
    if not any(hmac.compare_digest(got, t) for t in state.api_tokens):
        raise RequestError("a valid API token is required (Authorization: Bearer ...)", status=401)


async def require_admin(state: State, creds: Annotated[Credentials, Security(admin_bearer)]) -> None:
    if not hmac.compare_digest(_token(creds), state.admin_token):
        raise RequestError("admin token required (Authorization: Bearer ...)", status=401)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit`: a chunked upload has no Content-Length to check
    first, and reading it whole before measuring let one request take hundreds of MB."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"body: {declared} bytes exceed the limit of {limit}", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(f"body: more than {limit} bytes (the limit) received", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request, state: State) -> object:
    s = state.settings
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type):
        raise RequestError(f"content-type: expected application/json, got {content_type or 'none'!r}", status=415)
    try:
        async with asyncio.timeout(s.serving.body_timeout_s):
            raw = await _read_limited(request, s.serving.max_body_bytes)
    except TimeoutError:
        raise RequestError(f"body: not received within {s.serving.body_timeout_s:g} s", status=408) from None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise RequestError(f"body: not valid JSON ({e})") from e


Body = Annotated[object, Depends(json_body)]
ApiToken = Depends(require_api_token)
AdminToken = Depends(require_admin)
