"""Drives a model server over real HTTP with a simulated day: predictions first, then the feedback of the
rows that were clicked and whose feedback was not lost, stamped with the time it "arrived"."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
import numpy as np
import pandas as pd

from pipeline.demo.simulate import EVENT_TIME, LABEL


@dataclass(frozen=True)
class TrafficResult:
    requests: int
    rows: int
    errors: int
    feedback: int
    served: pd.DataFrame


def _rows(frame: pd.DataFrame, features: list[str]) -> list[dict]:
    out = frame[features].to_dict(orient="records")
    times = frame[EVENT_TIME].map(lambda t: t.isoformat()).tolist()
    for r, t in zip(out, times, strict=True):
        r[EVENT_TIME] = t
    return out


async def _drive(url: str, day: pd.DataFrame, features: list[str], batch: int, concurrency: int,
                 token: str | None) -> TrafficResult:
    sem = asyncio.Semaphore(concurrency)
    results: list[tuple[int, str, str, list[float]]] = []
    errors = 0
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as client:
        async def one(start: int) -> None:
            nonlocal errors
            chunk = day.iloc[start:start + batch]
            async with sem:
                r = await client.post("/predict", json={"rows": _rows(chunk, features)})
            if r.status_code != 200:
                errors += 1
                return
            body = r.json()
            results.append((start, body["request_id"], body["model_version"], body["scores"]))

        await asyncio.gather(*(one(s) for s in range(0, len(day), batch)))
        served = []
        for start, rid, version, scores in results:
            chunk = day.iloc[start:start + len(scores)].copy()
            chunk["request_id"], chunk["row"] = rid, np.arange(len(scores))
            chunk["model_version"], chunk["score"] = version, scores
            served.append(chunk)
        frame = pd.concat(served, ignore_index=True) if served else day.iloc[:0]
        fb = frame[(frame[LABEL] == 1) & frame["feedback_delay_s"].notna()]
        items = [{"request_id": r.request_id, "row": int(r.row), "label": 1,
                  "time": (r.event_time + pd.Timedelta(seconds=r.feedback_delay_s)).isoformat()}
                 for r in fb.itertuples()]
        for i in range(0, len(items), 500):
            r = await client.post("/feedback", json=items[i:i + 500])
            r.raise_for_status()
    return TrafficResult(len(results) + errors, len(frame), errors, len(items), frame)


def send_day(url: str, day: pd.DataFrame, features: list[str], batch: int = 20, concurrency: int = 8,
             token: str | None = None) -> TrafficResult:
    return asyncio.run(_drive(url, day, features, batch, concurrency, token))


