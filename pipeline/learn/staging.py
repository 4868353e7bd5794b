"""A night's warm start handed to a training job on other machines, and its result handed back.

The Airflow worker prepares the night exactly as a local run does (parent migrated to the spec, vocabularies grown
by the day, the time-ordered split, the replay sample), then stages what `fit_increment` needs under one location
that the job's pods can read: a local path on a shared volume or an object-storage URI (`pyarrow.fs`). The job
(`python -m pipeline.learn.ddp_train --staged LOCATION`, under torchrun) runs the same `fit_increment` on it and
writes the trained bundle and its `FitResult` beside the inputs; the worker reads them back and logs the
candidate as it logs a local one. Staging encoded tensors, not rows, means the job needs neither the lake, the
feature spec's vocabularies nor MLflow, and a staged night trains to the same weights wherever it runs.

    LOCATION/inputs/parent/   the prepared parent bundle (weights, vocabularies, optimizer moments)
    LOCATION/inputs/rows.pt   the encoded training rows and validation slice (tensors only: loads weights_only)
    LOCATION/inputs/replay.parquet  the replay sample with its weights
    LOCATION/inputs/settings.json   the worker's training settings and seed: the job trains with these, not with
                              whatever its own config says
    LOCATION/inputs/DONE      written last: a half-staged night is never trained
    LOCATION/output/bundle/, LOCATION/output/result.json  the job's result (result.json written last)

The whole location is deleted once the candidate is logged in MLflow (a task retried before that finds the
result and takes it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import torch

from feature_store.offline import filesystem
from pipeline.learn.calibration import Calibration
from pipeline.learn.checkpoint import fingerprint
from pipeline.learn.model import ModelBundle
from pipeline.learn.trainer import Encoded, FitResult

WEIGHT = "__replay_weight"
DONE = "DONE"
RESULT = "result.json"


def _upload(local: Path, location: str) -> None:
    fs, root = filesystem(location)
    fs.create_dir(root, recursive=True)
    pafs.copy_files(str(local), root, destination_filesystem=fs)


def _download(location: str, local: Path) -> None:
    fs, root = filesystem(location)
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(root, str(local), source_filesystem=fs)


def _exists(location: str) -> bool:
    fs, root = filesystem(location)
    return fs.get_file_info(root).type != pafs.FileType.NotFound


def _put_text(location: str, text: str) -> None:
    fs, path = filesystem(location)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


@dataclass
class StagedNight:
    bundle: ModelBundle
    fit_rows: Encoded
    valid: Encoded | None
    replay: pd.DataFrame
    replay_weight: np.ndarray
    key: str
    settings: dict


def stage(location: str, bundle: ModelBundle, fit_rows: Encoded, valid: Encoded | None, replay: pd.DataFrame,
          replay_weight: np.ndarray, settings: dict) -> str:
    """Write the night's inputs under `location`; returns the job key that binds the job's checkpoints to exactly
    these inputs. The same inputs already staged (a retried task) are kept with their checkpoints; anything else
    there (a half-staged attempt, another night's files) is replaced."""
    key = fingerprint(settings=settings, weights=bundle.weights_digest(), rows=len(fit_rows),
                      valid=len(valid) if valid else 0, replay=len(replay), y=float(fit_rows.y.sum()),
                      num=float(fit_rows.num.double().sum()))
    fs, root = filesystem(location)
    done = f"{root}/inputs/{DONE}"
    if fs.get_file_info(done).type == pafs.FileType.File:
        with fs.open_input_stream(done) as f:
            if f.read().decode() == key:
                return key
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir_contents(root, missing_dir_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "inputs"
        bundle.save(local / "parent")
        tensors = {"fit_cat": fit_rows.cat, "fit_num": fit_rows.num, "fit_y": fit_rows.y}
        if valid is not None:
            tensors |= {"valid_cat": valid.cat, "valid_num": valid.num, "valid_y": valid.y}
        torch.save({k: v.contiguous() for k, v in tensors.items()}, local / "rows.pt")
        replay.assign(**{WEIGHT: np.asarray(replay_weight, np.float32)}).to_parquet(local / "replay.parquet")
        (local / "settings.json").write_text(json.dumps(settings, default=str))
        _upload(local, f"{location.rstrip('/')}/inputs")
    _put_text(f"{location.rstrip('/')}/inputs/{DONE}", key)
    return key


def load(location: str, workdir: Path) -> StagedNight:
    if not _exists(f"{location.rstrip('/')}/inputs/{DONE}"):
        raise FileNotFoundError(f"{location}: no completely staged night (inputs/{DONE} missing)")
    _download(f"{location.rstrip('/')}/inputs", workdir)
    tensors = torch.load(workdir / "rows.pt", weights_only=True)
    valid = Encoded(tensors["valid_cat"], tensors["valid_num"], tensors["valid_y"]) if "valid_y" in tensors else None
    replay = pd.read_parquet(workdir / "replay.parquet")
    weight = replay.pop(WEIGHT).to_numpy(np.float32)
    return StagedNight(ModelBundle.load(workdir / "parent"), Encoded(tensors["fit_cat"], tensors["fit_num"],
                                                                       tensors["fit_y"]),
                       valid, replay, weight, (workdir / DONE).read_text(),
                       json.loads((workdir / "settings.json").read_text()))


def write_result(location: str, bundle: ModelBundle, result: FitResult) -> None:
    """The trained bundle, then `result.json`: a reader that finds the result finds the whole bundle."""
    out = f"{location.rstrip('/')}/output"
    with tempfile.TemporaryDirectory() as tmp:
        bundle.save(Path(tmp) / "bundle")
        _upload(Path(tmp) / "bundle", f"{out}/bundle")
    data = dataclasses.asdict(result) | {"weights_digest": bundle.weights_digest()}
    _put_text(f"{out}/{RESULT}", json.dumps(data, indent=2))


def remove(location: str) -> None:
    """Delete a staged night once its candidate is logged: encoded rows must not pile up in the store."""
    fs, root = filesystem(location)
    fs.delete_dir_contents(root, missing_dir_ok=True)
    with contextlib.suppress(OSError):  # an object store may have no directory object to delete
        fs.delete_dir(root)


def read_result(location: str, workdir: Path) -> tuple[ModelBundle, FitResult] | None:
    """The job's bundle and `FitResult`, or None while it has not finished."""
    out = f"{location.rstrip('/')}/output"
    if not _exists(f"{out}/{RESULT}"):
        return None
    fs, path = filesystem(f"{out}/{RESULT}")
    with fs.open_input_stream(path) as f:
        data = json.loads(f.read().decode())
    _download(f"{out}/bundle", workdir / "bundle")
    bundle = ModelBundle.load(workdir / "bundle")
    if bundle.weights_digest() != data.pop("weights_digest"):
        raise ValueError(f"{out}: the bundle does not match its result.json (a partial or foreign upload)")
    data["calibration"] = Calibration(**data["calibration"])
    return bundle, FitResult(**data)
