"""Training checkpoints: the whole loop state every N steps, so a preempted run resumes where it stopped.

A checkpoint holds the weights, the optimizer, the position in the epoch (the epoch's order is a function of
(seed, epoch), so the position is enough) and the early-stopping book-keeping, and it is bound to a fingerprint
of the job (starting weights, data, hyperparameters): a checkpoint of another job is never resumed. They load with
`weights_only=True`, so resuming never unpickles code.

Where they live: a local directory or any `pyarrow.fs` URI (`s3://bucket/...`, `gs://...`, `file://...`). On a
shared cluster the pod's disk goes with the pod, so the production profile sets `checkpoint_uri` (object storage)
and a checkpoint directory under the Flywheel home is mapped to the same relative path there: the retried pod
finds the newest checkpoint of that day's run wherever it lands. Each checkpoint is its own file
(`ckpt-<step>.pt`, the last `keep` kept): a local file is written to a temp name and renamed, an object is one PUT
(never visible half-written), and a file that still fails to load (a store that does expose partial writes) is
skipped for the one before it. With `graceful=True` a SIGTERM (Kubernetes preemption, eviction, node drain: the
pod's grace period) saves a checkpoint at the next step and exits 143, so a graceful preemption loses nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
import torch

from feature_store.offline import filesystem

log = logging.getLogger("flywheel.checkpoint")
PATTERN = re.compile(r"^ckpt-(\d{12})\.pt$")
SIGTERM_EXIT = 128 + signal.SIGTERM


def fingerprint(**parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve(location: Path | str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a checkpoint location, applying the production profile's `checkpoint_uri`."""
    loc = str(location)
    if "://" not in loc:
        from pipeline.config import get_settings

        s = get_settings()
        root = s.home_abs / "checkpoints"
        if s.training.checkpoint_uri and Path(loc).resolve().is_relative_to(root.resolve()):
            loc = f"{s.training.checkpoint_uri.rstrip('/')}/{Path(loc).resolve().relative_to(root.resolve()).as_posix()}"
    return filesystem(loc)


class Checkpointer:
    def __init__(self, directory: Path | str, every_steps: int, on_save: Callable[[str], None] | None = None,
                 *, keep: int = 2, job_key: str | None = None, graceful: bool = False) -> None:
        """`job_key` replaces the trainer's job fingerprint: an elastic job binds its checkpoints to the data and
        hyperparameters but not to the world size, so a restart with fewer or more workers resumes them."""
        self.location = str(directory)
        self.fs, self.root = resolve(directory)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.every_steps = every_steps
        self.on_save = on_save
        self.keep = max(1, keep)
        self.job_key = job_key
        self.saved = 0
        self.stop_requested = False
        self.training = False
        if graceful:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: object) -> None:
        if not self.training:  # nothing to save yet: leave now, the retry starts from the last checkpoint
            raise SystemExit(SIGTERM_EXIT)
        log.warning("SIGTERM: saving a checkpoint at the next step, then exiting %s", SIGTERM_EXIT)
        self.stop_requested = True

    def _name(self, step: int) -> str:
        return f"{self.root}/ckpt-{step:012d}.pt"

    def files(self) -> list[tuple[int, str]]:
        """(step, path) of every checkpoint here, newest first."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        except FileNotFoundError:
            return []
        found = [(int(m.group(1)), i.path) for i in infos if (m := PATTERN.match(i.base_name))]
        return sorted(found, reverse=True)

    @property
    def path(self) -> str:
        """The newest checkpoint's path ('' when there is none)."""
        files = self.files()
        return files[0][1] if files else ""

    def due(self, step: int) -> bool:
        self.training = True
        return self.stop_requested or (self.every_steps > 0 and step > 0 and step % self.every_steps == 0)

    def save(self, job: str, state: dict) -> str:
        buf = io.BytesIO()
        torch.save({**state, "job": self.job_key or job}, buf)
        path = self._name(int(state.get("step", 0)))
        if self.local:
            self.fs.create_dir(self.root, recursive=True)
            tmp = f"{self.root}/.tmp-{os.getpid()}-{Path(path).name}"
            with open(tmp, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            with self.fs.open_output_stream(path) as out:
                out.write(buf.getvalue())
        for _, old in self.files()[self.keep:]:
            self.fs.delete_file(old)
        self.saved += 1
        if self.on_save is not None:
            self.on_save(path)
        if self.stop_requested:
            log.warning("checkpoint %s saved after SIGTERM; exiting", path)
            raise SystemExit(SIGTERM_EXIT)
        return path

    def load(self, job: str) -> dict | None:
        """The newest readable checkpoint of this job; torn files and other jobs' checkpoints are skipped."""
        want = self.job_key or job
        for _, path in self.files():
            try:
                with self.fs.open_input_file(path) as f:
                    state = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
            except Exception as e:  # a partial or corrupt file: the one before it is still good
                log.warning("skipping unreadable checkpoint %s: %s", path, e)
                continue
            if state.get("job") != want:
                log.warning("ignoring checkpoint %s of another job (%s, expected %s)", path, state.get("job"), want)
                continue
            log.info("resuming from checkpoint %s at step %s", path, state.get("step"))
            return state
        return None

    def clear(self) -> None:
        for _, path in self.files():
            self.fs.delete_file(path)


def mlflow_logger(artifact_path: str = "checkpoints") -> Callable[[str], None]:
    """Log each local checkpoint to the active MLflow run's artifact store (a no-op without an active run, and for
    checkpoints that already live in object storage)."""

    def log_checkpoint(path: str) -> None:
        import shutil
        import tempfile

        import mlflow

        if mlflow.active_run() is not None and Path(path).is_file():
            with tempfile.TemporaryDirectory() as tmp:  # one artifact, replaced, not one per step
                mlflow.log_artifact(shutil.copy(path, Path(tmp) / "checkpoint.pt"), artifact_path)

    return log_checkpoint
