from __future__ import annotations

from datetime import timedelta

import pytest
import yaml

from feature_store.spec import load_spec
from pipeline.config import DEFAULT_SPEC
from pipeline.errors import SpecError
from tests.helpers import LOANS_SPEC


def _write(tmp_path, data) -> str:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_demo_and_second_spec_load_with_derived_columns():
    ctr = load_spec(DEFAULT_SPEC)
    assert ctr.categorical == ["user_id", "item_id", "user_segment", "item_category", "device"]
    assert ctr.label.attribution_window == timedelta(minutes=30)
    loans = load_spec(LOANS_SPEC)
    assert loans.numeric == ["amount", "tenure_months", "income_ratio"]
    assert loans.label.missing == "drop" and loans.event_time == "applied_at"
    assert loans.sticky_key == "account_no" and loans.digest != ctr.digest


def test_unknown_type_names_file_and_key(tmp_path):
    data = yaml.safe_load(LOANS_SPEC.read_text())
    data["features"]["amount"]["type"] = "float32"
    path = _write(tmp_path, data)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(path) in str(e.value) and "features.amount.type" in str(e.value)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d["entities"]["account"].update(key="nope"), "not a declared feature"),
        (lambda d: d["label"].update(attribution_window="soon"), "label.attribution_window"),
        (lambda d: d["features"].update(score={"type": "numeric"}), "reserved"),
        (lambda d: d["features"]["region"].update(min=1), "min/max only apply to numeric"),
        (lambda d: d.update(colour="red"), "colour"),
    ],
)
def test_bad_specs_fail_at_load(tmp_path, mutate, expected):
    data = yaml.safe_load(LOANS_SPEC.read_text())
    mutate(data)
    with pytest.raises(SpecError, match=expected):
        load_spec(_write(tmp_path, data))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("features: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
