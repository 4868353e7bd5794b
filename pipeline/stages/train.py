"""Train: warm-start the champion on one validated day and log the candidate to MLflow (not yet registered).

The parent is the model that was champion before this day (see `registry.parent_for_day`) and a finished run
for the same day, parent and data digest is reused, so re-running a day yields the same candidate.

On a drift night (the day's drift report has a severe item, or the champion's AUC on the day's validation slice
fell `drift_auc_drop` below its recorded holdout AUC) the warm start gets challengers (`learn/policies.py`:
shrink-and-perturb, a fresh model on the recent window); each is judged by the promotion gate's rules on the
held-out slice, a challenger replaces the warm start only when it is confidently better there (`choose`), and the
chosen one alone is logged as the night's model, with the policy that made it as a tag.
While the whole labeled past is small (`training.refit_max_rows`), every night also refits the first model's
recipe on all of it (`refit`, `refit_rows`), and that refit serves unless the warm start is confidently better.
Any other night trains exactly one warm start.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import mlflow
import mlflow.data
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, Field

from feature_store.offline import Lake
from pipeline import registry
from pipeline.checks.drift import DRIFT
from pipeline.checks.metrics import auc
from pipeline.checks.paired import Interval, paired_auc_diff
from pipeline.errors import Accumulating, NothingToTrain, StageError, TrainingFailed
from pipeline.learn import policies, replay
from pipeline.learn.checkpoint import Checkpointer, mlflow_logger
from pipeline.learn.holdout import TIE_BREAKERS, split_positions, time_order
from pipeline.learn.model import ModelBundle, norm_stats
from pipeline.learn.policies import FRESH, REFIT, SHRINK, WARM, DriftSignal
from pipeline.learn.trainer import (
    Encoded,
    FitResult,
    encode_groups,
    fit_increment,
    pick_device,
    wants_validation,
)
from pipeline.registry import VersionInfo
from pipeline.runtime import Runtime, parse_day, runtime
from pipeline.stages.evaluate import Judgement, judge
from pipeline.stages.validate import VALIDATED
from pipeline.tags import Alias, Tag

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
    policy: str = Field(default=WARM, description="The training policy of the logged model.")
    candidates: list[str] = Field(default_factory=lambda: [WARM], description="Policies trained tonight.")
    drift_trigger: list[str] = Field(default_factory=list, description="Why challengers were trained.")
    carried_rows: int = Field(default=0, description="Rows of earlier days the parent never trained on, trained "
                              "on tonight.")
    carried_from: str | None = Field(default=None, description="The days they came from, comma-separated.")
    pooled_days: list[str] = Field(default_factory=list, description="A small night's days, oldest first: trained "
                                   "and judged together (empty when the day alone had `min_rows`).")


def experiment(rt: Runtime) -> str:
    name = f"flywheel-{rt.spec.name}"
    mlflow.set_experiment(name)
    return name


def data_digest(manifest: dict) -> str:
    return ",".join(f["sha256"][:16] for f in manifest["files"])


def mask_of(positions: np.ndarray, total: int) -> np.ndarray:
    """A boolean row mask of a day's `total` rows, true at `positions` (what `DayReader.frames` filters by)."""
    keep = np.zeros(total, dtype=bool)
    keep[positions] = True
    return keep


class DayReader:
    """The validated day as Parquet files read column by column and record batch by record batch: training
    never holds the whole day as one pandas frame."""

    def __init__(self, lake: Lake, day: date, manifest: dict, table: str = VALIDATED,
                 batch_rows: int = BATCH_ROWS) -> None:
        base = lake.partition_path(table, day)
        self.lake, self.day, self.table_name = lake, day, table
        self.days = [day]
        self.fs = lake.fs
        self.files = [f"{base}/{f['path']}" for f in manifest["files"]]
        self.batch_rows = batch_rows
        self.names = pq.read_schema(self.files[0], filesystem=self.fs).names if self.files else []

    @classmethod
    def pooled(cls, lake: Lake, days: list[tuple[date, dict]], table: str = VALIDATED) -> DayReader:
        """Several days (oldest first, with their manifests) read as one: row positions run through the days in
        that order, so a split takes the newest rows of all of them."""
        reader = cls(lake, days[-1][0], days[-1][1], table)
        reader.days = [d for d, _ in days]
        reader.files = [f"{lake.partition_path(table, d)}/{f['path']}" for d, m in days for f in m["files"]]
        return reader

    def table(self, columns: list[str]) -> pa.Table:
        return pa.concat_tables([pq.read_table(f, columns=columns, filesystem=self.fs) for f in self.files])

    def in_time_order(self, columns: list[str], time_col: str) -> pa.Table:
        """`columns` of every row in `time_order`: the files' order is whichever server process logged what,
        and anything drawn by position (the replay sample, a capped window) must not depend on it."""
        table = self.table([*columns, *(c for c in TIE_BREAKERS if c in self.names and c not in columns)])
        return table.take(pa.array(time_order(table, time_col))).select(columns)

    def split(self, time_col: str, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray, int]:
        """The day's training and holdout row positions (`split_positions`, read from its key columns only)
        and its row count."""
        keys = self.table([time_col, *(c for c in TIE_BREAKERS if c in self.names)])
        return *split_positions(keys, time_col, holdout_fraction), keys.num_rows

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        for day in self.days:
            yield from self.lake.iter_batches(self.table_name, day, self.batch_rows, columns)

    def frames(self, columns: list[str], keep: np.ndarray) -> Iterator:
        """Pandas frames of the rows where `keep` is true, one record batch at a time."""
        at = 0
        for batch in self.batches(columns):
            mask = keep[at:at + batch.num_rows]
            at += batch.num_rows
            if mask.any():
                yield batch.filter(pa.array(mask)).to_pandas()

    def rows(self, columns: list[str], positions: np.ndarray, total: int) -> pd.DataFrame:
        """The rows at `positions` (e.g. a time-ordered split) as one frame in that order."""
        keep = mask_of(positions, total)
        parts = list(self.frames(columns, keep))
        frame = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
        return frame.iloc[np.searchsorted(np.flatnonzero(keep), positions)].reset_index(drop=True)


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


