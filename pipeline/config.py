"""The one settings object: every path, URI and threshold lives here, overridable by `FLYWHEEL_*` env vars.

Built by a cached function rather than at import, so tests and the CLI can point a fresh process at another
home directory just by setting the environment before the first call.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = REPO / "feature_store" / "specs" / "ctr.yaml"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

    home: Path = Field(default=Path(".flywheel"), description="State root: lake, databases, pid files, secrets.")
    spec_path: Path = Field(default=DEFAULT_SPEC, description="Feature spec YAML.")
    lake_uri: str | None = Field(default=None, description="Lake root (local path or pyarrow.fs URI); default home/lake.")
    model_name: str | None = Field(default=None, description="Registered model name; default flywheel-<spec name>.")

    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_port: int = 5000
    # --- backends (issue 7): unset means the embedded default under `home` ---
    airflow_db_uri: str | None = Field(default=None, description="e.g. postgresql+psycopg://user@host/airflow")
    airflow_executor: str = Field(default="LocalExecutor", description="Airflow executor class name.")
    airflow_parallelism: int = Field(default=4, ge=1)
    mlflow_backend_uri: str | None = Field(default=None, description="e.g. postgresql+psycopg://.../mlflow")
    mlflow_artifacts_uri: str | None = Field(default=None, description="Artifact root, e.g. s3://bucket/mlflow.")
    training_image: str = "ghcr.io/flywheel-mlops/flywheel:0.1.0-cuda"
    training_namespace: str = "flywheel"
    training_priority_class: str = "flywheel-training"
    training_cpus: int = Field(default=4, ge=1)
    training_memory: str = "16Gi"
    training_gpus: int = Field(default=1, ge=0)
    gpu_pool: str = Field(default="gpu", description="Airflow pool bounding concurrent GPU training jobs.")
    # --- training on a shared cluster (issue 15) ---
    training_job_kind: Literal["pod", "pytorchjob", "trainjob"] = Field(
        default="pod", description="What the kubernetes runner submits: a single pod, a Kubeflow PyTorchJob "
        "(elastic, torchrun) or a Kubeflow Trainer TrainJob.")
    training_min_nodes: int = Field(default=1, ge=1, description="Elastic job: fewest workers it runs with.")
    training_max_nodes: int = Field(default=2, ge=1, description="Elastic job: most workers it grows to.")
    training_max_restarts: int = Field(default=100, ge=0, description="torchrun --max-restarts: membership "
                                       "changes (preemptions, joins) one launch survives.")
    kueue_queue: str | None = Field(default=None, description="Kueue LocalQueue the training job is submitted to "
                                    "(it waits for quota instead of failing); none = submit directly.")
    training_deadline_h: float = Field(default=8.0, gt=0, description="Hours after the data day ends by which its "
                                       "training must be done: preemptions are retried until then.")
    training_retry_delay_s: int = Field(default=60, ge=1, description="Wait before retrying a preempted training.")
    airflow_url: str = "http://127.0.0.1:8080"
    airflow_port: int = 8080
    airflow_user: str = "admin"
    airflow_password: str | None = None
    serving_host: str = "127.0.0.1"
    serving_port: int = 8000
    serving_url: str | None = Field(default=None, description="Where promote/rollout reaches the model server.")
    admin_token: str | None = Field(default=None, description="Bearer token for the server's admin routes.")

    schedule: str = Field(default="@daily", description="Nightly DAG cron; 'none' for manual/backfill only.")
    log_durability: Literal["group", "interval"] = Field(
        default="group", description="group: each answer waits for the fsync covering its rows (shared by "
        "concurrent requests), so a SIGKILL loses nothing answered; interval: answer first, fsync every "
        "log_flush_interval_ms (lower latency, a SIGKILL loses up to one interval).")
    log_flush_interval_ms: int = Field(default=200, ge=10, description="Background spool flush interval (the most "
                                       "a SIGKILL loses in interval durability).")
    log_seal_interval_s: float = Field(default=10.0, gt=0, description="How often the spool is sealed to Parquet.")
    collect_flushes_server: bool = Field(default=True, description="collect asks the server to seal its spools first.")
    alias_poll_interval_s: float = Field(default=2.0, gt=0)
    max_rows_per_request: int = Field(default=4096, ge=1)
    # --- serving (issue 3) ---
    serving_workers: int = Field(default=1, ge=1, description="Server processes sharing the port and spool dir.")
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
    canary_share: float = Field(default=0.0, ge=0, le=1, description="Share of entities routed to `challenger`.")
    api_tokens: list[str] = Field(default_factory=list, description="Bearer tokens for predict/feedback; empty=open.")
    log_predictions: bool = Field(default=True, description="Off only for benchmarks: unlogged rows are lost data.")
    log_format: Literal["human", "json"] = Field(
        default="human", description="Console log lines: short human lines, or JSON (CI, log shippers); the log "
        "file under the home is always JSON.")

    label_lateness_s: int = Field(default=900, ge=0, description="Extra wait for late feedback after the window.")
    min_rows: int = Field(default=200, ge=1, description="Validation gate: fewer labeled rows fail the day.")
    max_bad_fraction: float = Field(default=0.05, ge=0, le=1, description="Validation gate: quarantined share.")
    label_rate_min: float = Field(default=0.0005, ge=0, le=1)
    label_rate_max: float = Field(default=0.9995, ge=0, le=1)
    unseen_category_share: float = Field(
        default=0.5, ge=0, le=1, description="Validation gate: allowed share of rows with a category value that "
        "neither the champion's vocabulary nor the recent collected days had (entity attributes: on rows of known "
        "entities only; entity keys are exempt).")
    unseen_reference_days: int = Field(default=7, ge=0, description="Unseen categories: past collected days "
                                       "(whatever their gate outcome) whose values count as seen.")
    unseen_min_rows: int = Field(default=100, ge=1, description="Unseen categories: a share over fewer rows "
                                 "than this is reported, not gated.")
    # --- data path (issue 4) ---
    collect_lateness_s: float = Field(default=2 * 86400, ge=0,
                                      description="Segments sealed this long after a day's first collect still "
                                                  "join it on a re-run; later ones are listed as too late.")
    collect_batch_rows: int = Field(default=262_144, ge=1024, description="Rows per record batch when collecting.")

    validation_suite_path: Path | None = Field(
        default=None, description="User expectations (great-expectations suite JSON) added to the spec-derived "
        "suite; default: `<spec stem>.expectations.json` next to the spec, when present.")
    validate_chunk_rows: int = Field(default=262_144, ge=1024, description="Rows per validated record batch.")
    drift_reference_days: int = Field(default=7, ge=1, description="Drift: past validated days in the reference.")
    drift_bins: int = Field(default=10, ge=2, description="Drift: quantile bins per numeric feature for PSI.")
    drift_psi_warn: float = Field(default=0.1, ge=0, description="Drift: PSI above this is reported as moderate.")
    drift_psi_severe: float = Field(default=0.25, ge=0, description="Drift: PSI above this is severe.")
    drift_action: Literal["warn", "block"] = Field(default="warn", description="Severe drift: warn, or fail the day.")
    # --- feature store (issue 4) ---
    online_store_uri: str | None = Field(default=None, description="Online entity features: sqlite:///path "
                                         "(default home/online.db) or redis://host:6379/0.")
    materialize_schedule: str = Field(default="@hourly", description="Online-store materialization cron; 'none'.")
    vocab_expiry_days: int = Field(default=0, ge=0, description="Categories unseen this many days map to OOV; 0=off.")
    # --- production profile (issue 7) ---
    airflow_broker_url: str | None = Field(default=None, description="Celery broker, e.g. redis://127.0.0.1:6379/1.")
    airflow_result_backend: str | None = Field(default=None, description="Celery results, e.g. db+postgresql://...")
    training_runner: Literal["local", "kubernetes"] = Field(
        default="local", description="Where the nightly train task runs: in the worker, or as a training pod.")
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint for lake and artifacts.")
    mlflow_auth: bool = Field(default=False, description="Start MLflow with basic auth; users from secrets.")
    mlflow_username: str | None = None
    mlflow_password: str | None = None
    gpu_pool_slots: int = Field(default=1, ge=1, description="Slots of `gpu_pool`: nights that train at once.")
    airflow_celery_concurrency: int = Field(default=2, ge=1, description="Task slots of the Celery worker.")
    airflow_dags_folder: Path | None = Field(default=None, description="DAGs the stack's Airflow loads; default dags/.")

    holdout_fraction: float = Field(default=0.2, gt=0, lt=1, description="Time-latest share of a day held out.")
    epochs: int = Field(default=4, ge=1)
    bootstrap_epochs: int = Field(default=3, ge=1)
    bootstrap_min_steps: int = Field(default=300, ge=0, description="Small histories get more epochs.")
    batch_size: int = Field(default=512, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    embedding_dim: int = Field(default=8, ge=1)
    numeric_clip: float = Field(default=5.0, gt=0, description="Standardised numerics are clipped to +-this.")
    hidden_units: tuple[int, ...] = (64, 32)
    vocab_min_count: int = Field(default=2, ge=1, description="Sightings before a new category gets its own id.")
    seed: int = 7
    # --- incremental training (issue 5) ---
    replay_rows: int = Field(default=20000, ge=0, description="Reservoir of past labeled rows kept in the lake; 0 = off.")
    replay_ratio: float = Field(default=0.25, ge=0, description="Replayed rows per new training row each night.")
    replay_half_life_days: float = Field(default=3.0, ge=0, description="Reservoir recency bias; 0 = uniform.")
    replay_min_class_share: float = Field(default=0.1, ge=0, le=0.5, description="Floor per label in the reservoir.")
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
    calibration_min_rows: int = Field(default=50, ge=2, description="Smaller slices keep the identity map.")
    # --- drift-reactive challengers (issue 13) ---
    drift_challengers: tuple[Literal["shrink", "fresh"], ...] = Field(
        default=("shrink", "fresh"), description="Extra candidates trained on a drift night beside the warm "
        "start (shrink-and-perturb, a fresh model on the recent window); the gate picks on the holdout. ()=off.")
    drift_auc_drop: float = Field(default=0.05, ge=0, description="A drift night also when the champion's AUC on "
                                  "the day's validation slice is this far below its holdout AUC; 0 = off.")
    drift_auc_min_rows: int = Field(default=200, ge=2, description="Smaller validation slices do not judge the "
                                    "champion's AUC (too noisy to call a drop).")
    drift_window_days: int = Field(default=3, ge=1, description="Days (today included) the fresh model learns from.")
    drift_window_max_rows: int = Field(default=500_000, ge=1, description="Cap on the fresh model's rows (newest kept).")
    shrink_factor: float = Field(default=0.5, gt=0, le=1, description="Shrink-and-perturb: weight kept.")
    perturb_scale: float = Field(default=0.1, ge=0, description="Shrink-and-perturb: share of a fresh init added.")
    drift_lr_factor: float = Field(default=3.0, gt=0, description="Shrink policy: learning rate multiple, cold Adam.")
    drift_budget_s: float = Field(default=0.0, ge=0, description="Extra challengers start only while the night's "
                                  "training has taken less than this many seconds; 0 = no limit.")

    max_auc_regression: float = Field(default=0.005, ge=0, description="Promotion gate vs champion.")
    min_auc: float = Field(default=0.5, ge=0, le=1, description="Promotion gate: absolute floor.")
    # --- evaluation & promotion (issue 6) ---
    max_ece: float = Field(default=0.1, ge=0, le=1, description="Gate: absolute ceiling on calibration error.")
    ece_bins: int = Field(default=10, ge=2, description="Equal-width score bins for ECE and the reliability plot.")
    max_logloss_regression: float = Field(default=0.05, ge=0, description="Gate: relative log-loss rise allowed.")
    max_ece_regression: float = Field(default=0.01, ge=0, description="Gate: ECE rise over the champion allowed "
                                      "(judged by its paired bootstrap CI) before calibration counts against a "
                                      "candidate.")
    ece_min_rows: int = Field(default=300, ge=1, description="Gate: fewer held-out rows than this and ECE is "
                              "reported, not gated (a 10-bin ECE of a few dozen rows is noise).")
    champion_collapse_auc_drop: float = Field(
        default=0.1, ge=0, le=1, description="Gate: a champion whose holdout AUC is this far below the AUC it was "
        "registered with (or below min_auc) is failing; a candidate not worse than it then replaces it, whatever "
        "its calibration, log-loss or slices.")
    max_slice_auc_regression: float = Field(default=0.02, ge=0, description="Gate: AUC regression per slice.")
    min_slice_rows: int = Field(default=100, ge=1, description="Smaller slices are reported, not gated.")
    bootstrap_samples: int = Field(default=400, ge=50, description="Paired bootstrap resamples for the CIs.")
    bootstrap_confidence: float = Field(default=0.95, gt=0.5, lt=1)
    gate_on_inconclusive: Literal["pass", "fail"] = Field(
        default="pass", description="A CI that straddles the margin (noise level): pass, or fail to demand proof.")
    promotion_mode: Literal["auto", "review"] = Field(default="auto", description="review: wait for a reviewer.")
    approval_timeout_s: float = Field(default=86400.0, gt=0, description="Review mode: give up after this long.")
    approval_poll_interval_s: float = Field(default=30.0, gt=0, description="Review mode: registry poll period.")
    alias_lock_stale_s: float = Field(default=300.0, gt=0, description="A promotion lock older than this is broken.")
    online_window_days: int = Field(default=2, ge=1, description="Online evaluation: collected days looked at.")
    online_min_rows: int = Field(default=500, ge=1, description="Online evaluation: labeled rows before deciding.")
    online_min_positives: int = Field(default=20, ge=1, description="Online evaluation: positives before deciding.")
    online_max_auc_regression: float = Field(default=0.01, ge=0, description="Online: champion vs previous.")
    online_max_logloss_regression: float = Field(default=0.05, ge=0, description="Online: relative log-loss rise.")
    online_eval_schedule: str = Field(default="@hourly", description="Online evaluation DAG cron; 'none' = manual.")
    rollout_timeout_s: float = Field(default=60.0, gt=0)
    service_start_timeout_s: float = Field(
        default=240.0, gt=0, description="How long `up` waits for MLflow, Airflow and the model server to answer "
        "(a busy shared machine can take minutes; a crashed process is reported at once with its log).")
    # --- loop health (issue 13) ---
    loop_health_warn_nights: int = Field(default=2, ge=1, description="Nights without training or without a "
                                         "promotion before each nightly result warns.")
    loop_health_fail_nights: int = Field(default=5, ge=1, description="Nights without training or without a "
                                         "promotion before the nightly fails its loop-health check and alerts.")
    loop_health_callback: str = Field(
        default="pipeline.checks.loop_health.log_alert", description="Dotted path of the alert hook called when "
        "loop health fails: an Airflow on_failure_callback-style callable taking a context dict (its "
        "'loop_health' key holds the counts and the message). Default: an ERROR in the log.")

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

    def resolved_serving_url(self) -> str:
        return self.serving_url or f"http://{self.serving_host}:{self.serving_port}"

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
        return self.admin_token or self.secret("admin_token")


def knob(name: str) -> str:
    """A setting as a gate message names it for the user: the field and its environment variable. Refuses a
    name that is not a field, so a message can never point at a setting that does not exist."""
    if name not in Settings.model_fields:
        raise KeyError(f"{name!r} is not a Settings field")
    return f"{name} (FLYWHEEL_{name.upper()})"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
