"""Settings sections: both env spellings, flat keywords, the legacy table's completeness, and sub-configs built
by keyword from their section (a reordered field must not swap two thresholds)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from pipeline.checks.gate import GateConfig
from pipeline.config import LEGACY, SECTIONS, Settings, knob, locate
from pipeline.learn.replay import ReplayPolicy
from serving.schema import RequestLimits

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(monkeypatch):
    """A clean FLYWHEEL_* environment the test fills in."""
    import os

    for key in list(os.environ):
        if key.upper().startswith("FLYWHEEL_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_every_flat_name_before_sections_still_resolves_to_one_setting():
    top = [f for f in Settings.model_fields if f not in SECTIONS]
    # the 147 flat fields Settings had before sections, plus mlflow_ui_url, cluster.staging_uri, cluster.poll_s
    # prediction_log.commit_delay_ms, training.bootstrap_refit, carry_held_out, catch_up_days,
    # calibration_prior_rows and drift.min_rows (each new field also answers to its flat name)
    assert len(top) + len(LEGACY) == 158
    assert not set(top) & set(LEGACY) and not set(SECTIONS) & (set(top) | set(LEGACY))
    targets = set(LEGACY.values())
    assert targets == {(s, f) for s, cls in SECTIONS.items() for f in cls.model_fields}
    assert len(targets) == len(LEGACY)  # no two flat names share a target


def test_both_env_spellings_set_a_section_field(env):
    env.setenv("FLYWHEEL_MIN_ROWS", "7")
    env.setenv("FLYWHEEL_GATE__MIN_AUC", "0.61")
    env.setenv("FLYWHEEL_API_TOKENS", '["a", "b"]')
    env.setenv("FLYWHEEL_DRIFT_CHALLENGERS", '["shrink"]')
    env.setenv("FLYWHEEL_SCHEDULE", "none")
    s = Settings()
    assert (s.validation.min_rows, s.gate.min_auc, s.serving.api_tokens) == (7, 0.61, ["a", "b"])
    assert (s.challengers.policies, s.schedules.nightly) == (("shrink",), "none")


def test_both_spellings_agreeing_is_fine_and_disagreeing_is_an_error_naming_both(env):
    env.setenv("FLYWHEEL_MIN_AUC", "0.60")
    env.setenv("FLYWHEEL_GATE__MIN_AUC", "0.6")
    assert Settings().gate.min_auc == 0.6
    env.setenv("FLYWHEEL_GATE__MIN_AUC", "0.7")
    with pytest.raises(SettingsError, match="FLYWHEEL_MIN_AUC='0.60' and FLYWHEEL_GATE__MIN_AUC='0.7' disagree"):
        Settings()


def test_a_misspelt_nested_env_var_or_keyword_is_refused(env):
    env.setenv("FLYWHEEL_GATE__MIN_AUCC", "0.7")
    with pytest.raises(ValidationError, match="min_aucc"):
        Settings()
    env.delenv("FLYWHEEL_GATE__MIN_AUCC")
    with pytest.raises(ValidationError, match="min_rowz"):
        Settings(min_rowz=5)


def test_keywords_flat_or_nested_beat_the_environment(env):
    env.setenv("FLYWHEEL_VALIDATION__MIN_ROWS", "10")
    env.setenv("FLYWHEEL_MAX_BAD_FRACTION", "0.2")
    s = Settings(min_rows=5)
    assert (s.validation.min_rows, s.validation.max_bad_fraction) == (5, 0.2)
    assert Settings(validation={"min_rows": 6}).validation.min_rows == 6
    with pytest.raises(ValueError, match="both given"):
        Settings(min_rows=5, validation={"min_rows": 6})
    assert Settings.model_validate({"serving_port": 9}).serving.port == 9


def test_model_copy_takes_flat_keys_validates_them_and_never_shares_a_section(env):
    s = Settings()
    c = s.model_copy(update={"promotion_mode": "review", "gate": {"min_auc": 0.7}, "home": Path("/x")})
    assert (c.promotion.mode, c.gate.min_auc, c.home, s.promotion.mode) == ("review", 0.7, Path("/x"), "auto")
    c.validation.min_rows = 3
    assert s.validation.min_rows == 200
    with pytest.raises(ValidationError):
        s.model_copy(update={"promotion_mode": "sometimes"})
    with pytest.raises(KeyError, match="min_rowz"):
        s.model_copy(update={"min_rowz": 1})


def test_to_env_round_trips_and_overrides_a_stale_legacy_name(env):
    s = Settings(min_rows=5, api_tokens=["t"], lr_candidates=(0.1, 0.01), home=Path("h"))
    out = s.to_env(environ={"FLYWHEEL_MIN_ROWS": "9", "OTHER": "1"})
    assert out["FLYWHEEL_VALIDATION__MIN_ROWS"] == out["FLYWHEEL_MIN_ROWS"] == "5" and "OTHER" not in out
    for key, value in out.items():
        env.setenv(key, value)
    again = Settings()
    assert again.model_dump() == s.model_copy(update={"home": s.home.resolve()}).model_dump()


def test_reading_a_flat_name_the_old_way_says_where_it_moved():
    with pytest.raises(AttributeError, match=r"Settings.min_rows is now Settings.validation.min_rows"):
        _ = Settings().min_rows
    with pytest.raises(AttributeError):
        _ = Settings().no_such_thing


def test_knob_names_the_dotted_path_and_the_canonical_env_var():
    assert knob("min_rows") == knob("validation.min_rows") == "validation.min_rows (FLYWHEEL_VALIDATION__MIN_ROWS)"
    assert knob("home") == "home (FLYWHEEL_HOME)"
    assert locate("bootstrap_confidence") == ("gate", "confidence")
    with pytest.raises(KeyError):
        knob("gate.nope")
    with pytest.raises(KeyError):
        knob("gate")


def test_sub_configs_are_built_by_keyword_from_their_section():
    s = Settings(min_auc=0.55, max_auc_regression=0.02, bootstrap_confidence=0.9, gate_on_inconclusive="fail",
                 replay_rows=11, replay_ratio=0.5, seed=3, max_request_id_chars=64, event_time_future_days=2)
    g = GateConfig.from_settings(s)
    assert (g.min_auc, g.max_auc_regression, g.confidence, g.on_inconclusive, g.seed) == (0.55, 0.02, 0.9, "fail", 3)
    assert {f.name for f in dataclasses.fields(GateConfig)} == {*SECTIONS["gate"].model_fields, "seed"}
    r = ReplayPolicy.from_settings(s)
    assert (r.capacity, r.ratio, r.seed) == (11, 0.5, 3)
    assert {f.name for f in dataclasses.fields(ReplayPolicy)} == {*SECTIONS["replay"].model_fields, "seed"}
    lim = RequestLimits.from_settings(s)
    assert (lim.max_id_chars, lim.future.days) == (64, 2)


def test_a_fresh_process_reads_legacy_env_vars():
    """The names deployments already set (Helm values, compose files) keep working in a real child process."""
    code = "from pipeline.config import get_settings as g; s = g(); print(s.cluster.cpus, s.training.epochs)"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "FLYWHEEL_TRAINING_CPUS": "3", "FLYWHEEL_EPOCHS": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "2"]


def test_flywheel_settings_prints_sections_with_secrets_masked(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "FLYWHEEL_MIN_ROWS": "9",
           "FLYWHEEL_AIRFLOW__BROKER_URL": "redis://flywheel:hunter2@redis:6379/1", "FLYWHEEL_ADMIN_TOKEN": "sekrit"}
    flywheel = str(Path(sys.executable).parent / "flywheel")
    out = subprocess.run([flywheel, "--home", str(tmp_path), "settings"], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    data = json.loads(out.stdout)
    assert data["home"] == str(tmp_path.resolve()) and data["validation"]["min_rows"] == 9
    assert data["airflow"]["broker_url"] == "redis://flywheel:***@redis:6379/1"
    assert data["serving"]["admin_token"] == "***" and "hunter2" not in out.stdout and "sekrit" not in out.stdout
    assert set(SECTIONS) <= data.keys()