@dataclass(frozen=True)
class Carried:
    """Rows of one earlier day that the night's parent never trained on (see `unlearned_before`). Without them
    a night learns from about 72 % of each day (the defaults): the newest labels of a day (its validation slice
    and holdout) reach a model only through the replay sample, at a quarter of a day's weight."""

    day: date
    reader: DayReader
    positions: np.ndarray
    total: int
    digest: str


def carried_rows(parts: list[Carried]) -> int:
    return sum(len(c.positions) for c in parts)


def carried_days(parts: list[Carried]) -> str | None:
    return ",".join(c.day.isoformat() for c in parts) or None


def validation_cut(settings, train_rows: int) -> int:
    """Where a day's training rows (in time order) end and its validation slice begins."""
    if not wants_validation(settings, train_rows):
        return train_rows
    return int(round(train_rows * (1 - settings.training.validation_fraction)))


def unlearned_days(rt: Runtime, day: date, parent: VersionInfo) -> list[date]:
    """Validated days before `day` that the parent may not have learned whole: its own data day (whose held-out
    rows it never trained on) and every later one, less the days of rolled-back models, oldest first."""
    known = parent.data_day
    rejected = registry.rolled_back_days(rt.client(), rt.model_name) - {known}
    return [d for d in rt.lake.partition_days(VALIDATED)
            if d < day and (known is None or d >= known) and d not in rejected]


def pool(rt: Runtime, day: date, parent: VersionInfo, manifest: dict, earlier: list[date]
         ) -> list[tuple[date, dict]]:
    """The days tonight trains and is judged on, oldest first: the day alone when it has `min_rows` labeled
    rows; else it and the newest earlier days the parent never trained on, until together they have. A stream
    of a few dozen rows a day would otherwise train on each day alone and judge each candidate on a dozen
    held-out rows, or (as the validation gate once did) never train at all. Raises `Accumulating` while even all
    of those days together are fewer: they stay validated and the next night pools them again. `earlier` is
    `unlearned_days` before `day`."""
    need = rt.settings.validation.min_rows
    days, rows = [(day, manifest)], manifest["rows"]
    if rows >= need:
        return days
    for d in reversed([d for d in earlier if d != parent.data_day]):
        m = rt.lake.read_manifest(VALIDATED, d)
        if m is None or not m["files"]:
            continue
        days.insert(0, (d, m))
        rows += m["rows"]
        if rows >= need:
            return days
    since = f"since v{parent.version}'s data ({parent.data_day})" if parent.data_day else "so far"
    raise Accumulating(f"{day}: {rows} labeled rows {since} in {len(days)} day(s), fewer than "
                       f"validation.min_rows={need} (FLYWHEEL_VALIDATION__MIN_ROWS); not training tonight. The "
                       "days are validated and kept: a later night trains on them together with its own")


def unlearned_before(rt: Runtime, parent: VersionInfo, earlier: list[date]) -> list[Carried]:
    """The rows of earlier validated days that the parent never trained on, oldest day first: its own day's
    validation slice and holdout, and every later day whole. After a promotion that is the previous day's
    held-out rows; after held nights it is also the days whose candidates the gate held, so what a held night
    learned is not lost when the next night starts again from the champion. A day whose model was rolled back
    is left out: live traffic judged what was learned from it. At most `catch_up_days` days, the newest; older
    ones reach a model through the replay sample only. `earlier` is `unlearned_days` before the night's first
    day."""
    s, spec = rt.settings, rt.spec
    if not s.training.carry_held_out:
        return []
    known = parent.data_day
    parts = []
    for d in earlier[-s.training.catch_up_days:] if s.training.catch_up_days else []:
        manifest = rt.lake.read_manifest(VALIDATED, d)
        if manifest is None or not manifest["files"]:
            continue
        reader = DayReader(rt.lake, d, manifest)
        if d == known:
            train_pos, holdout_pos, total = reader.split(spec.event_time, s.training.holdout_fraction)
            positions = np.concatenate([train_pos[validation_cut(s, len(train_pos)):], holdout_pos])
        else:  # a day the parent never saw: every row, no split to read
            total = manifest["rows"]
            positions = np.arange(total)
        parts.append(Carried(d, reader, positions, total, data_digest(manifest)))
    return parts


