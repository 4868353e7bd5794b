"""The served model: follows the registry's alias, loads a new version in the background, checks it with warm-up
predictions, and swaps it in with one reference assignment so no request sees a half-loaded model.

Warm-up scores rows that touch every known id of every embedding table (numerics spread over the spec's range),
so a version whose weights are garbage for one real category is refused before it meets traffic. A champion that
cannot be loaded when the server starts is replaced by the newest loadable of `previous` and earlier champions
(a fallback, said in /health and counted in metrics) while the alias keeps being polled.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date

import numpy as np
import pandas as pd

from feature_store.spec import FeatureSpec
from pipeline import registry
from pipeline.learn.frozen import FrozenNet
from pipeline.learn.model import ModelBundle
from pipeline.runtime import Runtime
from pipeline.tags import Alias

log = logging.getLogger("flywheel.model_slot")

WARMUP_CHUNK_ROWS = 4096
SPREAD = (-2.0, -1.0, 0.0, 1.0, 2.0, float("nan"))  # standard deviations around the training mean; nan = missing


@dataclass(frozen=True)
class Loaded:
    version: str
    bundle: ModelBundle
    data_day: date | None = None  # the last day of data it was trained on: how stale its answers are
    frozen: FrozenNet | None = None  # the numpy forward, when it was checked to agree with the network


def freeze(bundle: ModelBundle, frames: Iterator[pd.DataFrame]) -> FrozenNet | None:
    """The bundle's numpy forward if it gives the network's scores on every warm-up row, else None (torch)."""
    frozen = FrozenNet.of(bundle.net)
    if frozen is None:
        return None
    for frame in frames:
        cat, num = bundle.encode(frame)
        if not frozen.agrees_with(bundle.net, cat.numpy(), num.numpy()):
            log.warning("numpy forward disagrees with the network on warm-up rows; serving through torch")
            return None
    return frozen


def warmup_frames(bundle: ModelBundle, spec: FeatureSpec, chunk: int = WARMUP_CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """Rows built from the bundle's own vocabularies: every known id of every embedding table appears at least
    once, numerics cycle through the training mean +-2 standard deviations, clipped to the spec's min/max."""
    known = {c: list(bundle.vocabs[c].ids) for c in bundle.categorical}
    total = max([len(v) for v in known.values()] + [len(SPREAD)])
    for start in range(0, total, chunk):
        idx = np.arange(start, min(start + chunk, total))
        data: dict[str, object] = {}
        for c, values in known.items():
            data[c] = [values[i % len(values)] for i in idx] if values else ["<warm-up unseen>"] * len(idx)
        for j, name in enumerate(bundle.numeric):
            mean, std = bundle.norm[name]
            f = spec.features.get(name)
            lo = f.min if f is not None and f.min is not None else -np.inf
            hi = f.max if f is not None and f.max is not None else np.inf
            z = np.array([SPREAD[(i + j) % len(SPREAD)] for i in idx])
            data[name] = np.clip(mean + z * std, lo, hi)
        yield pd.DataFrame(data)


def check_scores(bundle: ModelBundle, frames: Iterator[pd.DataFrame]) -> int:
    """Raise if any warm-up score is not a probability; returns rows checked."""
    rows = 0
    for frame in frames:
        scores = np.asarray(bundle.predict(frame))
        if scores.shape != (len(frame),):
            raise ValueError(f"warm-up predictions invalid: shape {scores.shape} for {len(frame)} rows")
        bad = ~(np.isfinite(scores) & (scores >= 0) & (scores <= 1))
        if bad.any():
            cols = [c for c in bundle.categorical if c in frame]
            where = {c: frame[c].iloc[int(np.argmax(bad))] for c in cols}
            raise ValueError(f"warm-up predictions invalid: {int(bad.sum())} of {len(frame)} scores are not "
                             f"finite probabilities (first at {where})")
        rows += len(frame)
    return rows


