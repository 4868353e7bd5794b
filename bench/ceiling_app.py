"""The serving bench's ceiling: a bare ASGI app under the same uvicorn settings as `flywheel serve` (same
protocol class, keep-alive, workers) that reads the same body, parses it with the same JSON parser and answers a
constant. What Flywheel loses against it is what its own work costs: validation, routing, the forward pass,
the log append and the fsync.

    FLYWHEEL_SERVING__PORT=8123 .venv/bin/python bench/ceiling_app.py --workers 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ANSWER = orjson.dumps({"request_id": "ceiling", "model_version": "0", "scores": [0.5]})
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    orjson.loads(b"".join(chunks) or b"{}")
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def main() -> None:
    import uvicorn

    from pipeline.config import get_settings
    from serving.connections import uvicorn_options

    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    options = uvicorn_options(get_settings())
    if args.workers > 1:
        uvicorn.run("bench.ceiling_app:app", workers=args.workers, **options)
    else:
        uvicorn.run(app, **options)


if __name__ == "__main__":
    main()