@dataclass
class Night:
    """One night's inputs, prepared once and shared by every candidate: the parent (migrated to the spec, its
    vocabularies grown by the day), the day's split and encoded rows, and the replay sample."""

    day: date
    parent: VersionInfo
    reader: DayReader
    manifest: dict
    digest: str
    total: int
    train_pos: np.ndarray
    holdout_pos: np.ndarray
    fit_pos: np.ndarray
    val_pos: np.ndarray
    bundle: ModelBundle
    fit_rows: Encoded
    val_rows: Encoded
    past: replay.Reservoir
    replay_df: pd.DataFrame
    replay_w: np.ndarray
    added: dict[str, int]
    expired: dict[str, int]
    migration: str | None
    device: torch.device
    ckpt_dir: Path
    carried: list[Carried] = field(default_factory=list)
    refit_rows: pd.DataFrame | None = None  # what `refit` learns from, when tonight has one (`refit_rows`)

    @property
    def valid(self) -> Encoded | None:
        return self.val_rows if len(self.val_rows) else None


@dataclass
class Candidate:
    policy: str
    bundle: ModelBundle
    result: FitResult
    seconds: float
    window: str
    judgement: Judgement | None = None
    vs_base: Interval | None = None  # holdout AUC minus the base's (the warm start or the refit), paired CI

    def summary(self) -> dict:
        out = {"policy": self.policy, "seconds": round(self.seconds, 3), "epochs": self.result.epochs,
               "window": self.window, "calibration": self.result.calibration.to_dict()}
        if self.judgement is not None:
            out |= {"passed": self.judgement.passed, "reason": self.judgement.reason,
                    "holdout": self.judgement.cand, "holdout_ece": self.judgement.eces["candidate"]}
        if self.vs_base is not None:
            out["auc_vs_base"] = self.vs_base.model_dump()
        return out


@dataclass
class Outcome:
    winner: Candidate
    candidates: list[Candidate]
    signal: DriftSignal
    skipped: list[str] = field(default_factory=list)


def finished_run(exp: str, model: str, day: date, parent: str, digest: str):
    """The finished run of this model for this day, parent and data. The model's name is part of the key: one
    experiment per spec may hold several models, and a parent version number means something only in its own."""
    found = mlflow.search_runs(
        experiment_names=[exp], output_format="list", max_results=1,
        filter_string=(f"tags.`{Tag.MODEL}` = '{model}' and tags.`{Tag.DAY}` = '{day}'"
                       f" and tags.`{Tag.PARENT}` = '{parent}'"
                       f" and tags.`{Tag.DATA_DIGEST}` = '{digest}' and attributes.status = 'FINISHED'"))
    return found[0] if found else None


