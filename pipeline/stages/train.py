"""Train: warm-start the champion on one validated day and log the candidate to MLflow (not yet registered).

The parent is the model that was champion before this day (see `registry.parent_for_day`) and a finished run
for the same day, parent and data digest is reused, so re-running a day yields the same candidate.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import mlflow
import mlflow.data
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from feature_store.offline import Lake
from pipeline import registry
from pipeline.errors import StageError
from pipeline.learn import replay
from pipeline.learn.checkpoint import Checkpointer, mlflow_logger
from pipeline.learn.holdout import TIE_BREAKERS, split_positions
from pipeline.learn.model import norm_stats
from pipeline.learn.trainer import encode_groups, fit_increment, pick_device, wants_validation
from pipeline.runtime import Runtime, parse_day, runtime
from pipeline.stages.validate import VALIDATED
from pipeline.tags import Tag

log = logging.getLogger("flywheel.train")
BATCH_ROWS = 65_536


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
    migration: str | None = Field(default=None, description="The declared spec migration applied, as JSON.")
    expired_vocab: dict[str, int] = Field(default_factory=dict)


def experiment(rt: Runtime) -> str:
    name = f"flywheel-{rt.spec.name}"
    mlflow.set_experiment(name)
    return name


def data_digest(manifest: dict) -> str:
    return ",".join(f["sha256"][:16] for f in manifest["files"])


class DayReader:
    """The validated day as Parquet files read column by column and record batch by record batch: training
    never holds the whole day as one pandas frame."""

    def __init__(self, lake: Lake, day: date, manifest: dict, table: str = VALIDATED,
                 batch_rows: int = BATCH_ROWS) -> None:
        base = lake.partition_path(table, day)
        self.lake, self.day, self.table_name = lake, day, table
        self.fs = lake.fs
        self.files = [f"{base}/{f['path']}" for f in manifest["files"]]
        self.batch_rows = batch_rows
        self.names = pq.read_schema(self.files[0], filesystem=self.fs).names if self.files else []

    def table(self, columns: list[str]) -> pa.Table:
        return pa.concat_tables([pq.read_table(f, columns=columns, filesystem=self.fs) for f in self.files])

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        yield from self.lake.iter_batches(self.table_name, self.day, self.batch_rows, columns)

    def frames(self, columns: list[str], keep: np.ndarray) -> Iterator:
        """Pandas frames of the rows where `keep` is true, one record batch at a time."""
        at = 0
        for batch in self.batches(columns):
            mask = keep[at:at + batch.num_rows]
            at += batch.num_rows
            if mask.any():
                yield batch.filter(pa.array(mask)).to_pandas()


def numeric_stats(reader: DayReader, columns: list[str], rows: np.ndarray) -> dict[str, tuple[float, float]]:
    """Mean and std of numerics the parent model has never seen, over the training rows: how a feature added by
    a migration is normalised."""
    return {c: norm_stats(reader.table([c]).column(0).to_numpy(zero_copy_only=False).astype(np.float64)[rows])
            for c in columns}


def log_inputs(rt: Runtime, day: date, manifest: dict, past: replay.Reservoir, replay_df) -> None:
    """The lake partitions this run learned from, with their manifest digests: lineage a reader can verify."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    spec = rt.spec
    mlflow.log_input(MetaDataset(resolve_dataset_source(rt.lake.partition_path(VALIDATED, day)),
                                 name=f"{VALIDATED}/dt={day}", digest=data_digest(manifest)[:36],
                                 schema=registry.signature(spec).inputs), context="training")
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
        filter_string=(f"tags.`{Tag.DAY}` = '{day}' and tags.`{Tag.PARENT}` = '{parent.version}'"
                       f" and tags.`{Tag.DATA_DIGEST}` = '{digest}' and attributes.status = 'FINISHED'"))
    reader = DayReader(rt.lake, day, manifest)
    keys = reader.table([spec.event_time, *(c for c in TIE_BREAKERS if c in reader.names)])
    train_pos, holdout_pos = split_positions(keys, spec.event_time, s.holdout_fraction)
    total = keys.num_rows
    del keys
    policy = replay.ReplayPolicy.from_settings(s)
    columns = [*spec.feature_names, spec.event_time, spec.label.name]
    # The reservoir as of the day before: re-running day D replays exactly the same rows.
    past = replay.read_before(rt.lake, day) if policy.enabled else replay.Reservoir.empty()
    if prior:
        run = prior[0]
        log.info("reusing finished run %s for %s", run.info.run_id, day)
        if policy.enabled:
            if len(past.rows) and not set(spec.feature_names) <= set(past.rows.columns):
                parent_features = registry.load_version(client, rt.model_name, parent.version, rt.cache_dir).features
                plan = spec.plan_migration(parent_features)
                past = replay.migrate(past, plan.renamed, plan.added)
            replay.update(rt.lake, day, reader.table(columns), columns, spec.label.name, policy, previous=past)
        return TrainResult(day=day.isoformat(), run_id=run.info.run_id, parent_version=parent.version,
                           train_rows=len(train_pos), holdout_rows=len(holdout_pos),
                           new_vocab=json.loads(run.data.params.get("new_vocab", "{}")),
                           final_loss=float(run.data.metrics.get("train_loss", float("nan"))),
                           device=run.data.params.get("device", "?"), reused=True,
                           replay_rows=int(run.data.params.get("replay_rows", 0)),
                           migration=run.data.tags.get(Tag.MIGRATION),
                           expired_vocab=json.loads(run.data.params.get("expired_vocab", "{}")))
    if len(train_pos) == 0:
        raise StageError(f"day {day} has no rows left to train on after the holdout split")

    bundle = registry.load_version(client, rt.model_name, parent.version, rt.cache_dir)
    is_train = np.zeros(total, dtype=bool)
    is_train[train_pos] = True
    try:
        plan = bundle.migrate_to(spec, s.seed, numeric_stats(
            reader, [n for n in spec.numeric if n not in bundle.numeric], train_pos))
    except ValueError as e:
        raise StageError(f"cannot warm-start v{parent.version} for this feature spec: {e}") from e
    migration = plan.summary() if plan is not None else None
    if plan is not None:
        past = replay.migrate(past, plan.renamed, plan.added)
    added = bundle.grow_vocab(reader.frames(bundle.categorical, is_train), s.vocab_min_count, s.seed, day=day)
    expired = bundle.expire_vocab(day, s.vocab_expiry_days)
    fit_pos, val_pos = train_pos, train_pos[:0]
    if wants_validation(s, len(train_pos)):
        cut = int(round(len(train_pos) * (1 - s.validation_fraction)))
        fit_pos, val_pos = train_pos[:cut], train_pos[cut:]
    device = pick_device()
    fit_rows, val_rows = encode_groups(
        bundle, reader.batches([*bundle.categorical, *bundle.numeric, spec.label.name]), spec.label.name,
        [fit_pos, val_pos], pin=device.type == "cuda")
    replay_df, replay_w = replay.sample(past, replay.replay_rows_for(len(train_pos), policy), spec.label.name,
                                        day, policy)
    ckpt_dir = s.home_abs / "checkpoints" / rt.model_name / f"{day}-v{parent.version}-{digest[:16]}"
    with mlflow.start_run(run_name=f"nightly-{day}") as run, tempfile.TemporaryDirectory() as tmp:
        oldest = str(past.rows[replay.ORIGIN].min()) if len(replay_df) else day.isoformat()
        mlflow.set_tags({Tag.KIND: "nightly", Tag.DAY: day.isoformat(),
                         Tag.PARENT: parent.version, Tag.DATA_DIGEST: digest,
                         Tag.WINDOW: f"{oldest}/{day.isoformat()}"})  # replay reaches back this far
        if migration is not None:
            mlflow.set_tag(Tag.MIGRATION, migration)
        mlflow.log_params({"epochs": s.epochs, "batch_size": s.batch_size, "lr": s.learning_rate,
                           "seed": s.seed, "parent_version": parent.version, "train_rows": len(train_pos),
                           "holdout_rows": len(holdout_pos), "new_vocab": json.dumps(added),
                           "device": device.type, "spec_digest": spec.digest, "replay_rows": len(replay_df),
                           "replay_as_of": str(past.as_of), "replay_capacity": policy.capacity,
                           "replay_half_life_days": policy.half_life_days, "anchor_l2": s.anchor_l2,
                           "early_stopping_patience": s.early_stopping_patience,
                           "validation_fraction": s.validation_fraction, "migration": migration or "none",
                           "vocab_expiry_days": s.vocab_expiry_days, "expired_vocab": json.dumps(expired)})
        log_inputs(rt, day, manifest, past, replay_df)
        checkpointer = Checkpointer(ckpt_dir, s.checkpoint_every_steps, mlflow_logger())
        result = fit_increment(bundle, fit_rows, spec.label.name, spec.event_time, s, replay=replay_df,
                               replay_weight=replay_w, device=device, checkpointer=checkpointer,
                               valid=val_rows if len(val_rows) else None)
        del fit_rows, val_rows
        for i, loss in enumerate(result.losses):
            mlflow.log_metric("train_loss", loss, step=i)
        for i, loss in enumerate(result.val_losses):
            mlflow.log_metric("val_loss", loss, step=i)
        mlflow.log_metrics({"epochs_run": result.epochs, "resumed_at_step": result.resumed_at_step,
                            "optimizer_restored": float(result.optimizer_restored),
                            "lr_chosen": result.lr or s.learning_rate})
        mlflow.log_dict({c: v.size for c, v in bundle.vocabs.items()}, "vocab_sizes.json")
        mlflow.log_dict({c: v.to_dict() for c, v in bundle.vocabs.items()}, "vocab/vocabularies.json")
        mlflow.log_dict(manifest, "data/validated_manifest.json")
        reports = s.reports_dir / "validation" / f"dt={day.isoformat()}"
        if reports.is_dir():
            mlflow.log_artifacts(str(reports), "validation")
        example = next(reader.frames(spec.feature_names, is_train))[spec.feature_names].head(2)
        registry.log_bundle(bundle, spec, Path(tmp), example)
        mlflow.set_tag(Tag.WEIGHTS, bundle.weights_digest())
    if policy.enabled:
        replay.update(rt.lake, day, reader.table(columns), columns, spec.label.name, policy, previous=past)
    return TrainResult(day=day.isoformat(), run_id=run.info.run_id, parent_version=parent.version,
                       train_rows=len(train_pos), holdout_rows=len(holdout_pos), new_vocab=added,
                       final_loss=result.losses[-1], device=result.device, reused=False,
                       replay_rows=len(replay_df), epochs_run=result.epochs, migration=migration,
                       expired_vocab=expired)
