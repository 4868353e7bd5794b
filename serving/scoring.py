"""Scoring on the hot path: concurrent requests are coalesced into one forward pass (opportunistic
micro-batching) and their log rows into one Arrow batch, made durable by one shared fsync (group commit) before
any of them is answered.

Batching is opportunistic rather than timed: a request queues its rows and, if no flush is pending, schedules
one with `call_soon`; every request parsed in the same event-loop turn joins that flush. An idle server adds
no latency, a loaded one amortises the model call and the log append over everything that arrived together.
Encoding works on plain column lists (no pandas) because at batch size 1 pandas' fixed cost dominates.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import torch

from feature_store.spec import FeatureSpec
from pipeline.errors import LogUnavailable, ModelOutputInvalid
from pipeline.learn.frozen import FrozenNet
from pipeline.learn.model import ModelBundle
from serving.log_sink import SegmentLog
from serving.model_slot import Loaded
from serving.request_ids import new_request_id


def encode_arrays(bundle: ModelBundle, cols: dict[str, list], n: int) -> tuple[np.ndarray, np.ndarray]:
    if bundle.categorical:
        cat = np.empty((n, len(bundle.categorical)), dtype=np.int64)
        for j, name in enumerate(bundle.categorical):
            ids = bundle.vocabs[name].ids
            cat[:, j] = [ids.get(v, 0) for v in cols[name]]
    else:
        cat = np.zeros((n, 0), dtype=np.int64)
    if bundle.numeric:
        num = np.empty((n, len(bundle.numeric)), dtype=np.float32)
        for j, name in enumerate(bundle.numeric):
            num[:, j] = bundle.scale(name, np.asarray(cols[name], dtype=np.float64))
    else:
        num = np.zeros((n, 0), dtype=np.float32)
    return cat, num


def encode_columns(bundle: ModelBundle, cols: dict[str, list], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    cat, num = encode_arrays(bundle, cols, n)
    return torch.from_numpy(cat), torch.from_numpy(num)


def score_columns(bundle: ModelBundle, cols: dict[str, list], n: int, frozen: FrozenNet | None = None
                  ) -> np.ndarray:
    """Probabilities for `n` rows of spec columns; through `frozen` (the checked numpy copy) when given."""
    cat, num = encode_arrays(bundle, cols, n)
    if frozen is not None:
        return frozen.scores(cat, num)
    with torch.inference_mode():
        return torch.sigmoid(bundle.net(torch.from_numpy(cat), torch.from_numpy(num))).numpy().astype(np.float64)


@dataclass
class Job:
    loaded: Loaded
    cols: dict[str, list]
    times: list[datetime | None]
    n: int
    request_id: str = field(default_factory=new_request_id)
    future: asyncio.Future | None = None


class Scorer:
    def __init__(self, spec: FeatureSpec, log: SegmentLog | None, max_batch_rows: int,
                 on_batch=None) -> None:
        self.spec, self.log = spec, log
        self.max_batch_rows = max_batch_rows
        self.on_batch = on_batch or (lambda rows, jobs: None)
        self._pending: list[Job] = []
        self._scheduled = False
        self._commits: set[asyncio.Task] = set()

    @property
    def queued_rows(self) -> int:
        return sum(j.n for j in self._pending)

    def submit(self, job: Job) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        job.future = loop.create_future()
        self._pending.append(job)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return job.future

    def _flush(self) -> None:
        self._scheduled = False
        jobs, self._pending = self._pending, []
        by_version: dict[str, list[Job]] = {}
        for j in jobs:
            by_version.setdefault(j.loaded.version, []).append(j)
        for group in by_version.values():
            chunk: list[Job] = []
            rows = 0
            for j in group:
                if chunk and rows + j.n > self.max_batch_rows:
                    self._run(chunk, rows)
                    chunk, rows = [], 0
                chunk.append(j)
                rows += j.n
            if chunk:
                self._run(chunk, rows)

    def _run(self, jobs: list[Job], rows: int) -> None:
        try:
            names = self.spec.feature_names
            cols = {k: [v for j in jobs for v in j.cols[k]] for k in names} if len(jobs) > 1 else jobs[0].cols
            scores = score_columns(jobs[0].loaded.bundle, cols, rows, jobs[0].loaded.frozen)
            if not np.isfinite(scores).all():
                jobs, cols, scores, rows = self._refuse_non_finite(jobs, cols, scores)
                if not jobs:
                    return
            seq = self.log.append_columns(self._log_columns(jobs, cols, scores, rows), rows, len(jobs)) \
                if self.log is not None else None
        except Exception as e:  # every waiting request learns why, none hangs
            _fail(jobs, e)
            return
        self.on_batch(rows, len(jobs))
        if seq is not None and self.log.durability == "group":
            task = asyncio.ensure_future(self._answer_when_durable(jobs, scores, seq))
            self._commits.add(task)
            task.add_done_callback(self._commits.discard)
        else:
            _answer(jobs, scores)

    async def _answer_when_durable(self, jobs: list[Job], scores: np.ndarray, seq: int) -> None:
        """Group commit: the answers go out once the fsync covering their rows has returned."""
        try:
            await self.log.durable(seq)
        except Exception as e:
            _fail(jobs, e)
            return
        _answer(jobs, scores)

    def _refuse_non_finite(self, jobs: list[Job], cols: dict[str, list], scores: np.ndarray
                           ) -> tuple[list[Job], dict[str, list], np.ndarray, int]:
        """A request with any non-finite score is answered with ModelOutputInvalid (never 200, never logged);
        the others of the micro-batch are served as usual."""
        keep, parts, start = [], [], 0
        version = jobs[0].loaded.version
        for j in jobs:
            part = scores[start:start + j.n]
            bad = int(np.count_nonzero(~np.isfinite(part)))
            if bad and not j.future.done():
                j.future.set_exception(ModelOutputInvalid(
                    f"model v{version} produced {bad} non-finite score(s) for this request; not served"))
            elif not bad:
                keep.append(j)
                parts.append(part)
            start += j.n
        if not keep:
            return [], cols, scores, 0
        names = self.spec.feature_names
        cols = {k: [v for j in keep for v in j.cols[k]] for k in names}
        return keep, cols, np.concatenate(parts), sum(j.n for j in keep)

    def _log_columns(self, jobs: list[Job], cols: dict[str, list], scores: np.ndarray, rows: int) -> dict:
        now = datetime.now(UTC)
        return {
            "request_id": [j.request_id for j in jobs for _ in range(j.n)],
            "row": [i for j in jobs for i in range(j.n)],
            "served_at": [now] * rows,
            self.spec.event_time: [t for j in jobs for t in j.times],
            "model_version": [j.loaded.version for j in jobs for _ in range(j.n)],
            "score": scores.tolist(),
            **{name: cols[name] for name in self.spec.feature_names},
        }


def _fail(jobs: list[Job], e: Exception) -> None:
    for j in jobs:
        if not j.future.done():
            j.future.set_exception(e)


def _answer(jobs: list[Job], scores: np.ndarray) -> None:
    start = 0
    for j in jobs:
        if not j.future.done():
            j.future.set_result(scores[start:start + j.n])
        start += j.n


__all__ = ["Job", "LogUnavailable", "ModelOutputInvalid", "Scorer", "encode_arrays", "encode_columns", "score_columns"]
