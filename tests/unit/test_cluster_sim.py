"""The capacity simulation's book-keeping, not its numbers: the high-priority load is always served, no GPU is
allocated twice, and every GPU-minute of training is accounted for as useful, redone (lost on a preemption) or
overhead."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from pipeline.config import REPO


@pytest.fixture(scope="module")
def sim():
    spec = importlib.util.spec_from_file_location("cluster_sim", REPO / "bench" / "cluster_sim.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["cluster_sim"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(sim):
    s = sim.Scenario(days=2, cluster_gpus=128, hp_mean=0.78, models=(sim.Model("a", 40, 0), sim.Model("b", 24, -6),
                                                                         sim.Model("c", 12, 3)))
    return s, sim.simulate(s)


@pytest.mark.parametrize("policy", ["dedicated", "preemptible", "elastic"])
def test_no_gpu_is_over_allocated_and_high_priority_always_fits(runs, policy):
    s, (_, clusters) = runs
    c = clusters[policy]
    assert (c.trace["hp"] + c.trace["train"] <= c.capacity).all()
    if policy != "dedicated":
        assert (c.trace["hp"] == c.hp).all(), "training must never hold a GPU the high-priority load asked for"
    assert all(j.alloc == 0 for j in c.jobs)


@pytest.mark.parametrize("policy", ["dedicated", "preemptible", "elastic"])
def test_work_is_conserved(runs, policy):
    s, (summary, clusters) = runs
    c = clusters[policy]
    assert all(j.finished is not None and j.work <= 1e-6 for j in c.jobs)
    progressed = c.trace["useful"].sum()
    assert progressed == pytest.approx(sum(j.total + j.wasted for j in c.jobs))
    assert c.trace["train"].sum() == pytest.approx(sum(j.gpu_minutes for j in c.jobs))
    assert progressed <= c.trace["train"].sum(), "a GPU-minute yields at most one minute of work"
    for j in c.jobs:
        if policy == "elastic":
            assert j.alloc == 0 and j.model.min_gpus <= j.model.size <= j.model.max_gpus
    if policy == "dedicated":
        assert summary[policy]["preemptions"] == 0 and summary[policy]["wasted_gpu_hours"] == 0


def test_sizing_fits_the_fixed_run_and_jobs_never_start_before_release(sim, runs):
    s, (_, clusters) = runs
    for m in s.models:
        assert m.gpu_hours * (1 + s.night_jitter) / (m.size * s.scaling_per_doubling ** np.log2(m.size)) \
            <= s.fixed_run_h
    starts = clusters["elastic"].trace["train"]
    first_release = min(j.release for j in clusters["elastic"].jobs)
    assert starts[:first_release].sum() == 0


def test_graceful_stops_lose_no_work_and_hard_kills_redo_it(sim):
    """A stop with a grace period saves at the next step (what the trainer does on SIGTERM, any rank); a hard kill
    loses the work since the last periodic checkpoint, and that work is redone."""
    base = dict(days=2, cluster_gpus=128, hp_mean=0.85, models=(sim.Model("a", 40, 0), sim.Model("b", 24, -6),
                                                                sim.Model("c", 12, 3)))
    graceful, _ = sim.simulate(sim.Scenario(**base, graceful_stops=True))
    hard, _ = sim.simulate(sim.Scenario(**base, graceful_stops=False))
    assert graceful["elastic"]["preemptions"] > 0 and graceful["elastic"]["wasted_gpu_hours"] == 0
    assert hard["elastic"]["wasted_gpu_hours"] > 0
