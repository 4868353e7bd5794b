"""Everything the routes share, built once per worker process: the spec, the model slots, the logs, the scorer,
the online store and the auth tokens. Routes receive it through a FastAPI dependency instead of a closure, so each
router is a plain module and a test can build the state without an app."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass, field

import torch
from threadpoolctl import threadpool_limits

from feature_store.entity_tables import lookup_features
from feature_store.log_schema import FEEDBACK, PREDICTIONS, feedback_schema, prediction_schema
from feature_store.online import open_store
from feature_store.online.base import OnlineStore
from feature_store.spec import FeatureSpec
from pipeline.config import Settings
from pipeline.runtime import Runtime, runtime
from pipeline.tags import Alias
from serving.limits import RecentIds
from serving.log_sink import Flusher, SegmentLog
from serving.metrics import Metrics
from serving.model_slot import Loaded, ModelSlot
from serving.schema import RequestLimits, warmup_frame
from serving.scoring import Scorer
from serving.workers import WorkerGroup

log = logging.getLogger("flywheel.serving")


def bucket(key: str) -> float:
    """Stable position of an entity in [0, 1): the same user lands on the same side of a canary split."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


@dataclass
class ServerState:
    settings: Settings
    rt: Runtime
    metrics: Metrics
    predictions: SegmentLog
    feedback: SegmentLog
    champion: ModelSlot
    challenger: ModelSlot | None
    workers: WorkerGroup
    flusher: Flusher
    scorer: Scorer
    entity_of: dict[str, str]
    store: OnlineStore | None
    api_tokens: list[bytes] = field(default_factory=list)
    admin_token: bytes = b""
    limits: RequestLimits = field(default_factory=RequestLimits)
    recent_ids: RecentIds = field(default_factory=lambda: RecentIds(0))

    @property
    def spec(self) -> FeatureSpec:
        return self.rt.spec

    @property
    def logs(self) -> list[SegmentLog]:
        return [self.predictions, self.feedback]

    @property
    def slots(self) -> list[ModelSlot]:
        return [x for x in (self.champion, self.challenger) if x is not None]

    @property
    def fillable(self) -> frozenset[str]:
        """Entity features a request may omit: filled from the online store by the entity's key."""
        return frozenset(self.entity_of)

    @classmethod
    def build(cls, s: Settings) -> ServerState:
        # Small-batch inference is latency-bound: one intra-op thread per worker avoids oversubscribing the cores.
        # numpy's BLAS (the frozen forward) gets one thread: its matrices are a few hundred rows, and its default
        # of every core made the workers' BLAS threads spin against each other (batch 256, c32: 13 ms of server
        # CPU per request instead of ~2).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // s.serving.workers))
        threadpool_limits(1, user_api="blas")
        rt = runtime(s)
        spec, metrics = rt.spec, Metrics()
        predictions = SegmentLog("predictions", prediction_schema(spec), s.spool_dir, rt.lake, PREDICTIONS,
                                 (spec.event_time, "served_at"), durability=s.prediction_log.durability,
                                 commit_delay_s=s.prediction_log.commit_delay_ms / 1000)
        feedback = SegmentLog("feedback", feedback_schema(), s.spool_dir, rt.lake, FEEDBACK,
                              ("label_time", "received_at"), durability=s.prediction_log.durability,
                              commit_delay_s=s.prediction_log.commit_delay_ms / 1000)
        logs = [predictions, feedback]

        def on_event(kind: str, version: str, alias: str) -> None:
            metrics.reloads.labels(kind, alias).inc()
            if kind == "swapped":
                metrics.version.labels(alias).set(float(version))

        champion = ModelSlot(rt, warmup_frame(spec), on_event=on_event)
        challenger = ModelSlot(rt, warmup_frame(spec), on_event=on_event, alias=Alias.CHALLENGER) \
            if s.serving.canary_share > 0 else None
        workers = WorkerGroup(s.spool_dir / "workers")
        flusher = Flusher(logs, s.prediction_log.flush_interval_ms / 1000, s.prediction_log.seal_interval_s,
                          on_tick=lambda: workers.answer_flush_request(lambda: [lg.seal() for lg in logs]))
        scorer = Scorer(spec, predictions if s.prediction_log.enabled else None, s.serving.max_batch_rows,
                        on_batch=lambda rows, jobs: metrics.microbatch.observe(rows))
        entity_of = lookup_features(spec)
        store = open_store(s.online_store_uri, s.home_abs, spec.name) if entity_of else None
        return cls(s, rt, metrics, predictions, feedback, champion, challenger, workers, flusher, scorer,
                   entity_of, store, [t.encode() for t in s.serving.api_tokens], s.resolved_admin_token().encode(),
                   RequestLimits.from_settings(s), RecentIds(s.serving.recent_request_ids))

    async def start(self) -> None:
        self.workers.join()
        for lg in self.logs:
            recovered = lg.recover()
            if recovered:
                log.warning("recovered rows from spools of a previous process",
                            extra={"stream": lg.stream, "rows": recovered})
        for slot in self.slots:
            await asyncio.to_thread(slot.refresh)
            slot.start(self.settings.serving.alias_poll_interval_s)
        self.flusher.start()

    async def stop(self) -> None:
        for slot in self.slots:
            slot.stop()
        self.flusher.stop()
        self.workers.leave()
        if self.store is not None:
            await self.store.aclose()
            self.store.close()

    def route(self, cols: dict[str, list]) -> Loaded | None:
        """The model a request is scored with: the challenger for the canary share of entities, else the champion."""
        challenger, key = self.challenger, self.spec.sticky_key
        if challenger is not None and challenger.current is not None and key:
            if bucket(str(cols[key][0])) < self.settings.serving.canary_share:
                return challenger.current
        return self.champion.current