def train(day: str | date, rt: Runtime | None = None) -> TrainResult:
    rt = rt or runtime()
    day = parse_day(day)
    s, spec = rt.settings, rt.spec
    client = rt.client()
    parent = registry.parent_for_day(client, rt.model_name, day)
    if parent is None:
        champion = registry.get_alias(client, rt.model_name, Alias.CHAMPION)
        if champion is not None and champion.data_day is not None:  # its lineage starts on or after this day
            raise NothingToTrain(f"{day}: champion v{champion.version}'s lineage starts with data of "
                                 f"{champion.data_day} (bootstrap's history ends then), so no model before this "
                                 "day exists to warm-start from; nightly training starts with the next day")
        raise StageError(f"no champion of {rt.model_name} to warm-start from: run `flywheel bootstrap` first")
    manifest = rt.lake.read_manifest(VALIDATED, day)
    if manifest is None:
        raise StageError(f"day {day} has no validated partition: run collect and validate (and pass the gate)")
    earlier = unlearned_days(rt, day, parent)  # one registry query serves both the pool and the carry
    days = pool(rt, day, parent, manifest, earlier)
    carried = unlearned_before(rt, parent, [d for d in earlier if d < days[0][0]])
    digest = data_digest(manifest) + "".join(f"+{d}:{data_digest(m)}" for d, m in days[:-1]) \
        + "".join(f"+{c.day}:{c.digest}" for c in carried)
    if len(days) > 1:  # any number of pooled days: the reuse key stays a tag-sized digest of the same inputs
        digest = hashlib.sha256(digest.encode()).hexdigest()
    prior = finished_run(experiment(rt), rt.model_name, day, parent.version, digest)
    reader = DayReader.pooled(rt.lake, days)
    pooled = [d.isoformat() for d, _ in days] if len(days) > 1 else []
    train_pos, holdout_pos, total = reader.split(spec.event_time, s.training.holdout_fraction)
    policy = replay.ReplayPolicy.from_settings(s)
    # The reservoir as of the day before: re-running day D replays exactly the same rows.
    past = replay.read_before(rt.lake, day) if policy.enabled else replay.Reservoir.empty()
    if prior is not None:
        return reuse(rt, day, prior, parent, reader, past, len(train_pos), len(holdout_pos), pooled)
    if len(train_pos) == 0:
        raise StageError(f"day {day} has no rows left to train on after the holdout split")
    night = prepare(rt, day, parent, reader, manifest, digest, past, train_pos, holdout_pos, total, carried)
    if pooled:
        log.info("small day %s: training on %d rows of %s", day, total, ", ".join(pooled))
    with mlflow.start_run(run_name=f"nightly-{day}") as run, tempfile.TemporaryDirectory() as tmp:
        if pooled:
            mlflow.set_tag(Tag.POOLED, ",".join(pooled))
        log_setup(rt, night)
        outcome = train_candidates(rt, night)
        log_outcome(rt, night, outcome, Path(tmp))
    update_replay(rt, night.reader, night.past, day)
    if s.cluster.submits_job:  # the candidate is in MLflow now: the staged night (rows, checkpoints) can go
        from pipeline.learn import staging

        staging.remove(staging_location(rt, night))
    best = outcome.winner
    return TrainResult(day=day.isoformat(), run_id=run.info.run_id, parent_version=parent.version,
                       train_rows=len(train_pos), holdout_rows=len(holdout_pos), new_vocab=night.added,
                       final_loss=best.result.losses[-1], device=best.result.device, reused=False,
                       replay_rows=len(night.replay_df) if best.policy not in (FRESH, REFIT) else 0,
                       epochs_run=best.result.epochs, migration=night.migration, expired_vocab=night.expired,
                       policy=best.policy, candidates=[c.policy for c in outcome.candidates],
                       drift_trigger=outcome.signal.reasons, carried_rows=carried_rows(carried),
                       carried_from=carried_days(carried), pooled_days=pooled)


def update_replay(rt: Runtime, reader: DayReader, past: replay.Reservoir, day: date) -> None:
    policy = replay.ReplayPolicy.from_settings(rt.settings)
    if policy.enabled:
        spec = rt.spec
        columns = [*spec.feature_names, spec.event_time, spec.label.name]
        replay.update(rt.lake, day, reader.in_time_order(columns, spec.event_time), columns, spec.label.name,
                      policy, previous=past)


def reuse(rt: Runtime, day: date, run, parent: VersionInfo, reader: DayReader, past: replay.Reservoir,
          train_rows: int, holdout_rows: int, pooled: list[str]) -> TrainResult:
    """A finished run for this day, parent and data: return it (and rewrite the day's reservoir) unchanged."""
    spec = rt.spec
    log.info("reusing finished run %s for %s", run.info.run_id, day)
    if len(past.rows) and not set(spec.feature_names) <= set(past.rows.columns):
        parent_features = registry.load_version(rt.client(), rt.model_name, parent.version, rt.cache_dir).features
        plan = spec.plan_migration(parent_features)
        past = replay.migrate(past, plan.renamed, plan.added)
    update_replay(rt, reader, past, day)
    tags, params = run.data.tags, run.data.params
    trigger = tags.get(Tag.DRIFT_TRIGGER, "none")
    return TrainResult(day=day.isoformat(), run_id=run.info.run_id, parent_version=parent.version,
                       train_rows=train_rows, holdout_rows=holdout_rows,
                       new_vocab=json.loads(params.get("new_vocab", "{}")),
                       final_loss=float(run.data.metrics.get("train_loss", float("nan"))),
                       device=params.get("device", "?"), reused=True, replay_rows=int(params.get("replay_rows", 0)),
                       migration=tags.get(Tag.MIGRATION),
                       expired_vocab=json.loads(params.get("expired_vocab", "{}")),
                       policy=tags.get(Tag.POLICY, WARM), candidates=params.get("candidates", WARM).split(","),
                       drift_trigger=[] if trigger == "none" else trigger.split("; "),
                       carried_rows=int(params.get("carried_rows", 0)),
                       carried_from=None if params.get("carried_from", "None") == "None" else params["carried_from"],
                       pooled_days=pooled)


