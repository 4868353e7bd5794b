"""The one settings object: every path, URI and threshold lives here, overridable by `FLYWHEEL_*` env vars.

Built by a cached function rather than at import, so tests and the CLI can point a fresh process at another
home directory just by setting the environment before the first call.
"""

from __future__ import annotations

import secrets
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SPEC = Path(__file__).resolve().parent.parent / "feature_store" / "specs" / "ctr.yaml"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", extra="ignore")

    home: Path = Field(default=Path(".flywheel"), description="State root: lake, databases, pid files, secrets.")
    spec_path: Path = Field(default=DEFAULT_SPEC, description="Feature spec YAML.")
    lake_uri: str | None = Field(default=None, description="Lake root (local path or pyarrow.fs URI); default home/lake.")
    model_name: str | None = Field(default=None, description="Registered model name; default flywheel-<spec name>.")

    mlflow_tracking_uri: str = "http://127.0.0.1:5000"
    mlflow_port: int = 5000
    airflow_url: str = "http://127.0.0.1:8080"
    airflow_port: int = 8080
    airflow_user: str = "admin"
    airflow_password: str | None = None
    serving_host: str = "127.0.0.1"
    serving_port: int = 8000
    serving_url: str | None = Field(default=None, description="Where promote/rollout reaches the model server.")
    admin_token: str | None = Field(default=None, description="Bearer token for the server's admin routes.")

    schedule: str = Field(default="@daily", description="Nightly DAG cron; 'none' for manual/backfill only.")
    log_flush_interval_ms: int = Field(default=200, ge=10, description="Spool flush interval: the most a SIGKILL loses.")
    log_seal_interval_s: float = Field(default=10.0, gt=0, description="How often the spool is sealed to Parquet.")
    collect_flushes_server: bool = Field(default=True, description="collect asks the server to seal its spools first.")
    alias_poll_interval_s: float = Field(default=2.0, gt=0)
    max_rows_per_request: int = Field(default=4096, ge=1)

    label_lateness_s: int = Field(default=900, ge=0, description="Extra wait for late feedback after the window.")
    min_rows: int = Field(default=200, ge=1, description="Validation gate: fewer labeled rows fail the day.")
    max_bad_fraction: float = Field(default=0.05, ge=0, le=1, description="Validation gate: quarantined share.")
    label_rate_min: float = Field(default=0.0005, ge=0, le=1)
    label_rate_max: float = Field(default=0.9995, ge=0, le=1)
    unseen_category_share: float = Field(default=0.5, ge=0, le=1, description="Allowed share of unseen values.")

    holdout_fraction: float = Field(default=0.2, gt=0, lt=1, description="Time-latest share of a day held out.")
    epochs: int = Field(default=2, ge=1)
    bootstrap_epochs: int = Field(default=3, ge=1)
    bootstrap_min_steps: int = Field(default=300, ge=0, description="Small histories get more epochs.")
    batch_size: int = Field(default=512, ge=1)
    learning_rate: float = Field(default=3e-3, gt=0)
    embedding_dim: int = Field(default=8, ge=1)
    hidden_units: tuple[int, ...] = (64, 32)
    vocab_min_count: int = Field(default=2, ge=1, description="Sightings before a new category gets its own id.")
    seed: int = 7

    max_auc_regression: float = Field(default=0.005, ge=0, description="Promotion gate vs champion.")
    min_auc: float = Field(default=0.5, ge=0, le=1, description="Promotion gate: absolute floor.")
    rollout_timeout_s: float = Field(default=60.0, gt=0)

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

    def resolved_model_name(self, spec_name: str) -> str:
        return self.model_name or f"flywheel-{spec_name}"

    def resolved_serving_url(self) -> str:
        return self.serving_url or f"http://{self.serving_host}:{self.serving_port}"

    def resolved_admin_token(self) -> str:
        """Admin token from the env, else one generated once per home and kept in a 0600 file, never in code."""
        if self.admin_token:
            return self.admin_token
        path = self.home_abs / "secrets" / "admin_token"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_urlsafe(32))
            tmp.chmod(0o600)
            tmp.replace(path)
        return path.read_text().strip()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
