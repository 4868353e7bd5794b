"""The one settings object: every path, URI and threshold lives here, overridable by `FLYWHEEL_*` env vars.

Shared identity and locations (home, spec, lake, model name, service URLs, backends, seed) are top-level fields;
everything else lives in a typed section named after what reads it (`s.gate.min_auc`, `s.serving.port`), so a
reader sees which knobs belong together and a sub-config (`GateConfig`, `ReplayPolicy`) is built from one section
by keyword. Env names: `FLYWHEEL_<FIELD>` for top-level fields, `FLYWHEEL_<SECTION>__<FIELD>` for section
fields. The flat names of the time before sections (`FLYWHEEL_MIN_AUC`, `Settings(min_auc=...)`,
`model_copy(update={"min_auc": ...})`) keep working through one table, `LEGACY`; setting one knob under both
env spellings to different values is an error rather than a silent pick.

Built by a cached function rather than at import, so tests and the CLI can point a fresh process at another
home directory just by setting the environment before the first call.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, SettingsError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = REPO / "feature_store" / "specs" / "ctr.yaml"
PREFIX = "FLYWHEEL_"
_URI_CREDENTIALS = re.compile(r"(://[^:/@\s]+:)[^@\s]+@")
DELIMITER = "__"


class Section(BaseModel):
    """A group of settings read by one part of the system. Unknown keys are refused, so a misspelt
    `FLYWHEEL_GATE__MIN_AUCC` fails at start instead of leaving the default in force."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    legacy_prefix: ClassVar[str] = ""
    legacy_names: ClassVar[dict[str, str]] = {}

    @classmethod
    def legacy_name(cls, field: str) -> str:
        """The flat `Settings` field this one was before sections (its `FLYWHEEL_*` name, lower-cased)."""
        return cls.legacy_names.get(field, cls.legacy_prefix + field)


class ServingSettings(Section):
    """The model server: where it listens, who may call it, and the limits that protect it."""

    legacy_names: ClassVar[dict[str, str]] = {"host": "serving_host", "port": "serving_port", "url": "serving_url",
                                              "workers": "serving_workers"}
    host: str = "127.0.0.1"
    port: int = 8000
    url: str | None = Field(default=None, description="Where promote/rollout reaches the model server.")
    admin_token: str | None = Field(default=None, description="Bearer token for the server's admin routes.")
    api_tokens: list[str] = Field(default_factory=list, description="Bearer tokens for predict/feedback; empty=open.")
    workers: int = Field(default=1, ge=1, description="Server processes sharing the port and spool dir.")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="Larger request bodies get 413.")
    max_concurrency: int = Field(default=512, ge=1, description="Requests being processed per worker; beyond: "
                                 "503 with Retry-After. Open but silent connections do not count.")
    header_timeout_s: float = Field(default=10.0, gt=0, description="A connection whose request headers are not "
                                    "complete this long after it opened (or after its request began) is closed.")
    keep_alive_timeout_s: int = Field(default=5, ge=1, description="Idle keep-alive connections are closed after.")
    body_timeout_s: float = Field(default=30.0, gt=0, description="A request body not received within this: 408.")
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After of every 503 the server answers.")
    max_request_id_chars: int = Field(default=128, ge=8, description="Longer client request ids get 422.")
    max_string_chars: int = Field(default=1024, ge=1, description="Longer categorical feature values get 422.")
    event_time_past_days: float = Field(default=18262, gt=0, description="Event and label times older than "
                                        "server time minus this get 422 (default 50 years: history replays pass).")
    event_time_future_days: float = Field(default=366, gt=0, description="Event and label times later than "
                                          "server time plus this get 422.")
    recent_request_ids: int = Field(default=100_000, ge=0, description="Client request ids each worker remembers "
                                    "to refuse (409) one reused with different rows; 0 = off.")
    max_batch_rows: int = Field(default=1024, ge=1, description="Rows per coalesced forward pass.")
    max_rows_per_request: int = Field(default=4096, ge=1)
    canary_share: float = Field(default=0.0, ge=0, le=1, description="Share of entities routed to `challenger`.")
    alias_poll_interval_s: float = Field(default=2.0, gt=0, description="How often the server checks the aliases.")


