"""One period through the real server: every row to POST /predict with its (logical) event time, then every
label to POST /feedback stamped with its label time. Request ids are derived from the period and batch, so a
period re-sent after an interruption logs the same keys and collect drops the repeats."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pandas as pd

from pipeline.errors import StageError

FEEDBACK_BATCH = 2000


def _records(frame: pd.DataFrame, columns: list[str], event_time: str) -> list[dict]:
    body = frame[columns].astype(object).where(frame[columns].notna(), None)
    out = body.to_dict(orient="records")
    for r, t in zip(out, frame[event_time].map(lambda v: v.isoformat()), strict=True):
        r[event_time] = t
    return out


async def _send(url: str, rows: pd.DataFrame, features: list[str], event_time: str, label: str, label_time: str,
                prefix: str, batch: int, concurrency: int) -> pd.DataFrame:
    sem = asyncio.Semaphore(concurrency)
    scores = np.full(len(rows), np.nan)
    versions = np.empty(len(rows), dtype=object)
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        async def one(start: int) -> None:
            chunk = rows.iloc[start:start + batch]
            body = {"rows": _records(chunk, features, event_time), "request_id": f"{prefix}-{start // batch:06d}"}
            async with sem:
                r = await client.post("/predict", json=body)
            if r.status_code != 200:
                raise StageError(f"POST /predict answered {r.status_code} for rows {start}..{start + len(chunk) - 1}"
                                 f" of {prefix}: {r.text[:300]}")
            scores[start:start + len(chunk)] = r.json()["scores"]
            versions[start:start + len(chunk)] = r.json()["model_version"]

        await asyncio.gather(*(one(s) for s in range(0, len(rows), batch)))
        pos = np.arange(len(rows))
        items = [{"request_id": f"{prefix}-{p // batch:06d}", "row": int(p % batch), "label": float(y),
                  "time": t.isoformat()}
                 for p, y, t in zip(pos, rows[label].to_numpy(), rows[label_time], strict=True)]
        for i in range(0, len(items), FEEDBACK_BATCH):
            r = await client.post("/feedback", json=items[i:i + FEEDBACK_BATCH])
            if r.status_code >= 300:
                raise StageError(f"POST /feedback answered {r.status_code}: {r.text[:300]}")
    return pd.DataFrame({"score": scores, "model_version": versions})


def send_period(url: str, rows: pd.DataFrame, features: list[str], event_time: str, label: str, label_time: str,
                prefix: str, batch: int = 256, concurrency: int = 4) -> pd.DataFrame:
    """The served score and model version of every row, in `rows` order."""
    rows = rows.reset_index(drop=True)
    return asyncio.run(_send(url, rows, features, event_time, label, label_time, prefix, batch, concurrency))