def prepare(rt: Runtime, day: date, parent: VersionInfo, reader: DayReader, manifest: dict, digest: str,
            past: replay.Reservoir, train_pos: np.ndarray, holdout_pos: np.ndarray, total: int,
            carried: list[Carried] | None = None) -> Night:
    s, spec = rt.settings, rt.spec
    bundle = registry.load_version(rt.client(), rt.model_name, parent.version, rt.cache_dir)
    is_train = mask_of(train_pos, total)
    try:
        plan = bundle.migrate_to(spec, s.seed, numeric_stats(
            reader, [n for n in spec.numeric if n not in bundle.numeric], train_pos))
    except ValueError as e:
        raise StageError(f"cannot warm-start v{parent.version} for this feature spec: {e}") from e
    if plan is not None:
        past = replay.migrate(past, plan.renamed, plan.added)
    carried = carried or []
    sightings = [reader.frames(bundle.categorical, is_train)]
    sightings += [c.reader.frames(bundle.categorical, mask_of(c.positions, c.total)) for c in carried]
    added = bundle.grow_vocab(itertools.chain(*sightings), s.training.vocab_min_count, s.seed, day=day)
    expired = bundle.expire_vocab(day, s.training.vocab_expiry_days)
    cut = validation_cut(s, len(train_pos))
    fit_pos, val_pos = train_pos[:cut], train_pos[cut:]
    device = pick_device()
    columns = [*bundle.categorical, *bundle.numeric, spec.label.name]
    fit_rows, val_rows = encode_groups(bundle, reader.batches(columns), spec.label.name, [fit_pos, val_pos],
                                       pin=device.type == "cuda")
    earlier = [encode_groups(bundle, c.reader.batches(columns), spec.label.name, [c.positions])[0]
               for c in carried if len(c.positions)]
    if earlier:
        fit_rows = Encoded.concat([fit_rows, *earlier], pin=device.type == "cuda")
    policy = replay.ReplayPolicy.from_settings(s)
    replay_df, replay_w = replay.sample(past, replay.replay_rows_for(len(train_pos), policy), spec.label.name,
                                        day, policy)
    ckpt_dir = s.home_abs / "checkpoints" / rt.model_name / f"{day}-v{parent.version}-{digest[:16]}"
    return Night(day, parent, reader, manifest, digest, total, train_pos, holdout_pos, fit_pos, val_pos, bundle,
                 fit_rows, val_rows, past, replay_df, replay_w, added, expired,
                 plan.summary() if plan is not None else None, device, ckpt_dir, carried)


def severe_drift(lake: Lake, day: date) -> list[str]:
    """The severe items of the day's drift report (`drift/dt=D`, written by validate), if there is one."""
    if lake.read_manifest(DRIFT, day) is None:
        return []
    report = lake.read_partition(DRIFT, day).to_pylist()
    return [f"{r['name']} (PSI {r['psi']:.2f})" for r in report if r["severity"] == "severe"]


def drift_signal(rt: Runtime, night: Night) -> DriftSignal:
    """Whether tonight is a drift night. The champion is judged on the validation slice, never on the holdout
    the gate decides on. Nothing is computed when no challenger policy is configured."""
    s = rt.settings
    if not s.challengers.policies:
        return DriftSignal()
    champion_auc = reference = None
    if s.challengers.auc_drop > 0 and len(night.val_rows) >= s.challengers.auc_min_rows:
        champion_auc = auc(night.val_rows.y.numpy().astype(np.float64),
                           night.bundle.raw_logits(night.val_rows.cat, night.val_rows.num))
        reference = json.loads(night.parent.tags.get(Tag.METRICS, "{}")).get("candidate", {}).get("auc")
    return DriftSignal(severe_drift(rt.lake, night.day), champion_auc, reference, s.challengers.auc_drop)


def train_warm(rt: Runtime, night: Night, start: ModelBundle) -> Candidate:
    s, label = rt.settings, rt.spec.label.name
    if s.cluster.submits_job:
        return train_warm_as_job(rt, night, start)
    t0 = time.monotonic()
    result = fit_increment(start, night.fit_rows, label, rt.spec.event_time, s, replay=night.replay_df,
                           replay_weight=night.replay_w, device=night.device, valid=night.valid,
                           checkpointer=Checkpointer(night.ckpt_dir, s.training.checkpoint_every_steps, mlflow_logger()))
    return Candidate(WARM, start, result, time.monotonic() - t0, replay_window(night))


def staging_location(rt: Runtime, night: Night) -> str:
    s = rt.settings
    root = s.cluster.staging_uri or str(s.home_abs / "staging")
    return f"{root.rstrip('/')}/{rt.model_name}/{night.ckpt_dir.name}"


def train_warm_as_job(rt: Runtime, night: Night, start: ModelBundle) -> Candidate:
    """The warm start as a Kubeflow job (`job_kind` pytorchjob/trainjob): the night prepared here is staged where
    the job's pods read it, the job trains it with the same `fit_increment` (elastic, preemptible, queued), and
    its bundle comes back to be judged and logged like a local one. A result already there (a retried task whose
    job had finished) is taken as is."""
    from pipeline.cluster import jobs
    from pipeline.cluster.launch import Launcher
    from pipeline.learn import staging

    s = rt.settings
    t0 = time.monotonic()
    where = staging_location(rt, night)
    with tempfile.TemporaryDirectory() as tmp:
        done = staging.read_result(where, Path(tmp))
        if done is None:
            staging.stage(where, start, night.fit_rows, night.valid, night.replay_df, night.replay_w,
                          {"seed": s.seed, "label": rt.spec.label.name,
                           "training": s.training.model_dump(mode="json")})
            job = jobs.training_job(s, night.day.isoformat(), where)
            mlflow.set_tags({Tag.TRAINING_JOB: f"{job['kind']}/{s.cluster.namespace}/{job['metadata']['name']}"})
            ran = Launcher(job).run(timeout_s=jobs.deadline_seconds(s), poll_s=s.cluster.poll_s)
            log.info("%s %s finished in %.0f s (%s)", ran.kind, ran.name, ran.seconds, " -> ".join(ran.conditions))
            done = staging.read_result(where, Path(tmp))
            if done is None:
                raise TrainingFailed(f"{ran.kind} {ran.name} succeeded but left no result under {where}/output")
        bundle, result = done
    return Candidate(WARM, bundle, result, time.monotonic() - t0, replay_window(night))


