"""Train: warm-start the champion on one validated day and log the candidate to MLflow (not yet registered).

The parent is the model that was champion before this day (see `registry.parent_for_day`) and a finished run
for the same day, parent and data digest is reused, so re-running a day yields the same candidate.
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import date
from pathlib import Path

import mlflow
from pydantic import BaseModel

from pipeline import registry
from pipeline.runtime import Runtime, StageError, parse_day, runtime, split_by_time
from pipeline.trainer import fit, pick_device
from pipeline.validate import VALIDATED

log = logging.getLogger("flywheel.train")
TAG_KIND = "flywheel.kind"
TAG_DATA = "flywheel.data_digest"


class TrainResult(BaseModel):
    day: str
    run_id: str
    parent_version: str
    train_rows: int
    holdout_rows: int
    new_vocab: dict[str, int]
    final_loss: float
    device: str
    reused: bool


def experiment(rt: Runtime) -> str:
    name = f"flywheel-{rt.spec.name}"
    mlflow.set_experiment(name)
    return name


def data_digest(manifest: dict) -> str:
    return ",".join(f["sha256"][:16] for f in manifest["files"])


def train(day: str | date, rt: Runtime | None = None) -> TrainResult:
    rt = rt or runtime()
    day = parse_day(day)
    s, spec = rt.settings, rt.spec
    client = rt.client()
    parent = registry.parent_for_day(client, rt.model_name, day)
    if parent is None:
        raise StageError(f"no champion of {rt.model_name} to warm-start from: run `flywheel bootstrap` first")
    manifest = rt.lake.read_manifest(VALIDATED, day)
    if manifest is None:
        raise StageError(f"day {day} has no validated partition: run collect and validate (and pass the gate)")
    digest = data_digest(manifest)
    exp = experiment(rt)
    prior = mlflow.search_runs(
        experiment_names=[exp], output_format="list", max_results=1,
        filter_string=(f"tags.`{registry.TAG_DAY}` = '{day}' and tags.`{registry.TAG_PARENT}` = '{parent.version}'"
                       f" and tags.`{TAG_DATA}` = '{digest}' and attributes.status = 'FINISHED'"))
    frame = rt.lake.read_partition(VALIDATED, day).to_pandas()
    train_df, holdout_df = split_by_time(frame, spec.event_time, s.holdout_fraction)
    if prior:
        run = prior[0]
        log.info("reusing finished run %s for %s", run.info.run_id, day)
        return TrainResult(day=day.isoformat(), run_id=run.info.run_id, parent_version=parent.version,
                           train_rows=len(train_df), holdout_rows=len(holdout_df),
                           new_vocab=json.loads(run.data.params.get("new_vocab", "{}")),
                           final_loss=float(run.data.metrics.get("train_loss", float("nan"))),
                           device=run.data.params.get("device", "?"), reused=True)
    if len(train_df) == 0:
        raise StageError(f"day {day} has no rows left to train on after the holdout split")

    bundle = registry.load_version(client, rt.model_name, parent.version, rt.cache_dir)
    bundle.check_spec(spec)
    added = bundle.grow_vocab(train_df, s.vocab_min_count, s.seed)
    device = pick_device()
    with mlflow.start_run(run_name=f"nightly-{day}") as run, tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tags({TAG_KIND: "nightly", registry.TAG_DAY: day.isoformat(),
                         registry.TAG_PARENT: parent.version, TAG_DATA: digest})
        mlflow.log_params({"epochs": s.epochs, "batch_size": s.batch_size, "lr": s.learning_rate,
                           "seed": s.seed, "parent_version": parent.version, "train_rows": len(train_df),
                           "holdout_rows": len(holdout_df), "new_vocab": json.dumps(added),
                           "device": device.type, "spec_digest": spec.digest})
        result = fit(bundle, train_df, spec.label.name, epochs=s.epochs, batch_size=s.batch_size,
                     lr=s.learning_rate, seed=s.seed, device=device)
        for i, loss in enumerate(result.losses):
            mlflow.log_metric("train_loss", loss, step=i)
        mlflow.log_dict(manifest, "data/validated_manifest.json")
        registry.log_bundle(bundle, spec, Path(tmp), train_df[spec.feature_names].head(2))
        mlflow.set_tag(registry.TAG_WEIGHTS, bundle.weights_digest())
    return TrainResult(day=day.isoformat(), run_id=run.info.run_id, parent_version=parent.version,
                       train_rows=len(train_df), holdout_rows=len(holdout_df), new_vocab=added,
                       final_loss=result.losses[-1], device=result.device, reused=False)