class PredictionLogSettings(Section):
    """The server's log of answered rows (the spool sealed to Parquet): the data the next night learns from."""

    legacy_prefix: ClassVar[str] = "log_"
    legacy_names: ClassVar[dict[str, str]] = {"enabled": "log_predictions"}
    enabled: bool = Field(default=True, description="Off only for benchmarks: unlogged rows are lost data.")
    durability: Literal["group", "interval"] = Field(
        default="group", description="group: each answer waits for the fsync covering its rows (shared by "
        "concurrent requests), so a SIGKILL loses nothing answered; interval: answer first, fsync every "
        "flush_interval_ms (lower latency, a SIGKILL loses up to one interval).")
    flush_interval_ms: int = Field(default=200, ge=10, description="Background spool flush interval (the most "
                                   "a SIGKILL loses in interval durability).")
    commit_delay_ms: float = Field(default=0.5, ge=0, description="Group commit: when the last commit carried "
                                   "several requests' rows, wait this long for more before the next one (fewer "
                                   "fsyncs under load, like PostgreSQL's commit_delay); 0 = commit at once.")
    seal_interval_s: float = Field(default=10.0, gt=0, description="How often the spool is sealed to Parquet.")


class CollectSettings(Section):
    """The nightly collect: joining logged predictions with their labels."""

    legacy_prefix: ClassVar[str] = "collect_"
    legacy_names: ClassVar[dict[str, str]] = {"label_lateness_s": "label_lateness_s"}
    label_lateness_s: int = Field(default=900, ge=0, description="Extra wait for late feedback after the window.")
    lateness_s: float = Field(default=2 * 86400, ge=0, description="Segments sealed this long after a day's first "
                              "collect still join it on a re-run; later ones are listed as too late.")
    batch_rows: int = Field(default=262_144, ge=1024, description="Rows per record batch when collecting.")
    flushes_server: bool = Field(default=True, description="collect asks the server to seal its spools first.")


class ValidationSettings(Section):
    """The validation gate: a day that fails it is not trained on."""

    legacy_names: ClassVar[dict[str, str]] = {"suite_path": "validation_suite_path",
                                              "chunk_rows": "validate_chunk_rows"}
    min_rows: int = Field(default=200, ge=1, description="A night trains on at least this many labeled rows: a "
                          "smaller day is validated (its row-count and label-rate rules reported, not gated) and "
                          "pooled with the next days until they add up to this many.")
    max_bad_fraction: float = Field(default=0.05, ge=0, le=1, description="Quarantined share allowed.")
    label_rate_min: float = Field(default=0.0005, ge=0, le=1)
    label_rate_max: float = Field(default=0.9995, ge=0, le=1)
    unseen_category_share: float = Field(
        default=0.5, ge=0, le=1, description="Allowed share of rows with a category value that neither the "
        "champion's vocabulary nor the recent collected days had (entity attributes: on rows of known entities "
        "only; entity keys are exempt).")
    unseen_reference_days: int = Field(default=7, ge=0, description="Unseen categories: past collected days "
                                       "(whatever their gate outcome) whose values count as seen.")
    unseen_min_rows: int = Field(default=100, ge=1, description="Unseen categories: a share over fewer rows "
                                 "than this is reported, not gated.")
    suite_path: Path | None = Field(
        default=None, description="User expectations (great-expectations suite JSON) added to the spec-derived "
        "suite; default: `<spec stem>.expectations.json` next to the spec, when present.")
    chunk_rows: int = Field(default=262_144, ge=1024, description="Rows per validated record batch.")


class DriftSettings(Section):
    """Drift detection in validation: PSI of each feature against the recent validated days."""

    legacy_prefix: ClassVar[str] = "drift_"
    reference_days: int = Field(default=7, ge=1, description="Past validated days in the reference.")
    bins: int = Field(default=10, ge=2, description="Quantile bins per numeric feature for PSI.")
    psi_warn: float = Field(default=0.1, ge=0, description="PSI above this is reported as moderate.")
    psi_severe: float = Field(default=0.25, ge=0, description="PSI above this is severe.")
    min_rows: int = Field(default=200, ge=1, description="A day (or a reference) of fewer rows is measured, not "
                          "judged: its PSI is reported with severity none.")
    action: Literal["warn", "block"] = Field(default="warn", description="Severe drift: warn, or fail the day.")


