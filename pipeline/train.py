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
import mlflow.data
from pydantic import BaseModel

from pipeline import registry, replay
from pipeline.checkpoint import Checkpointer, mlflow_logger
from pipeline.runtime import Runtime, StageError, parse_day, runtime, split_by_time
from pipeline.trainer import fit_increment, pick_device
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
    replay_rows: int = 0
    epochs_run: int = 0


def experiment(rt: Runtime) -> str:
    name = f"flywheel-{rt.spec.name}"
    mlflow.set_experiment(name)
    return name


def data_digest(manifest: dict) -> str:
    return ",".join(f["sha256"][:16] for f in manifest["files"])


def log_inputs(rt: Runtime, day: date, frame, manifest: dict, past: replay.Reservoir, replay_df) -> None:
    """The lake partitions this run learned from, with their manifest digests: lineage a reader can verify."""
    spec = rt.spec
    mlflow.log_input(mlflow.data.from_pandas(
        frame, source=rt.lake.partition_path(VALIDATED, day), targets=spec.label.name,
        name=f"{VALIDATED}/dt={day}", digest=data_digest(manifest)[:36]), context="training")
    if past.as_of is not None and len(replay_df):
        past_manifest = rt.lake.read_manifest(replay.TABLE, past.as_of) or {"files": []}
        mlflow.log_input(mlflow.data.from_pandas(
            replay_df, source=rt.lake.partition_path(replay.TABLE, past.as_of), targets=spec.label.name,
            name=f"{replay.TABLE}/dt={past.as_of}", digest=data_digest(past_manifest)[:36]), context="replay")


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
    policy = replay.ReplayPolicy.from_settings(s)
    columns = [*spec.feature_names, spec.event_time, spec.label.name]
    if prior:
        run = prior[0]
        log.info("reusing finished run %s for %s", run.info.run_id, day)
        if policy.enabled:
            replay.update(rt.lake, day, frame, columns, spec.label.name, policy)
        return TrainResult(day=day.isoformat(), run_id=run.info.run_id, parent_version=parent.version,
                           train_rows=len(train_df), holdout_rows=len(holdout_df),
                           new_vocab=json.loads(run.data.params.get("new_vocab", "{}")),
                           final_loss=float(run.data.metrics.get("train_loss", float("nan"))),
                           device=run.data.params.get("device", "?"), reused=True,
                           replay_rows=int(run.data.params.get("replay_rows", 0)))
    if len(train_df) == 0:
        raise StageError(f"day {day} has no rows left to train on after the holdout split")

    bundle = registry.load_version(client, rt.model_name, parent.version, rt.cache_dir)
    bundle.check_spec(spec)
    added = bundle.grow_vocab(train_df, s.vocab_min_count, s.seed)
    # The reservoir as of the day before: re-running day D replays exactly the same rows.
    past = replay.read_before(rt.lake, day) if policy.enabled else replay.Reservoir.empty()
    replay_df, replay_w = replay.sample(past, replay.replay_rows_for(len(train_df), policy), spec.label.name, day,
                                        policy)
    device = pick_device()
    ckpt_dir = s.home_abs / "checkpoints" / rt.model_name / f"{day}-v{parent.version}-{digest[:16]}"
    with mlflow.start_run(run_name=f"nightly-{day}") as run, tempfile.TemporaryDirectory() as tmp:
        oldest = str(past.rows[replay.ORIGIN].min()) if len(replay_df) else day.isoformat()
        mlflow.set_tags({TAG_KIND: "nightly", registry.TAG_DAY: day.isoformat(),
                         registry.TAG_PARENT: parent.version, TAG_DATA: digest,
                         registry.TAG_WINDOW: f"{oldest}/{day.isoformat()}"})  # replay reaches back this far
        mlflow.log_params({"epochs": s.epochs, "batch_size": s.batch_size, "lr": s.learning_rate,
                           "seed": s.seed, "parent_version": parent.version, "train_rows": len(train_df),
                           "holdout_rows": len(holdout_df), "new_vocab": json.dumps(added),
                           "device": device.type, "spec_digest": spec.digest, "replay_rows": len(replay_df),
                           "replay_as_of": str(past.as_of), "replay_capacity": policy.capacity,
                           "replay_half_life_days": policy.half_life_days, "anchor_l2": s.anchor_l2,
                           "early_stopping_patience": s.early_stopping_patience,
                           "validation_fraction": s.validation_fraction})
        log_inputs(rt, day, frame, manifest, past, replay_df)
        checkpointer = Checkpointer(ckpt_dir, s.checkpoint_every_steps, mlflow_logger())
        result = fit_increment(bundle, train_df, spec.label.name, spec.event_time, s, replay=replay_df,
                               replay_weight=replay_w, device=device, checkpointer=checkpointer)
        for i, loss in enumerate(result.losses):
            mlflow.log_metric("train_loss", loss, step=i)
        for i, loss in enumerate(result.val_losses):
            mlflow.log_metric("val_loss", loss, step=i)
        mlflow.log_metrics({"epochs_run": result.epochs, "resumed_at_step": result.resumed_at_step,
                            "optimizer_restored": float(result.optimizer_restored),
                            "lr_chosen": result.lr or s.learning_rate})
        mlflow.log_dict({c: v.size for c, v in bundle.vocabs.items()}, "vocab_sizes.json")
        mlflow.log_dict(manifest, "data/validated_manifest.json")
        registry.log_bundle(bundle, spec, Path(tmp), train_df[spec.feature_names].head(2))
        mlflow.set_tag(registry.TAG_WEIGHTS, bundle.weights_digest())
    if policy.enabled:
        replay.update(rt.lake, day, frame, columns, spec.label.name, policy, previous=past)
    return TrainResult(day=day.isoformat(), run_id=run.info.run_id, parent_version=parent.version,
                       train_rows=len(train_df), holdout_rows=len(holdout_df), new_vocab=added,
                       final_loss=result.losses[-1], device=result.device, reused=False,
                       replay_rows=len(replay_df), epochs_run=result.epochs)