def train_shrink(rt: Runtime, night: Night, start: ModelBundle) -> Candidate:
    s, label = rt.settings, rt.spec.label.name
    t0 = time.monotonic()
    bundle = policies.shrink_perturb(start, s.challengers.shrink_factor, s.challengers.perturb_scale, s.seed)
    result = fit_increment(bundle, night.fit_rows, label, rt.spec.event_time, policies.shrink_settings(s),
                           replay=night.replay_df, replay_weight=night.replay_w, device=night.device,
                           valid=night.valid, checkpointer=Checkpointer(
                               night.ckpt_dir / SHRINK, s.training.checkpoint_every_steps, mlflow_logger(f"checkpoints/{SHRINK}")))
    return Candidate(SHRINK, bundle, result, time.monotonic() - t0, replay_window(night))


def train_fresh(rt: Runtime, night: Night, start: ModelBundle) -> Candidate:
    """From scratch on the recent window: the day's training rows (minus the validation slice) and the
    validated days before it, newest first up to `drift_window_max_rows`."""
    s, spec = rt.settings, rt.spec
    t0 = time.monotonic()
    columns = [*spec.feature_names, spec.event_time, spec.label.name]
    parts = [night.reader.rows(columns, night.fit_pos, night.total)]
    first = night.day
    earlier = [d for d in rt.lake.partition_days(VALIDATED)
               if night.day - timedelta(days=s.challengers.window_days - 1) <= d < night.day]
    for d in reversed(earlier):
        if sum(len(p) for p in parts) >= s.challengers.window_max_rows:
            break
        past = DayReader(rt.lake, d, rt.lake.read_manifest(VALIDATED, d) or {"files": []})
        if set(columns) <= set(past.names):  # a day from before a spec change cannot train this spec
            parts.append(past.in_time_order(columns, spec.event_time).to_pandas())
            first = d
    rows = pd.concat(parts, ignore_index=True).iloc[:s.challengers.window_max_rows]
    valid = night.reader.rows(columns, night.val_pos, night.total) if len(night.val_pos) else None
    checkpointer = Checkpointer(night.ckpt_dir / FRESH, s.training.checkpoint_every_steps, mlflow_logger(f"checkpoints/{FRESH}"))
    bundle, result = policies.fit_fresh(spec, rows, valid, s, device=night.device, checkpointer=checkpointer,
                                        known=start)
    return Candidate(FRESH, bundle, result, time.monotonic() - t0, f"{first.isoformat()}/{night.day.isoformat()}")


def refit_rows(rt: Runtime, night: Night) -> pd.DataFrame | None:
    """Every labeled row the stream has shown, tonight's holdout left out, when all of them are known and at
    most `refit_max_rows`: the replay reservoir while it has never dropped a row (it holds the history and every
    day a night trained on), the carried days it lacks, and tonight's training rows. None otherwise: once the
    reservoir samples, a refit would learn from a sample where the warm start learned from everything."""
    s, spec = rt.settings, rt.spec
    past, limit = night.past, s.training.refit_max_rows
    columns = [*spec.feature_names, spec.event_time, spec.label.name]
    if not limit or not len(past.rows) or len(past.rows) < sum(past.seen.values()) \
            or not set(columns) <= set(past.rows.columns):
        return None
    kept = set(past.rows[replay.ORIGIN].astype(str))
    missing = [c for c in night.carried if c.day.isoformat() not in kept]
    if len(past.rows) + len(night.train_pos) + carried_rows(missing) > limit:
        return None
    parts = [past.rows[columns], *(c.reader.rows(columns, c.positions, c.total) for c in missing),
             night.reader.rows(columns, night.train_pos, night.total)]
    return pd.concat([p for p in parts if len(p)], ignore_index=True)


def train_refit(rt: Runtime, night: Night, start: ModelBundle) -> Candidate:
    t0 = time.monotonic()
    mlflow.log_param("refit_rows", len(night.refit_rows))
    bundle, result = policies.fit_refit(rt.spec, night.refit_rows, rt.settings, device=night.device, known=start)
    return Candidate(REFIT, bundle, result, time.monotonic() - t0, replay_window(night))


