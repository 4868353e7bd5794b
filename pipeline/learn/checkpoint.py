"""Training checkpoints: the whole loop state every N steps, so a preempted run resumes where it stopped.

A checkpoint holds the weights, the optimizer, the position in the epoch (the epoch's order is a function of
(seed, epoch), so the position is enough) and the early-stopping book-keeping, and it is bound to a fingerprint
of the job (starting weights, data, hyperparameters): a checkpoint of another job is never resumed. Files are
written to a temp name and renamed, so a kill during a save leaves the previous checkpoint intact; they load with
`weights_only=True`, so resuming never unpickles code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger("flywheel.checkpoint")
FILE = "checkpoint.pt"


def fingerprint(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Checkpointer:
    def __init__(self, directory: Path, every_steps: int, on_save: Callable[[Path], None] | None = None) -> None:
        self.directory = Path(directory)
        self.every_steps = every_steps
        self.on_save = on_save
        self.saved = 0

    @property
    def path(self) -> Path:
        return self.directory / FILE

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step > 0 and step % self.every_steps == 0

    def save(self, job: str, state: dict) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{FILE}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            torch.save({**state, "job": job}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.saved += 1
        if self.on_save is not None:
            self.on_save(self.path)
        return self.path

    def load(self, job: str) -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        if state.get("job") != job:
            log.warning("ignoring checkpoint %s of another job (%s, expected %s)", self.path, state.get("job"), job)
            return None
        log.info("resuming from checkpoint at step %s", state.get("step"))
        return state

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def mlflow_logger(artifact_path: str = "checkpoints") -> Callable[[Path], None]:
    """Log each checkpoint to the active MLflow run's artifact store (a no-op without an active run)."""

    def log_checkpoint(path: Path) -> None:
        import mlflow

        if mlflow.active_run() is not None:
            mlflow.log_artifact(str(path), artifact_path)

    return log_checkpoint
