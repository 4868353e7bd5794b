"""`flywheel init`'s guesses on small frames: each rule, and that the draft loads as a spec."""

from __future__ import annotations

from datetime import date

import pandas as pd
import pyarrow as pa
import pytest
import yaml

from feature_store.infer import draft_spec, render
from feature_store.spec import FeatureSpec
from pipeline.errors import SpecError
from tests.helpers import loans_frame


def _loans() -> pd.DataFrame:
    frame = pd.concat([loans_frame(date(2026, 3, d), 300, seed=1) for d in (1, 2, 3)], ignore_index=True)
    frame["account_tier"] = "t" + (frame.account_no.str[4:].astype(int) % 3).astype(str)  # one per account
    frame["score"] = frame.amount / 10  # named like the log's score column
    frame["batch"] = "b1"  # constant
    frame["row_uuid"] = [f"u{i}" for i in range(len(frame))]
    frame["Weird name"] = frame.income_ratio * 2
    frame.loc[::7, "income_ratio"] = None
    return frame


def test_draft_guesses_types_time_label_entities_ranges_and_renames():
    draft = draft_spec(pa.Table.from_pandas(_loans(), preserve_index=False), "loans history")
    spec = FeatureSpec.model_validate(yaml.safe_load(render(draft, "loans.parquet")))
    f = draft.spec["features"]
    assert spec.name == "loans_history" and spec.event_time == "applied_at" and spec.label.name == "defaulted"
    assert spec.categorical == ["account_no", "region", "product", "account_tier"]
    assert f["amount"]["min"] == 0 and f["amount"]["max"] > _loans().amount.max()
    assert f["income_ratio"]["nullable"] is True and "nullable" not in f["amount"]
    assert draft.spec["entities"] == {"account": {"key": "account_no"}} and f["account_tier"]["entity"] == "account"
    assert f["score_value"] == {"type": "numeric", "min": 0, "max": f["score_value"]["max"], "source": "score"}
    assert f["Weird_name"]["source"] == "Weird name"
    assert "batch" not in f and "row_uuid" not in f and "tenure_months" in f
    notes = "\n".join(draft.notes)
    assert "batch: left out, constant" in notes and "row_uuid: left out, a different value on every row" in notes
    assert "reads it from 'score'" in notes and "label: 'defaulted', its name reads like an outcome" in notes


def test_label_and_event_time_flags_win_and_bad_choices_are_one_line_errors():
    frame = _loans().rename(columns={"defaulted": "label"})
    frame["flag"] = (frame.amount > 3000).astype(int)
    draft = draft_spec(pa.Table.from_pandas(frame, preserve_index=False), "x", label="label")
    assert draft.spec["label"] == {"name": "label_value", "source": "label", "attribution_window": "1d",
                                   "missing": "drop"} and "flag" in draft.spec["features"]
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with pytest.raises(SpecError, match="--label 'region' is not a binary 0/1"):
        draft_spec(table, "x", label="region")
    with pytest.raises(SpecError, match="--event-time 'nope': no such column"):
        draft_spec(table, "x", event_time="nope")
    with pytest.raises(SpecError, match="no event-time column found"):
        draft_spec(table.drop(["applied_at"]), "x")