TRAINERS: dict[str, Callable[[Runtime, Night, ModelBundle], Candidate]] = {
    WARM: train_warm, SHRINK: train_shrink, FRESH: train_fresh, REFIT: train_refit}


def replay_window(night: Night) -> str:
    oldest = str(night.past.rows[replay.ORIGIN].min()) if len(night.replay_df) else night.day.isoformat()
    return f"{oldest}/{night.day.isoformat()}"  # replay reaches back this far


def train_candidates(rt: Runtime, night: Night) -> Outcome:
    """The warm start; the refit while the whole past is small (`refit_rows`); on a drift night the challengers
    (within `challengers.budget_s`), each from the same parent. With more than one, each is judged by the
    gate's rules on the held-out slice and `choose` picks."""
    s = rt.settings
    signal = drift_signal(rt, night)
    challengers = [p for p in dict.fromkeys(s.challengers.policies) if p != WARM] if signal.triggered else []
    skipped = []
    if s.cluster.submits_job:  # only the warm start is staged: the worker is no place to train
        if challengers:
            log.warning("drift night %s: the %s job trains the warm start only; challengers %s skipped",
                        night.day, s.cluster.job_kind, challengers)
        skipped, challengers = challengers, []
    else:
        night.refit_rows = refit_rows(rt, night)
        if signal.triggered:
            log.warning("drift night %s: training %s (%s)", night.day, challengers, "; ".join(signal.reasons))
    names = [WARM, *([REFIT] if night.refit_rows is not None else []), *challengers]
    begin = time.monotonic()
    candidates: list[Candidate] = []
    for name in names:
        if candidates and s.challengers.budget_s and time.monotonic() - begin > s.challengers.budget_s:
            skipped.append(name)
            continue
        start = night.bundle if len(names) == 1 else copy.deepcopy(night.bundle)
        candidates.append(TRAINERS[name](rt, night, start))
    if len(candidates) == 1 or len(night.holdout_pos) == 0:
        return Outcome(candidates[0], candidates, signal, skipped)
    champion = registry.load_version(rt.client(), rt.model_name, night.parent.version, rt.cache_dir).for_spec(rt.spec)
    columns = [*rt.spec.feature_names, rt.spec.event_time, rt.spec.label.name]
    holdout = night.reader.rows(columns, night.holdout_pos, night.total)
    for c in candidates:
        c.judgement = judge(s, rt.spec, holdout, c.bundle, champion,
                            f"champion v{night.parent.version} on {night.day}'s holdout", policy=c.policy)
    winner = choose(candidates, holdout[rt.spec.label.name].to_numpy(dtype=np.float64), s)
    log.info("night %s: %s chosen of %s", night.day, winner.policy, [c.policy for c in candidates],
             extra={"candidates": {c.policy: c.judgement.primary for c in candidates}})
    return Outcome(winner, candidates, signal, skipped)


def _vs(c: Candidate, base: Candidate, y: np.ndarray, s) -> Interval | None:
    """`c`'s holdout AUC minus `base`'s with its paired CI (kept on `c` for the run's policies.json)."""
    c.vs_base = paired_auc_diff(y, c.judgement.pc, base.judgement.pc, s.gate.bootstrap_samples,
                                s.gate.confidence, s.seed)
    return c.vs_base


def base_of(candidates: list[Candidate], y: np.ndarray, s) -> Candidate:
    """What tonight serves unless a drift challenger beats it: the refit when there is one and it passes the
    gate, unless the warm start (`candidates[0]`) is confidently better (the paired CI of the warm start's AUC
    minus the refit's lies above 0); else the warm start.

    The refit is preferred at a noise-level difference because it is the recipe the warm start approximates:
    the first model's training on every row so far. On a small stream a warm start's few steps a night leave the
    model where the first fit put it (bench/results/backtest.md, round 8), and a holdout of a few dozen rows can
    rarely prove a gap of 0.03 AUC either way."""
    warm = candidates[0]
    refit = next((c for c in candidates if c.policy == REFIT), None)
    if refit is None or not refit.judgement.passed:
        return warm
    if warm.judgement.passed:
        warm_vs = _vs(warm, refit, y, s)
        if warm_vs is not None and warm_vs.low > 0:
            return warm
    return refit


def choose(candidates: list[Candidate], y: np.ndarray, s) -> Candidate:
    """The base (`base_of`: the warm start, or the refit) unless a drift challenger passes the gate and is
    confidently better on the holdout (the paired CI of its AUC minus the base's lies above 0); then the best
    such one. When the base fails, it is still what a challenger must beat: a failing base is held, and the next
    night catches up on the day (`unlearned_before`).

    Picking the best point estimate among several candidates on a holdout of a few hundred rows picks whichever
    fitted that day's noise best (the winner's curse). A shrink-and-perturb challenger, trained with a cold
    optimizer and a larger step on one small day, won that way in a replay (AUC 0.898 against the warm start's
    0.882 on 92 held-out rows, CI of the difference [-0.15, +0.15]); served the next period it scored 0.789 where
    the model it replaced scored 0.858, until the online evaluation rolled it back (bench/results/backtest.md,
    round 7). A challenger has to earn its place, as a candidate earns the champion's."""
    base = base_of(candidates, y, s)
    better = [c for c in candidates if c.policy not in (WARM, REFIT) and c.judgement.passed
              and (vs := _vs(c, base, y, s)) is not None and vs.low > 0]
    return max(better, key=lambda c: c.judgement.primary) if better else base