class ModelSlot:
    def __init__(self, rt: Runtime, warmup: pd.DataFrame, on_event=None, alias: str = Alias.CHAMPION,
                 retry_failed_s: float = 30.0) -> None:
        self.rt = rt
        self.alias = alias
        self.warmup = warmup
        self.current: Loaded | None = None
        self.last_error: str | None = None
        self.fallback_from: str | None = None  # the alias's version that could not be served, while on a fallback
        self.on_event = on_event or (lambda kind, version, alias: None)
        self.retry_failed_s = retry_failed_s
        self._failed: dict[str, tuple[float, str, bool]] = {}  # version -> (when, why, bundle verified)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _load(self, client, version: str) -> ModelBundle:
        """Download, verify the digest, migrate to the spec and warm up; raises with the reason."""
        seen = self._failed.get(version)
        if seen and seen[2] and time.monotonic() - seen[0] < self.retry_failed_s:
            raise ValueError(seen[1])  # a verified bundle that failed its checks: not re-checked every poll
        try:
            bundle = registry.load_version(client, self.rt.model_name, version, self.rt.cache_dir)
        except Exception as e:  # download or digest: retried at the next poll
            self._failed[version] = (time.monotonic(), str(e), False)
            raise
        try:
            bundle = bundle.for_spec(self.rt.spec)  # declared migration, or a clear SpecError
            bundle.optimizer_state = None  # training state: twice the weights' memory, useless for serving
            bundle.net.eval()
            check_scores(bundle, iter([self.warmup]))
            check_scores(bundle, warmup_frames(bundle, self.rt.spec))
        except Exception as e:
            self._failed[version] = (time.monotonic(), str(e), True)
            raise
        self._failed.pop(version, None)
        return bundle

    def refresh(self) -> str | None:
        """Load the alias's version if it differs from what is served; keep the old model on any failure."""
        with self._lock:
            try:
                client = self.rt.client()
                champ = registry.get_alias(client, self.rt.model_name, self.alias)
            except Exception as e:  # registry down: keep serving what we have
                self.last_error = f"registry unreachable: {e}"
                return self.current.version if self.current else None
            if champ is None:
                self.last_error = f"no {self.alias} alias on {self.rt.model_name}"
                if self.alias != Alias.CHAMPION:
                    self.current = None  # an alias removed (challenger retired) stops its traffic
                return self.current.version if self.current else None
            if self.current and self.current.version == champ.version:
                if self.fallback_from is not None:  # the alias moved to the version the fallback serves
                    self.fallback_from = self.last_error = None
                return champ.version
            try:
                bundle = self._load(client, champ.version)
            except Exception as e:
                fresh = self._failed.get(champ.version, (0.0,))[0] >= time.monotonic() - 1
                if self.current is None and self.alias == Alias.CHAMPION:
                    return self._fall_back(client, champ.version, e)
                serving = self.current.version if self.current else "nothing"
                self.last_error = f"loading v{champ.version} failed, still serving {serving}" + \
                    (f" (a fallback: champion v{self.fallback_from} cannot be served)" if self.fallback_from else "") \
                    + f": {e}"
                if fresh:
                    log.error(self.last_error)
                    self.on_event("load_failed", champ.version, self.alias)
                return self.current.version if self.current else None
            return self._swap(champ.version, bundle, data_day=champ.data_day)

    def _swap(self, version: str, bundle: ModelBundle, fallback_from: str | None = None,
              data_day: date | None = None) -> str:
        previous = self.current.version if self.current else None
        # One chunk of the every-id warm-up is enough: the copy shares the network's arrays, so what is checked
        # here is the layout (the warm-up already refused weights that are garbage for some id).
        frozen = freeze(bundle, itertools.chain([self.warmup], itertools.islice(warmup_frames(bundle, self.rt.spec), 1)))
        self.current = Loaded(version, bundle, data_day, frozen)
        self.fallback_from = fallback_from
        self.last_error = None if fallback_from is None else self.last_error
        log.info("model swapped", extra={"alias": self.alias, "from_version": previous, "to_version": version,
                                         "fallback_from": fallback_from})
        self.on_event("swapped", version, self.alias)
        return version

    def _fall_back(self, client, broken: str, error: Exception) -> str | None:
        """Nothing served and the champion cannot be: serve the newest loadable earlier champion instead."""
        self.on_event("load_failed", broken, self.alias)
        try:
            candidates = registry.fallback_versions(client, self.rt.model_name, broken)
        except Exception as e:
            candidates, error = [], ValueError(f"{error}; fallback lookup failed: {e}")
        for version in candidates:
            try:
                bundle = self._load(client, version)
            except Exception as e:
                log.error("fallback candidate refused", extra={"version": version, "error": str(e)})
                continue
            self.last_error = f"champion v{broken} cannot be served ({error}); serving fallback v{version}, " \
                              "still polling the alias"
            log.error(self.last_error)
            self.on_event("fallback", version, self.alias)
            try:
                data_day = registry.get_version(client, self.rt.model_name, version).data_day
            except Exception:  # noqa: BLE001 - the age is a courtesy; serving the fallback is not
                data_day = None
            return self._swap(version, bundle, fallback_from=broken, data_day=data_day)
        self.last_error = f"loading v{broken} failed and no earlier champion loads ({candidates or 'none'}): {error}"
        log.error(self.last_error)
        return None

    def start(self, interval_s: float) -> None:
        def loop() -> None:
            while not self._stop.wait(interval_s):
                self.refresh()

        self._thread = threading.Thread(target=loop, name=f"alias-poller-{self.alias}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
