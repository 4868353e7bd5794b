from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from feature_store.spec import load_spec
from pipeline.config import DEFAULT_SPEC, REPO
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


LOANS_TEXT = LOANS_SPEC.read_text()


def _text(tmp_path, text: str | bytes):
    p = tmp_path / "spec.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (LOANS_TEXT.replace("  income_ratio: {type: numeric}",
                            "  income_ratio: {type: numeric}\n  region: {type: numeric}"),
         r"written twice.*features\.region \(line"),
        (LOANS_TEXT + "name: loans_again\n", r"written twice.*\bname \(line"),
        (LOANS_TEXT.replace("{type: numeric, min: 0}", "{type: numeric, min: .nan}"), r"features\.amount\.min"),
        (LOANS_TEXT.replace("max: 600", "max: .inf"), r"features\.tenure_months\.max"),
        (LOANS_TEXT.replace("attribution_window: 2d", "attribution_window: 0s"), r"label\.attribution_window"),
        (LOANS_TEXT.replace("attribution_window: 2d", "attribution_window: -5"), r"label\.attribution_window"),
        (LOANS_TEXT.replace("missing: drop", "missing: drop\n  colour: red"), r"label\.colour"),
        ("name: x\n  bad: [indent", "not valid YAML"),
        ("- just\n- a list\n", "mapping at the top level"),
    ],
)
def test_spec_errors_are_one_line_naming_file_and_key(tmp_path, text, expected):
    path = _text(tmp_path, text)
    with pytest.raises(SpecError, match=expected) as e:
        load_spec(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_binary_and_non_utf8_files_are_named(tmp_path):
    with pytest.raises(SpecError, match=r"spec\.yaml: not UTF-8 text \(byte 0xea"):
        load_spec(_text(tmp_path, LOANS_TEXT.encode().replace(b"loans", "pr\u00eat".encode("latin-1"), 1)))
    with pytest.raises(SpecError, match=r"spec\.yaml: a binary file"):
        load_spec(_text(tmp_path, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"))
    with pytest.raises(SpecError, match="is a directory"):
        load_spec(tmp_path)


def _cli(home, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "FLYWHEEL_MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    return subprocess.run([str(Path(sys.executable).parent / "flywheel"), "--home", str(home), *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (LOANS_TEXT.replace("  income_ratio: {type: numeric}",
                            "  income_ratio: {type: numeric}\n  amount: {type: numeric}"), "features.amount"),
        (LOANS_TEXT.replace("attribution_window: 2d", "attribution_window: 0s"), "label.attribution_window"),
        (b"\xff\xfe\x00n\x00a\x00m\x00e", "binary file"),
    ],
)
def test_cli_spec_error_is_one_line_exit_2(tmp_path, text, key):
    path = _text(tmp_path, text)
    out = _cli(tmp_path / "home", "--spec", str(path), "bootstrap", "--history", str(tmp_path / "h.parquet"))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and str(path) in lines[0] and key in lines[0], out.stderr


def test_reserved_names_are_one_line_errors_that_show_the_mapping(tmp_path):
    text = LOANS_TEXT.replace("name: defaulted", "name: label")
    with pytest.raises(SpecError) as e:
        load_spec(_text(tmp_path, text))
    msg = str(e.value)
    assert "\n" not in msg and "label.name: 'label' is reserved" in msg and "source: label" in msg


def test_source_maps_a_files_column_to_a_spec_name(tmp_path):
    text = (LOANS_TEXT.replace("name: defaulted", "name: outcome\n  source: label")
            .replace("income_ratio: {type: numeric}", "score_value: {type: numeric, source: score}"))
    spec = load_spec(_text(tmp_path, text))
    assert spec.source_columns["outcome"] == "label" and spec.source_columns["score_value"] == "score"
    assert spec.source_columns["amount"] == "amount" and "score" not in spec.features
    clash = text.replace("product: {type: categorical}", "product: {type: categorical, source: region}")
    with pytest.raises(SpecError, match=r"\['region'\] read by more than one"):
        load_spec(_text(tmp_path, clash))