def log_setup(rt: Runtime, night: Night) -> None:
    s, spec = rt.settings, rt.spec
    policy = replay.ReplayPolicy.from_settings(s)
    mlflow.set_tags({Tag.KIND: "nightly", Tag.MODEL: rt.model_name, Tag.DAY: night.day.isoformat(),
                     Tag.PARENT: night.parent.version, Tag.DATA_DIGEST: night.digest})
    if night.migration is not None:
        mlflow.set_tag(Tag.MIGRATION, night.migration)
    mlflow.log_params({"epochs": s.training.epochs, "batch_size": s.training.batch_size, "lr": s.training.learning_rate,
                       "seed": s.seed, "parent_version": night.parent.version, "train_rows": len(night.train_pos),
                       "holdout_rows": len(night.holdout_pos), "new_vocab": json.dumps(night.added),
                       "device": night.device.type, "spec_digest": spec.digest, "replay_rows": len(night.replay_df),
                       "replay_as_of": str(night.past.as_of), "replay_capacity": policy.capacity,
                       "replay_half_life_days": policy.half_life_days, "anchor_l2": s.training.anchor_l2,
                       "early_stopping_patience": s.training.early_stopping_patience,
                       "validation_fraction": s.training.validation_fraction, "migration": night.migration or "none",
                       "vocab_expiry_days": s.training.vocab_expiry_days, "expired_vocab": json.dumps(night.expired),
                       "calibration": s.training.calibration, "carried_rows": carried_rows(night.carried),
                       "carried_from": str(carried_days(night.carried)),
                       "catch_up_days": s.training.catch_up_days})
    log_inputs(rt, night.day, night.manifest, night.past, night.replay_df)


def log_outcome(rt: Runtime, night: Night, outcome: Outcome, tmp: Path) -> None:
    """The chosen model and its curves, every candidate's gate evidence on a drift night, the lineage."""
    s, spec = rt.settings, rt.spec
    best, result, bundle = outcome.winner, outcome.winner.result, outcome.winner.bundle
    mlflow.set_tags({Tag.POLICY: best.policy, Tag.WINDOW: best.window,
                     Tag.DRIFT_TRIGGER: "; ".join(outcome.signal.reasons)[:4900] or "none"})
    mlflow.log_params({"candidates": ",".join(c.policy for c in outcome.candidates),
                       "candidates_skipped": ",".join(outcome.skipped) or "none"})
    for i, loss in enumerate(result.losses):
        mlflow.log_metric("train_loss", loss, step=i)
    for i, loss in enumerate(result.val_losses):
        mlflow.log_metric("val_loss", loss, step=i)
    cal = result.calibration
    mlflow.log_metrics({"epochs_run": result.epochs, "resumed_at_step": result.resumed_at_step,
                        "optimizer_restored": float(result.optimizer_restored),
                        "lr_chosen": result.lr or s.training.learning_rate, "calibration_scale": cal.scale,
                        "calibration_shift": cal.shift, "calibration_rows": cal.rows})
    signal = outcome.signal
    if signal.champion_auc is not None:
        mlflow.log_metric("champion_val_auc", signal.champion_auc)
    if len(outcome.candidates) > 1:
        for c in outcome.candidates:
            j = c.judgement
            mlflow.log_metrics({f"policy_{c.policy}_seconds": c.seconds,
                                **({f"policy_{c.policy}_passed": float(j.passed),
                                    f"policy_{c.policy}_holdout_primary": j.primary} if j is not None else {})})
        mlflow.log_dict({"winner": best.policy, "trigger": signal.reasons, "skipped": outcome.skipped,
                         "candidates": [c.summary() for c in outcome.candidates]}, "policies.json")
    mlflow.log_dict({c: v.size for c, v in bundle.vocabs.items()}, "vocab_sizes.json")
    mlflow.log_dict({c: v.to_dict() for c, v in bundle.vocabs.items()}, "vocab/vocabularies.json")
    mlflow.log_dict(night.manifest, "data/validated_manifest.json")
    reports = s.reports_dir / "validation" / f"dt={night.day.isoformat()}"
    if reports.is_dir():
        mlflow.log_artifacts(str(reports), "validation")
    example = next(night.reader.frames(spec.feature_names, mask_of(night.train_pos, night.total)))[spec.feature_names].head(2)
    registry.log_bundle(bundle, spec, tmp, example)
    mlflow.set_tag(Tag.WEIGHTS, bundle.weights_digest())
