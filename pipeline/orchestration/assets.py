"""The day-partitioned assets the DAGs exchange: the nightly run publishes partition D of each, and the
per-day online evaluation follows the collected day's partition instead of guessing which day is new.

Declared once here because a producer and its consumers live in different DAG files; the URIs are names in
Airflow's asset view, not paths anything opens.
"""

from __future__ import annotations

from airflow.sdk import Asset

TRAINING_DAY = Asset(name="flywheel_training_day", uri="file:///flywheel/lake/training")
VALIDATED_DAY = Asset(name="flywheel_validated_day", uri="file:///flywheel/lake/validated")
CANDIDATE = Asset(name="flywheel_candidate", uri="mlflow://flywheel/registered-candidate")