class TrainingSettings(Section):
    """The model and its nightly training (the first model, `bootstrap`, included)."""

    holdout_fraction: float = Field(default=0.2, gt=0, lt=1, description="Time-latest share of a day held out.")
    epochs: int = Field(default=4, ge=1)
    bootstrap_epochs: int = Field(default=3, ge=1, description="Epochs of the first model (flywheel bootstrap).")
    bootstrap_min_steps: int = Field(default=300, ge=0, description="First model: small histories get more "
                                     "epochs.")
    carry_held_out: bool = Field(default=True, description="Each night also trains on the rows of earlier "
                                 "validated days its parent never trained on: the previous day's validation slice "
                                 "and holdout, and the days of nights the gate held.")
    catch_up_days: int = Field(default=3, ge=0, description="At most this many earlier days are carried (the "
                               "newest), which bounds a night's cost after held nights; 0 carries nothing.")
    bootstrap_refit: bool = Field(default=True, description="After the holdout has measured the first model, "
                                  "train the champion again on the whole history (holdout included).")
    refit_max_rows: int = Field(default=50_000, ge=0, description="While every labeled row so far (the replay "
                                "reservoir has never dropped one) plus tonight's is at most this many, each night "
                                "also refits the first model's recipe on all of them (`refit`) and serves it unless "
                                "the warm start is confidently better; 0 = off.")
    batch_size: int = Field(default=512, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    embedding_dim: int = Field(default=8, ge=1)
    numeric_clip: float = Field(default=5.0, gt=0, description="Standardised numerics are clipped to +-this.")
    hidden_units: tuple[int, ...] = (64, 32)
    vocab_min_count: int = Field(default=2, ge=1, description="Sightings before a new category gets its own id.")
    vocab_expiry_days: int = Field(default=0, ge=0, description="Categories unseen this many days map to OOV; 0=off.")
    anchor_l2: float = Field(default=0.0, ge=0, description="L2 pull toward the parent's weights; 0 = off.")
    validation_fraction: float = Field(default=0.1, ge=0, lt=1, description="Time-latest train share for stopping.")
    early_stopping_patience: int = Field(
        default=4, ge=0, description="Epochs without validation gain before stopping; 0 = no validation. At or "
        "above `epochs` (the default) every night runs a fixed budget and keeps its best epoch: nightly cost "
        "stays flat instead of following the day's difficulty (bench/results/incremental.md).")
    checkpoint_every_steps: int = Field(default=200, ge=0, description="Training checkpoint interval; 0 = off.")
    checkpoint_uri: str | None = Field(default=None, description="Where training checkpoints live, e.g. "
                                       "s3://bucket/flywheel/checkpoints (production: not the pod's disk); "
                                       "default home/checkpoints.")
    lr_candidates: tuple[float, ...] = Field(default=(), description="Nightly learning rates tried on the "
                                             "validation slice, best kept; empty = learning_rate only.")
    calibration: Literal["platt", "temperature", "none"] = Field(
        default="platt", description="Post-hoc calibration fitted on the validation slice after every training.")
    calibration_min_rows: int = Field(default=50, ge=2, description="Smaller slices keep the parent's map (a "
                                      "fresh model: the identity).")
    calibration_prior_rows: float = Field(default=200.0, ge=0, description="How many rows a warm start's parent "
                                          "map weighs against the night's validation slice when the child's map "
                                          "is fitted; 0 = the slice alone.")


class ChallengersSettings(Section):
    """Drift-reactive challengers: extra candidates trained on a drift night beside the warm start."""

    legacy_prefix: ClassVar[str] = "drift_"
    legacy_names: ClassVar[dict[str, str]] = {"policies": "drift_challengers", "shrink_factor": "shrink_factor",
                                              "perturb_scale": "perturb_scale"}
    policies: tuple[Literal["shrink", "fresh"], ...] = Field(
        default=("shrink", "fresh"), description="Extra candidates trained on a drift night beside the warm "
        "start (shrink-and-perturb, a fresh model on the recent window); the gate picks on the holdout. ()=off.")
    auc_drop: float = Field(default=0.05, ge=0, description="A drift night also when the champion's AUC on "
                            "the day's validation slice is this far below its holdout AUC; 0 = off.")
    auc_min_rows: int = Field(default=200, ge=2, description="Smaller validation slices do not judge the "
                              "champion's AUC (too noisy to call a drop).")
    window_days: int = Field(default=3, ge=1, description="Days (today included) the fresh model learns from.")
    window_max_rows: int = Field(default=500_000, ge=1, description="Cap on the fresh model's rows (newest kept).")
    shrink_factor: float = Field(default=0.5, gt=0, le=1, description="Shrink-and-perturb: weight kept.")
    perturb_scale: float = Field(default=0.1, ge=0, description="Shrink-and-perturb: share of a fresh init added.")
    lr_factor: float = Field(default=3.0, gt=0, description="Shrink policy: learning rate multiple, cold Adam.")
    budget_s: float = Field(default=0.0, ge=0, description="Extra challengers start only while the night's "
                            "training has taken less than this many seconds; 0 = no limit.")


class ReplaySettings(Section):
    """The replay reservoir; its fields are `pipeline.learn.replay.ReplayPolicy`'s (plus the top-level seed)."""

    legacy_prefix: ClassVar[str] = "replay_"
    legacy_names: ClassVar[dict[str, str]] = {"capacity": "replay_rows"}
    capacity: int = Field(default=20000, ge=0, description="Past labeled rows kept in the lake; 0 = off.")
    ratio: float = Field(default=0.25, ge=0, description="Replayed rows per new training row each night.")
    half_life_days: float = Field(default=3.0, ge=0, description="Reservoir recency bias; 0 = uniform.")
    min_class_share: float = Field(default=0.1, ge=0, le=0.5, description="Floor per label in the reservoir.")


class ClusterSettings(Section):
    """Where the nightly training runs when not in the worker: pod size, Kubeflow job, Kueue, retries."""

    legacy_prefix: ClassVar[str] = "training_"
    legacy_names: ClassVar[dict[str, str]] = {"kueue_queue": "kueue_queue", "gpu_pool": "gpu_pool",
                                              "gpu_pool_slots": "gpu_pool_slots"}
    runner: Literal["local", "kubernetes"] = Field(
        default="local", description="Where the nightly train task runs: in the worker, or as a training pod.")
    image: str = "ghcr.io/flywheel-mlops/flywheel:0.1.0-cuda"
    namespace: str = "flywheel"
    priority_class: str = "flywheel-training"
    cpus: int = Field(default=4, ge=1)
    memory: str = "16Gi"
    gpus: int = Field(default=1, ge=0)
    job_kind: Literal["pod", "pytorchjob", "trainjob"] = Field(
        default="pod", description="What the kubernetes runner submits: a single pod, a Kubeflow PyTorchJob "
        "(elastic, torchrun) or a Kubeflow Trainer TrainJob.")
    staging_uri: str | None = Field(default=None, description="Where a pytorchjob/trainjob night is staged for "
                                    "the job's pods and its result comes back: object storage (s3://...) or a "
                                    "volume every pod mounts at the same path; none = HOME/staging (one machine).")
    poll_s: float = Field(default=30.0, gt=0, description="How often the train stage looks at a submitted job.")
    min_nodes: int = Field(default=1, ge=1, description="Elastic job: fewest workers it runs with.")
    max_nodes: int = Field(default=2, ge=1, description="Elastic job: most workers it grows to.")
    max_restarts: int = Field(default=100, ge=0, description="torchrun --max-restarts: membership changes "
                              "(preemptions, joins) one launch survives.")
    kueue_queue: str | None = Field(default=None, description="Kueue LocalQueue the training job is submitted to "
                                    "(it waits for quota instead of failing); none = submit directly.")
    deadline_h: float = Field(default=8.0, gt=0, description="Hours after the data day ends by which its "
                              "training must be done: preemptions are retried until then.")
    retry_delay_s: int = Field(default=60, ge=1, description="Wait before retrying a preempted training.")
    gpu_pool: str = Field(default="gpu", description="Airflow pool bounding concurrent GPU training jobs.")
    gpu_pool_slots: int = Field(default=1, ge=1, description="Slots of `gpu_pool`: nights that train at once.")

    @property
    def submits_job(self) -> bool:
        """The train stage stages the night and submits a Kubeflow job (else it trains where it runs)."""
        return self.runner == "kubernetes" and self.job_kind != "pod"


class GateSettings(Section):
    """The promotion gate; its fields are `pipeline.checks.gate.GateConfig`'s (plus the top-level seed)."""

    legacy_names: ClassVar[dict[str, str]] = {"confidence": "bootstrap_confidence",
                                              "on_inconclusive": "gate_on_inconclusive"}
    min_auc: float = Field(default=0.5, ge=0, le=1, description="Absolute AUC floor.")
    max_auc_regression: float = Field(default=0.005, ge=0, description="AUC regression vs the champion allowed.")
    max_logloss_regression: float = Field(default=0.05, ge=0, description="Relative log-loss rise allowed.")
    max_ece: float = Field(default=0.1, ge=0, le=1, description="Absolute ceiling on calibration error.")
    max_slice_auc_regression: float = Field(default=0.02, ge=0, description="AUC regression per slice.")
    min_slice_rows: int = Field(default=100, ge=1, description="Smaller slices are reported, not gated.")
    bootstrap_samples: int = Field(default=400, ge=50, description="Paired bootstrap resamples for the CIs.")
    confidence: float = Field(default=0.95, gt=0.5, lt=1, description="Level of the paired bootstrap CIs.")
    on_inconclusive: Literal["pass", "fail", "estimate"] = Field(
        default="estimate", description="A CI that straddles the margin (noise level): estimate (default) passes "
        "when the point estimate does not favour the champion; pass always; fail demands proof.")
    refit_on_inconclusive: Literal["pass", "fail", "estimate"] = Field(
        default="pass", description="The same for a `refit` candidate (the first model's recipe on every row so "
        "far, strictly more than its champion learned from): pass (default) blocks it only on a confident "
        "regression; a few dozen held-out rows cannot tell it from its champion.")
    ece_bins: int = Field(default=10, ge=2, description="Equal-width score bins for ECE and the reliability plot.")
    max_ece_regression: float = Field(default=0.01, ge=0, description="ECE rise over the champion allowed (judged "
                                      "by its paired bootstrap CI) before calibration counts against a candidate.")
    ece_min_rows: int = Field(default=300, ge=1, description="Fewer held-out rows than this and ECE is reported, "
                              "not gated (a 10-bin ECE of a few dozen rows is noise).")
    champion_collapse_auc_drop: float = Field(
        default=0.1, ge=0, le=1, description="A champion whose holdout AUC is this far below the AUC it was "
        "registered with (or below min_auc) is failing; a candidate not worse than it then replaces it, whatever "
        "its calibration, log-loss or slices.")


class PromotionSettings(Section):
    """Moving the champion alias: review mode, the alias lock, the server rollout."""

    legacy_names: ClassVar[dict[str, str]] = {"mode": "promotion_mode"}
    mode: Literal["auto", "review"] = Field(default="auto", description="review: wait for a reviewer.")
    approval_timeout_s: float = Field(default=86400.0, gt=0, description="Review mode: give up after this long.")
    approval_poll_interval_s: float = Field(default=30.0, gt=0, description="Review mode: registry poll period.")
    alias_lock_stale_s: float = Field(default=300.0, gt=0, description="A promotion lock older than this is broken.")
    rollout_timeout_s: float = Field(default=60.0, gt=0, description="How long promote waits for the server to "
                                     "serve the new champion.")


class OnlineEvalSettings(Section):
    """Online evaluation: the champion against the previous one on live labeled traffic."""

    legacy_prefix: ClassVar[str] = "online_"
    window_days: int = Field(default=2, ge=1, description="Collected days looked at.")
    min_rows: int = Field(default=500, ge=1, description="Labeled rows before deciding.")
    min_positives: int = Field(default=20, ge=1, description="Positives before deciding.")
    max_auc_regression: float = Field(default=0.01, ge=0, description="Champion vs previous.")
    max_logloss_regression: float = Field(default=0.05, ge=0, description="Relative log-loss rise.")


class LoopHealthSettings(Section):
    """The nightly's check that the loop still trains and promotes."""

    legacy_prefix: ClassVar[str] = "loop_health_"
    warn_nights: int = Field(default=2, ge=1, description="Nights without training or without a promotion "
                             "before each nightly result warns.")
    fail_nights: int = Field(default=5, ge=1, description="Nights without training or without a promotion "
                             "before the nightly fails its loop-health check and alerts.")
    callback: str = Field(
        default="pipeline.checks.loop_health.log_alert", description="Dotted path of the alert hook called when "
        "loop health fails: an Airflow on_failure_callback-style callable taking a context dict (its "
        "'loop_health' key holds the counts and the message). Default: an ERROR in the log.")


class SchedulesSettings(Section):
    """The DAGs' crons; 'none' = manual/backfill only."""

    legacy_names: ClassVar[dict[str, str]] = {"nightly": "schedule", "materialize": "materialize_schedule",
                                              "online_eval": "online_eval_schedule"}
    nightly: str = Field(default="@daily", description="Nightly DAG cron.")
    materialize: str = Field(default="@hourly", description="Online-store materialization cron.")
    online_eval: str = Field(default="@hourly", description="Online evaluation DAG cron.")

    @staticmethod
    def runs(cron: str) -> bool:
        """Whether a cron setting schedules its DAG at all ('none' or empty: manual/backfill only)."""
        return cron.lower() not in ("none", "")


class AirflowSettings(Section):
    """How the stack runs Airflow (its URL, user and database are top-level: every client needs them)."""

    legacy_prefix: ClassVar[str] = "airflow_"
    executor: str = Field(default="LocalExecutor", description="Airflow executor class name.")
    parallelism: int = Field(default=4, ge=1)
    broker_url: str | None = Field(default=None, description="Celery broker, e.g. redis://127.0.0.1:6379/1.")
    result_backend: str | None = Field(default=None, description="Celery results, e.g. db+postgresql://...")
    celery_concurrency: int = Field(default=2, ge=1, description="Task slots of the Celery worker.")
    dags_folder: Path | None = Field(default=None, description="DAGs the stack's Airflow loads; default dags/.")


SECTIONS: dict[str, type[Section]] = {
    "serving": ServingSettings, "prediction_log": PredictionLogSettings, "collect": CollectSettings,
    "validation": ValidationSettings, "drift": DriftSettings, "training": TrainingSettings,
    "challengers": ChallengersSettings, "replay": ReplaySettings, "cluster": ClusterSettings,
    "gate": GateSettings, "promotion": PromotionSettings, "online_eval": OnlineEvalSettings,
    "loop_health": LoopHealthSettings, "schedules": SchedulesSettings, "airflow": AirflowSettings,
}
LEGACY: dict[str, tuple[str, str]] = {
    cls.legacy_name(field): (section, field) for section, cls in SECTIONS.items() for field in cls.model_fields
}
"""Flat name before sections -> (section, field): the one mapping legacy env vars, keyword arguments and
`model_copy` updates go through."""


def nest_legacy(values: dict[str, Any]) -> dict[str, Any]:
    """`values` with every flat pre-section key moved into its section. A key given both flat and nested with
    different values is refused: neither spelling may silently win."""
    out = {key: value for key, value in values.items() if key not in LEGACY}
    for key in values.keys() & LEGACY.keys():
        section, field = LEGACY[key]
        current = out.get(section, {})
        current = current.model_dump() if isinstance(current, BaseModel) else dict(current)
        if field in current and current[field] != values[key]:
            raise ValueError(f"{key}={values[key]!r} and {section}.{field}={current[field]!r} both given: "
                             f"use one spelling ({section}.{field})")
        current[field] = values[key]
        out[section] = current
    return out


def env_name(section: str | None, field: str) -> str:
    """The canonical environment variable of a setting."""
    return f"{PREFIX}{section.upper()}{DELIMITER}{field.upper()}" if section else f"{PREFIX}{field.upper()}"


class _NestedInit(PydanticBaseSettingsSource):
    """Keyword arguments with flat legacy keys nested, before they are merged over the environment (so
    `Settings(min_rows=5)` beats `FLYWHEEL_VALIDATION__MIN_ROWS` as any keyword beats any env var)."""

    def __init__(self, settings_cls: type[BaseSettings], init: PydanticBaseSettingsSource):
        super().__init__(settings_cls)
        self._init = init

    def get_field_value(self, field, field_name):
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return nest_legacy(self._init())


class _LegacyEnv(PydanticBaseSettingsSource):
    """`FLYWHEEL_<FLAT_NAME>` env vars of section fields, read through `LEGACY`. One also set under its nested
    name to a different value is an error naming both."""

    def get_field_value(self, field, field_name):
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        env = {key.upper(): value for key, value in os.environ.items()}
        out: dict[str, dict[str, Any]] = {}
        for legacy, (section, field) in LEGACY.items():
            raw = env.get(env_name(None, legacy))
            if raw is None:
                continue
            value = self._decode(section, field, raw, env_name(None, legacy))
            nested_name = env_name(section, field)
            if nested_name in env and self._typed(section, field, value) != self._typed(
                    section, field, self._decode(section, field, env[nested_name], nested_name)):
                raise SettingsError(f"{env_name(None, legacy)}={raw!r} and {nested_name}={env[nested_name]!r} "
                                    f"disagree: unset the legacy name {env_name(None, legacy)}")
            out.setdefault(section, {})[field] = value
        return out

    def _decode(self, section: str, field: str, raw: str, name: str) -> Any:
        if not self.field_is_complex(SECTIONS[section].model_fields[field]):
            return raw
        try:
            return json.loads(raw)
        except ValueError as e:
            raise SettingsError(f"{name}={raw!r} is not JSON (expected e.g. [\"a\", \"b\"])") from e

    @staticmethod
    def _typed(section: str, field: str, value: Any) -> Any:
        typed = getattr(SECTIONS[section].model_validate({field: value}), field)
        return typed.resolve() if isinstance(typed, Path) else typed


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=PREFIX, env_nested_delimiter=DELIMITER, extra="forbid")

    home: Path = Field(default=Path(".flywheel"), description="State root: lake, databases, pid files, secrets.")
    spec_path: Path = Field(default=DEFAULT_SPEC, description="Feature spec YAML.")
    lake_uri: str | None = Field(default=None, description="Lake root (local path or pyarrow.fs URI); default home/lake.")
    model_name: str | None = Field(default=None, description="Registered model name; default flywheel-<spec name>.")
    seed: int = Field(default=7, description="Seeds training, the replay reservoir and the gate's bootstrap.")
    log_format: Literal["human", "json"] = Field(
        default="human", description="Console log lines: short human lines, or JSON (CI, log shippers); the log "
        "file under the home is always JSON.")
    online_store_uri: str | None = Field(default=None, description="Online entity features: sqlite:///path "
                                         "(default home/online.db) or redis://host:6379/0.")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint for lake and artifacts.")
    # --- MLflow and Airflow: where they are, who may use them, where they keep their state ---
    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_ui_url: str | None = Field(default=None, description="The MLflow address people open, for the links "
                                      "in review cards; default the tracking URI. Set it when processes reach "
                                      "MLflow at another address than people do (a cluster service vs an ingress).")
    mlflow_port: int = 5000
    mlflow_backend_uri: str | None = Field(default=None, description="e.g. postgresql+psycopg://.../mlflow")
    mlflow_artifacts_uri: str | None = Field(default=None, description="Artifact root, e.g. s3://bucket/mlflow.")
    mlflow_auth: bool = Field(default=False, description="Start MLflow with basic auth; users from secrets.")
    mlflow_username: str | None = None
    mlflow_password: str | None = None
    airflow_url: str = "http://127.0.0.1:8080"
    airflow_port: int = 8080
    airflow_user: str = "admin"
    airflow_password: str | None = None
    airflow_db_uri: str | None = Field(default=None, description="e.g. postgresql+psycopg://user@host/airflow")
    service_start_timeout_s: float = Field(
        default=240.0, gt=0, description="How long `up` waits for MLflow, Airflow and the model server to answer "
        "(a busy shared machine can take minutes; a crashed process is reported at once with its log).")

    serving: ServingSettings = Field(default_factory=ServingSettings)
    prediction_log: PredictionLogSettings = Field(default_factory=PredictionLogSettings)
    collect: CollectSettings = Field(default_factory=CollectSettings)
    validation: ValidationSettings = Field(default_factory=ValidationSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    challengers: ChallengersSettings = Field(default_factory=ChallengersSettings)
    replay: ReplaySettings = Field(default_factory=ReplaySettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    gate: GateSettings = Field(default_factory=GateSettings)
    promotion: PromotionSettings = Field(default_factory=PromotionSettings)
    online_eval: OnlineEvalSettings = Field(default_factory=OnlineEvalSettings)
    loop_health: LoopHealthSettings = Field(default_factory=LoopHealthSettings)
    schedules: SchedulesSettings = Field(default_factory=SchedulesSettings)
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return (_NestedInit(settings_cls, init_settings), env_settings, _LegacyEnv(settings_cls), dotenv_settings,
                file_secret_settings)

    @model_validator(mode="before")
    @classmethod
    def _nest_legacy(cls, data: Any) -> Any:
        """`Settings.model_validate` with flat keys takes the same path as keyword arguments."""
        return nest_legacy(data) if isinstance(data, dict) else data

    def __getattr__(self, name: str) -> Any:
        """A flat name read the old way fails naming its new place (code merged from before the sections)."""
        if name in LEGACY:
            section, field = LEGACY[name]
            raise AttributeError(f"Settings.{name} is now Settings.{section}.{field}")
        return super().__getattr__(name)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Settings:
        """A copy with its own sections (mutating one never reaches the original); `update` may use flat legacy
        keys, nested dicts or section objects, each validated, and an unknown key is refused."""
        nested = nest_legacy(dict(update or {}))
        unknown = nested.keys() - type(self).model_fields.keys()
        if unknown:
            raise KeyError(f"not Settings fields: {sorted(unknown)}")
        sections = {}
        for name, cls in SECTIONS.items():
            value = nested.pop(name, {})
            value = value.model_dump() if isinstance(value, BaseModel) else value
            sections[name] = cls.model_validate({**getattr(self, name).model_dump(), **value})
        return super().model_copy(update={**nested, **sections}, deep=deep)

    def to_env(self, environ: dict[str, str] | None = None) -> dict[str, str]:
        """These settings as the environment of a child process: canonical names, plus the same value under
        any legacy name `environ` (default: this process's) carries, so a stale legacy value cannot disagree."""
        env = {}
        for section, field, value in self.items():
            if value is None:
                continue
            if isinstance(value, Path):
                value = str(value.resolve())
            elif isinstance(value, tuple | list):
                value = json.dumps(list(value))
            env[env_name(section, field)] = str(value)
        canonical = {env_name(None, legacy): env_name(*target) for legacy, target in LEGACY.items()}
        for key in os.environ if environ is None else environ:
            if (name := canonical.get(key.upper())) in env:
                env[key] = env[name]
        return env

    def public_dump(self) -> dict[str, Any]:
        """The settings as JSON data, top-level fields then one object per section, with passwords, tokens and
        the credentials inside URIs masked: what `flywheel settings` prints, safe to paste in an issue."""
        def mask(name: str, value: Any) -> Any:
            if value in (None, [], "") or isinstance(value, bool | int | float):
                return value
            if any(word in name for word in ("password", "token")):
                return "***"
            return _URI_CREDENTIALS.sub(r"\1***@", value) if isinstance(value, str) else value

        out: dict[str, Any] = {}
        for section, field, value in self.items():
            target = out.setdefault(section, {}) if section else out
            target[field] = mask(field, TypeAdapter(Any).dump_python(value, mode="json"))
        return out

    def items(self) -> list[tuple[str | None, str, Any]]:
        """Every setting as (section or None for top-level, field, value), in declaration order."""
        out: list[tuple[str | None, str, Any]] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name in SECTIONS:
                out.extend((name, field, getattr(value, field)) for field in type(value).model_fields)
            else:
                out.append((None, name, value))
        return out

    @property
    def home_abs(self) -> Path:
        return self.home.resolve()

    @property
    def lake_root(self) -> str:
        return self.lake_uri or str(self.home_abs / "lake")

    @property
    def run_dir(self) -> Path:
        return self.home_abs / "run"

    @property
    def reports_dir(self) -> Path:
        return self.home_abs / "reports"

    @property
    def spool_dir(self) -> Path:
        return self.home_abs / "spool"

    @property
    def metrics_dir(self) -> Path:
        """prometheus-client's multiprocess files when several server workers share one /metrics."""
        return self.run_dir / "prometheus"

    def resolved_model_name(self, spec_name: str) -> str:
        return self.model_name or f"flywheel-{spec_name}"

    def resolved_mlflow_ui_url(self) -> str:
        return (self.mlflow_ui_url or self.mlflow_tracking_uri).rstrip("/")

    def resolved_serving_url(self) -> str:
        return self.serving.url or f"http://{self.serving.host}:{self.serving.port}"

    def secret(self, name: str, nbytes: int = 32) -> str:
        """A secret generated once per home and kept in a 0600 file (made private before it is renamed into
        place), never in code or logs."""
        path = self.home_abs / "secrets" / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_urlsafe(nbytes))
            tmp.chmod(0o600)
            tmp.replace(path)
        return path.read_text().strip()

    def resolved_admin_token(self) -> str:
        """Admin token from the env, else the home's generated one."""
        return self.serving.admin_token or self.secret("admin_token")


def locate(name: str) -> tuple[str | None, str]:
    """(section or None, field) of a setting named by its dotted path (`gate.min_auc`), its top-level name or
    its flat legacy name (`min_auc`). Refuses anything else, so a message can never name a missing setting."""
    section, _, field = name.rpartition(".")
    if section in SECTIONS and field in SECTIONS[section].model_fields:
        return section, field
    if not section and name in Settings.model_fields and name not in SECTIONS:
        return None, name
    if not section and name in LEGACY:
        return LEGACY[name]
    raise KeyError(f"{name!r} is not a Settings field")


def knob(name: str) -> str:
    """A setting as a gate message names it for the user: its dotted path and its environment variable."""
    section, field = locate(name)
    return f"{section + '.' if section else ''}{field} ({env_name(section, field)})"


class _ProcessSettings:
    """The process's settings: built from the environment on first use, or installed by the entry point that
    knows better (the CLI's `--home`/`--spec`, the demo) as an explicit object rather than by rewriting the
    environment. Child processes get them through `ops.stack.settings_env`. `cache_clear` forgets both, so the
    next call reads the environment again."""

    def __init__(self) -> None:
        self._current: Settings | None = None

    def __call__(self) -> Settings:
        if self._current is None:
            self._current = Settings()
        return self._current

    def use(self, settings: Settings) -> Settings:
        self._current = settings
        return settings

    def cache_clear(self) -> None:
        self._current = None


get_settings = _ProcessSettings()
