"""Canary decisions against a real MLflow server: a challenger that served a share of live traffic is retired
when it is worse than the champion on its own rows, promoted when at least as good, and left waiting on
too few labels."""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pytest

from pipeline import registry
from pipeline.learn.model import ModelBundle
from pipeline.release.canary import canary_eval
from pipeline.tags import Alias, Tag
from tests.helpers import loans_frame
from tests.integration.test_online_eval import DAY, degraded, register_bundle, rt  # noqa: F401 - shared fixture

pytestmark = pytest.mark.integration


def make_challenger(r, bundle: ModelBundle) -> str:
    version = register_bundle(r, bundle)
    r.client().set_registered_model_alias(r.model_name, Alias.CHALLENGER, version)
    return version


def canary_day(r, bundle: ModelBundle, version: str, n: int) -> None:
    """training/dt=DAY with half the rows served by the champion (v1) and half by the challenger."""
    frame = loans_frame(DAY, 2 * n, seed=21)
    v1 = registry.load_version(r.client(), r.model_name, "1", r.cache_dir)
    scores = np.concatenate([v1.predict(frame.iloc[:n]), bundle.predict(frame.iloc[n:])])
    frame = frame.assign(request_id=[uuid.uuid4().hex for _ in range(len(frame))], row=0,
                         served_at=frame.applied_at, model_version=["1"] * n + [version] * n, score=scores,
                         defaulted=frame.defaulted.astype(float))
    r.lake.write_partition("training", DAY, pa.Table.from_pandas(frame, preserve_index=False))


def test_a_worse_challenger_is_retired(rt):  # noqa: F811
    bad = degraded(rt)
    version = make_challenger(rt, bad)
    canary_day(rt, bad, version, 600)
    result = canary_eval(DAY, rt)
    client = rt.client()
    assert result.decision == "retired", result.reason
    assert registry.get_alias(client, rt.model_name, Alias.CHALLENGER) is None
    assert registry.get_alias(client, rt.model_name, Alias.CHAMPION).version == "1"
    assert registry.get_version(client, rt.model_name, version).tags[Tag.CANARY].startswith("retired")


def test_an_equal_challenger_is_promoted_and_too_few_labels_wait(rt):  # noqa: F811
    same = registry.load_version(rt.client(), rt.model_name, "1", rt.cache_dir)
    version = make_challenger(rt, same)
    canary_day(rt, same, version, 20)
    assert canary_eval(DAY, rt).decision == "wait"
    canary_day(rt, same, version, 600)
    result = canary_eval(DAY, rt)
    client = rt.client()
    assert result.decision == "promoted", result.reason
    assert registry.get_alias(client, rt.model_name, Alias.CHAMPION).version == version
    assert registry.get_alias(client, rt.model_name, Alias.PREVIOUS).version == "1"
