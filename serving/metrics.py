"""The server's Prometheus metrics, in a registry of its own so several apps in one process never collide.

With several worker processes (`serving_workers > 1`) each worker counts in its own memory, so a scrape would see
one random worker. `prepare_multiprocess` (run by the parent before it starts the workers) points prometheus-client's
multiprocess mode at a fresh directory under the home; every worker then writes its values to files there, and
a scrape of any worker aggregates all of them (counters and histograms summed, gauges per their mode).
"""

from __future__ import annotations

import atexit
import os
import shutil
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiprocess(directory: Path) -> None:
    """Empty the directory (values of a previous run would be summed in) and export it to the workers."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    os.environ[ENV] = str(directory)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    def __init__(self) -> None:
        shared = bool(os.environ.get(ENV))
        r = None if shared else CollectorRegistry()  # shared: values live in files, not in a registry
        self.requests = Counter("flywheel_requests_total", "Requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("flywheel_request_seconds", "Latency of answered requests by route", ["route"],
                                 registry=r, buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.rows = Counter("flywheel_rows_scored_total", "Rows scored by model version", ["model_version"],
                            registry=r)
        self.batch = Histogram("flywheel_request_rows", "Rows per request", registry=r, buckets=ROW_BUCKETS)
        self.microbatch = Histogram("flywheel_microbatch_rows", "Rows per coalesced forward pass", registry=r,
                                    buckets=ROW_BUCKETS)
        self.queue = Gauge("flywheel_queue_rows", "Rows waiting for the next forward pass", registry=r, multiprocess_mode="livesum")
        self.version = Gauge("flywheel_model_version", "Served model version by alias", ["alias"], registry=r, multiprocess_mode="livemax")
        self.reloads = Counter("flywheel_model_reloads_total", "Model reload events", ["outcome", "alias"],
                               registry=r)
        self.pending = Gauge("flywheel_log_pending_rows", "Rows buffered, not yet in the spool", ["stream"],
                             registry=r, multiprocess_mode="livesum")
        self.unsealed = Gauge("flywheel_log_unsealed_rows", "Rows in the spool, not yet sealed to Parquet",
                              ["stream"], registry=r, multiprocess_mode="livesum")
        self.logged = Gauge("flywheel_log_rows", "Rows appended to the log since start", ["stream"], registry=r, multiprocess_mode="livesum")
        self.lookups = Counter("flywheel_feature_lookup_keys_total", "Entity keys looked up in the online store",
                               ["entity", "outcome"], registry=r)
        self.lookup_latency = Histogram("flywheel_feature_lookup_seconds", "Online-store read per request",
                                        registry=r, buckets=(.0001, .0005, .001, .002, .005, .01, .02, .05, .1))
        self.nonfinite = Counter("flywheel_nonfinite_score_requests_total", "Requests refused (500) because the "
                                 "model produced non-finite scores", ["model_version"], registry=r)
        self.log_ok = Gauge("flywheel_log_healthy", "1 while the log accepts rows", ["stream"], registry=r, multiprocess_mode="livemin")

        self._answered: dict[tuple[str, str], tuple] = {}
        self.registry = r
        if shared:
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry)
            atexit.register(multiprocess.mark_process_dead, os.getpid())

    def answered(self, route: str, version: str, rows: int, seconds: float) -> None:
        """One scored request's counts, through labelled children kept per (route, version): `labels()` takes
        a lock and validates its arguments on every call, three times per request on the hot path."""
        key = (route, version)
        if (children := self._answered.get(key)) is None:
            children = self._answered[key] = (self.rows.labels(version), self.requests.labels(route, "200"),
                                              self.latency.labels(route))
        rows_scored, ok, latency = children
        rows_scored.inc(rows)
        self.batch.observe(rows)
        ok.inc()
        latency.observe(seconds)

    def observe_logs(self, logs, queued_rows: int) -> None:
        self.queue.set(queued_rows)
        for lg in logs:
            self.pending.labels(lg.stream).set(lg.pending_rows)
            self.unsealed.labels(lg.stream).set(lg.rows_appended - lg.rows_sealed - lg.rows_dropped - lg.pending_rows)
            self.logged.labels(lg.stream).set(lg.rows_appended)
            self.log_ok.labels(lg.stream).set(0 if lg.error else 1)
