"""The served model: follows the registry's `champion` alias, loads a new version in the background, checks it
with warm-up predictions, and swaps it in with one reference assignment so no request sees a half-loaded model.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline import registry
from pipeline.checks.metrics import scores_valid
from pipeline.learn.model import ModelBundle
from pipeline.runtime import Runtime
from pipeline.tags import Alias

log = logging.getLogger("flywheel.model_slot")


@dataclass(frozen=True)
class Loaded:
    version: str
    bundle: ModelBundle


class ModelSlot:
    def __init__(self, rt: Runtime, warmup: pd.DataFrame, on_event=None, alias: str = Alias.CHAMPION) -> None:
        self.rt = rt
        self.alias = alias
        self.warmup = warmup
        self.current: Loaded | None = None
        self.last_error: str | None = None
        self.on_event = on_event or (lambda kind, version, alias: None)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> str | None:
        """Load the champion if it differs from what is served; keep the old model on any failure."""
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
                return champ.version
            try:
                bundle = registry.load_version(client, self.rt.model_name, champ.version, self.rt.cache_dir)
                bundle = bundle.for_spec(self.rt.spec)  # declared migration, or a clear SpecError
                bundle.optimizer_state = None  # training state: twice the weights' memory, useless for serving
                bundle.net.eval()
                scores = bundle.predict(self.warmup)
                if not scores_valid(scores) or scores.shape != (len(self.warmup),):
                    raise ValueError(f"warm-up predictions invalid (shape {scores.shape}, "
                                     f"finite={bool(np.all(np.isfinite(scores)))})")
            except Exception as e:
                self.last_error = f"loading v{champ.version} failed, still serving " \
                                  f"{self.current.version if self.current else 'nothing'}: {e}"
                log.error(self.last_error)
                self.on_event("load_failed", champ.version, self.alias)
                return self.current.version if self.current else None
            previous = self.current.version if self.current else None
            self.current = Loaded(champ.version, bundle)
            self.last_error = None
            log.info("model swapped", extra={"alias": self.alias, "from_version": previous,
                                             "to_version": champ.version})
            self.on_event("swapped", champ.version, self.alias)
            return champ.version

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
