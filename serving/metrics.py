"""The server's Prometheus metrics, in a registry of its own so several apps in one process never collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("flywheel_requests_total", "Requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("flywheel_request_seconds", "Latency of answered requests by route", ["route"],
                                 registry=r, buckets=(.001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5))
        self.rows = Counter("flywheel_rows_scored_total", "Rows scored by model version", ["model_version"],
                            registry=r)
        self.batch = Histogram("flywheel_request_rows", "Rows per request", registry=r, buckets=ROW_BUCKETS)
        self.microbatch = Histogram("flywheel_microbatch_rows", "Rows per coalesced forward pass", registry=r,
                                    buckets=ROW_BUCKETS)
        self.queue = Gauge("flywheel_queue_rows", "Rows waiting for the next forward pass", registry=r)
        self.version = Gauge("flywheel_model_version", "Served model version by alias", ["alias"], registry=r)
        self.reloads = Counter("flywheel_model_reloads_total", "Model reload events", ["outcome", "alias"],
                               registry=r)
        self.pending = Gauge("flywheel_log_pending_rows", "Rows buffered, not yet in the spool", ["stream"],
                             registry=r)
        self.unsealed = Gauge("flywheel_log_unsealed_rows", "Rows in the spool, not yet sealed to Parquet",
                              ["stream"], registry=r)
        self.logged = Gauge("flywheel_log_rows", "Rows appended to the log since start", ["stream"], registry=r)
        self.lookups = Counter("flywheel_feature_lookup_keys_total", "Entity keys looked up in the online store",
                               ["entity", "outcome"], registry=r)
        self.lookup_latency = Histogram("flywheel_feature_lookup_seconds", "Online-store read per request",
                                        registry=r, buckets=(.0001, .0005, .001, .002, .005, .01, .02, .05, .1))
        self.log_ok = Gauge("flywheel_log_healthy", "1 while the log accepts rows", ["stream"], registry=r)

    def observe_logs(self, logs, queued_rows: int) -> None:
        self.queue.set(queued_rows)
        for lg in logs:
            self.pending.labels(lg.stream).set(lg.pending_rows)
            self.unsealed.labels(lg.stream).set(lg.rows_appended - lg.rows_sealed - lg.pending_rows)
            self.logged.labels(lg.stream).set(lg.rows_appended)
            self.log_ok.labels(lg.stream).set(0 if lg.error else 1)
