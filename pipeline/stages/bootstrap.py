"""Bootstrap: train and register the first champion from a user's historical Parquet file.

This is how a team adopts Flywheel: columns as the spec declares them (features, event time, label); after
this, live traffic only arrives through the HTTP API.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from feature_store.spec import FeatureSpec, FeatureType
from feature_store.vocab import canonical
from pipeline import registry
from pipeline.checks.metrics import scores_valid, summary
from pipeline.errors import StageError
from pipeline.learn import replay
from pipeline.learn.holdout import split_by_time
from pipeline.learn.model import ModelBundle
from pipeline.learn.trainer import fit_first, pick_device
from pipeline.runtime import Runtime, runtime
from pipeline.stages.train import experiment
from pipeline.tags import Alias, Tag

log = logging.getLogger("flywheel.bootstrap")


class BootstrapResult(BaseModel):
    version: str
    rows: int
    rejected: int
    first_day: str
    last_day: str
    holdout: dict[str, float | None]
    reused: bool


def to_utc(values: pd.Series) -> pd.Series:
    """Event times as UTC timestamps; naive times are taken as UTC, numbers as epoch s/ms/us/ns by magnitude."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        magnitude = values.abs().median() if len(values) else 0
        unit = "s" if magnitude < 1e11 else "ms" if magnitude < 1e14 else "us" if magnitude < 1e17 else "ns"
        return pd.to_datetime(values, unit=unit, utc=True, errors="coerce")
    return pd.to_datetime(values, utc=True, errors="coerce", format="mixed")


def read_history(path: Path, spec: FeatureSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Coerce the file to the spec's types; rows that cannot be used are returned apart, with the reason."""
    if not path.exists():
        raise StageError(f"history file {path} not found")
    try:
        table = pq.read_table(path)
    except pa.ArrowInvalid as e:
        raise StageError(f"{path} is not a readable Parquet file: {e}") from e
    need = [*spec.feature_names, spec.event_time, spec.label.name]
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise StageError(f"{path} lacks columns the feature spec declares: {', '.join(missing)} "
                         f"(has: {', '.join(table.column_names)})")
    df = table.select(need).to_pandas()
    out = pd.DataFrame(index=df.index)
    for name, f in spec.features.items():
        if f.type is FeatureType.NUMERIC:
            out[name] = pd.to_numeric(df[name], errors="coerce").astype("float64")
        else:
            out[name] = canonical(df[name]).astype(object).where(df[name].notna(), None)
    out[spec.event_time] = to_utc(df[spec.event_time])
    out[spec.label.name] = pd.to_numeric(df[spec.label.name], errors="coerce").astype("float64")
    reasons = pd.Series("", index=df.index)
    reasons[out[spec.event_time].isna()] += "event time missing or unparsable; "
    reasons[~out[spec.label.name].isin([0.0, 1.0])] += "label not 0/1; "
    for name, f in spec.features.items():
        if not f.nullable:
            reasons[out[name].isna()] += f"{name} missing or wrong type; "
    bad = reasons != ""
    rejected = df[bad].astype("string").assign(reason=reasons[bad])
    return out[~bad].reset_index(drop=True), rejected


def bootstrap(history: str | Path, rt: Runtime | None = None) -> BootstrapResult:
    rt = rt or runtime()
    s, spec = rt.settings, rt.spec
    frame, rejected = read_history(Path(history), spec)
    if len(frame) < s.min_rows:
        raise StageError(f"history has {len(frame)} usable rows ({len(rejected)} rejected), fewer than "
                         f"min_rows={s.min_rows}")
    et = spec.event_time
    first, last = frame[et].min().date(), frame[et].max().date()
    if len(rejected):
        rt.lake.write_partition("quarantine_bootstrap", last, pa.Table.from_pandas(rejected, preserve_index=False))
    train_df, holdout = split_by_time(frame, et, s.holdout_fraction)
    bundle = ModelBundle.create(spec, train_df, s.embedding_dim, s.hidden_units, s.vocab_min_count, s.seed,
                                numeric_clip=s.numeric_clip)
    epochs = max(s.bootstrap_epochs, math.ceil(s.bootstrap_min_steps / math.ceil(len(train_df) / s.batch_size)))
    result = fit_first(bundle, train_df, spec.label.name, et, s, epochs=epochs, device=pick_device())
    replay.seed(rt.lake, frame, et, [*spec.feature_names, et, spec.label.name], spec.label.name,
                replay.ReplayPolicy.from_settings(s))
    p = bundle.predict(holdout)
    metrics = summary(holdout[spec.label.name].to_numpy(dtype=np.float64), p)
    if not scores_valid(p):
        raise StageError("bootstrap model produced NaN or out-of-range scores; check the history's features")
    client = rt.client()
    weights = bundle.weights_digest()
    existing = registry.find_version(client, rt.model_name, Tag.WEIGHTS, weights)
    if existing is None:
        experiment(rt)
        with mlflow.start_run(run_name=f"bootstrap-{first}-{last}") as run, tempfile.TemporaryDirectory() as tmp:
            mlflow.set_tags({Tag.KIND: "bootstrap", Tag.DAY: last.isoformat(),
                             Tag.WEIGHTS: weights})
            mlflow.log_params({"history": str(history), "rows": len(frame), "rejected": len(rejected),
                               "epochs": epochs, "seed": s.seed, "spec_digest": spec.digest})
            for i, loss in enumerate(result.losses):
                mlflow.log_metric("train_loss", loss, step=i)
            mlflow.log_metrics({f"holdout_{k}": v for k, v in metrics.items() if v is not None})
            registry.log_bundle(bundle, spec, Path(tmp), train_df[spec.feature_names].head(2))
        existing = registry.register(client, rt.model_name, run.info.run_id, {
            Tag.DAY: last.isoformat(), Tag.WINDOW: f"{first}/{last}",
            Tag.WEIGHTS: weights, Tag.GATE_PASSED: "true",
            Tag.GATE_REASON: "bootstrap", Tag.METRICS: json.dumps({"candidate": metrics}),
        })
        reused = False
    else:
        reused = True
    if registry.get_alias(client, rt.model_name, Alias.CHAMPION) is None:
        registry.move_champion(client, rt.model_name, existing.version, expected=None, owner="bootstrap",
                               stale_s=s.alias_lock_stale_s)
    return BootstrapResult(version=existing.version, rows=len(frame), rejected=len(rejected),
                           first_day=first.isoformat(), last_day=last.isoformat(), holdout=metrics, reused=reused)
