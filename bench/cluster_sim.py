"""Nightly training on a shared GPU cluster vs a dedicated one: a week of a simulated cluster (issue 15).

One shared cluster serves production and other teams' work (the high-priority load: a daily pattern, a weekend dip,
seeded random bursts). N models each need one incremental training job per night, released when their data day
(local midnight) has been collected and validated, due a fixed number of hours later. Three policies:

  dedicated    a separate training cluster sized for the peak of the nightly jobs (each at its fixed size)
  preemptible  fixed-size (gang) jobs at low priority on the shared cluster: a job starts only when its whole size
               is free and is killed whole when the high-priority load needs the GPUs, then requeued
  elastic      torchrun-elastic jobs (min..max GPUs) at low priority on the shared cluster: they start at `min`,
               grow into idle GPUs, shrink when the high-priority load needs them, and are suspended only below
               `min`; every membership change restarts the workers from the last checkpoint

The clock is discrete (one-minute ticks): at each tick the high-priority demand is served first (it always fits;
training is preempted to make room), then queued training is admitted earliest-deadline-first. A stopped job
(preempted, or restarted by torchrun for a membership change) saves a checkpoint at its next step when it is
stopped gracefully: Kubernetes sends SIGTERM and waits the pod's grace period, torchrun's agent does the same to its
workers, and `pipeline.learn.checkpoint` saves on SIGTERM in whichever rank receives it
(`tests/integration/test_ddp.py`). `graceful_stops=False` models hard kills instead: the work since the last
periodic checkpoint is lost and redone. Every assumption is a field of `Scenario`, printed with the results.

    .venv/bin/python bench/cluster_sim.py            # writes bench/results/cluster_sim.{md,png,json}; ~10 s

The last stdout line is JSON: `utilisation` and `deadline_misses` per policy, and more.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
POLICIES = ("dedicated", "preemptible", "elastic")
DAY = 24 * 60


@dataclass(frozen=True)
class Model:
    name: str
    gpu_hours: float  # one night's training work at 1 GPU-efficiency, before scaling losses
    utc_offset_h: int  # its data day ends at local midnight
    size: int = 0  # the fixed-size job's GPUs (dedicated and preemptible); 0 = sized by `sized`
    min_gpus: int = 0
    max_gpus: int = 0


def sized(m: Model, run_h: float, per_doubling: float, jitter: float) -> Model:
    """How an operator sizes a fixed job: the fewest GPUs (a power of two) that finish the largest night in
    `run_h`; the elastic job may shrink to a quarter of that and grow to twice it."""
    n = 1
    while m.gpu_hours * (1 + jitter) / (n * per_doubling ** math.log2(n)) > run_h:
        n *= 2
    return Model(m.name, m.gpu_hours, m.utc_offset_h, n, max(1, n // 4), 2 * n)


@dataclass(frozen=True)
class Scenario:
    seed: int = 15
    days: int = 7
    tail_days: int = 1  # the last night's jobs may finish after the week; utilisation is measured over `days`
    cluster_gpus: int = 512
    hp_mean: float = 0.70  # high-priority load as a share of the cluster, weekly mean before bursts
    hp_daily_amplitude: float = 0.22  # half the peak-to-trough swing of the daily pattern
    hp_peak_hour_utc: float = 15.0
    hp_weekend_factor: float = 0.85
    hp_noise: float = 0.02  # sd of a slow (hourly) random walk around the pattern
    burst_rate_per_day: float = 4.0
    burst_share: tuple[float, float] = (0.03, 0.12)  # extra demand of one burst, share of the cluster
    burst_minutes: tuple[int, int] = (20, 180)
    pipeline_delay_min: int = 30  # collect + validate after the data day ends, before training is released
    promote_min: int = 15  # evaluate + register + roll out after training
    deadline_h: float = 8.0  # from the end of the data day to the promoted model
    checkpoint_min: int = 10  # checkpoint interval (wall minutes of running)
    graceful_stops: bool = True  # a stop saves at the next step (SIGTERM + grace period) instead of losing work
    restart_min: int = 3  # rendezvous + checkpoint load + warm-up after any (re)start: GPUs held, no progress
    scaling_per_doubling: float = 0.95  # throughput efficiency lost each time the worker count doubles
    grow_hold_min: int = 30  # an elastic job grows at most this often (a membership change costs a restart)
    elastic_headroom: float = 0.04  # share of the cluster elastic jobs leave idle, so small bursts preempt nothing
    night_jitter: float = 0.10  # night-to-night spread of the work (incremental.md: cost last/first 0.8-1.1)
    fixed_run_h: float = 5.0  # a fixed-size job is sized to finish its largest night in this many hours
    models: tuple[Model, ...] = field(default_factory=lambda: (
        Model("ctr-us", 96, -5), Model("ctr-eu", 64, 1), Model("ctr-apac", 48, 8), Model("ranking", 160, 0),
        Model("fraud", 24, 0), Model("churn", 16, -8), Model("search-us", 120, -5), Model("reco", 200, 0)))

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(
            m if m.size else sized(m, self.fixed_run_h, self.scaling_per_doubling, self.night_jitter)
            for m in self.models))


@dataclass
class Job:
    model: Model
    night: int
    release: int
    due: int
    day_end: int
    work: float  # GPU-minutes of useful work still to do (at efficiency 1)
    total: float
    alloc: int = 0
    warm_at: int = 0  # progress starts at this tick (restart overhead)
    last_change: int = -10**9
    running_since_ckpt: int = 0
    since_ckpt: float = 0.0
    finished: int | None = None
    preemptions: int = 0
    restarts: int = 0
    wasted: float = 0.0
    gpu_minutes: float = 0.0

    def rate(self, n: int, s: Scenario) -> float:
        return 0.0 if n <= 0 else n * s.scaling_per_doubling ** math.log2(n)

    def slack(self, now: int, s: Scenario) -> float:
        return self.due - s.promote_min - now - self.work / max(self.rate(self.model.size, s), 1e-9)


def hp_demand(s: Scenario) -> np.ndarray:
    """High-priority GPUs in use at each minute: a daily cosine, a weekend dip, a slow random walk, bursts."""
    rng = np.random.default_rng(s.seed)
    n = (s.days + s.tail_days) * DAY
    t = np.arange(n)
    hour = (t % DAY) / 60.0
    share = s.hp_mean + s.hp_daily_amplitude * np.cos(2 * np.pi * (hour - s.hp_peak_hour_utc) / 24)
    weekday = (t // DAY) % 7
    share = share * np.where(weekday >= 5, s.hp_weekend_factor, 1.0)
    walk = np.repeat(np.cumsum(rng.normal(0, s.hp_noise, n // 60 + 1)) * 0.3, 60)[:n]
    share = share + walk - walk.mean()
    for _ in range(rng.poisson(s.burst_rate_per_day * (s.days + s.tail_days))):
        start = int(rng.integers(0, n))
        share[start:start + int(rng.integers(*s.burst_minutes))] += rng.uniform(*s.burst_share)
    return np.clip(np.round(share * s.cluster_gpus), 0, s.cluster_gpus).astype(int)


def make_jobs(s: Scenario) -> list[Job]:
    rng = np.random.default_rng(s.seed + 1)
    jobs = []
    for night in range(s.days):
        for m in s.models:
            day_end = (night + 1) * DAY - m.utc_offset_h * 60
            work = m.gpu_hours * 60 * float(rng.uniform(1 - s.night_jitter, 1 + s.night_jitter))
            jobs.append(Job(m, night, day_end + s.pipeline_delay_min, day_end + int(s.deadline_h * 60), day_end,
                            work, work))
    return jobs


class Cluster:
    """Allocations of one policy; `trace` keeps per-minute totals for the invariants and the plot."""

    def __init__(self, s: Scenario, policy: str, hp: np.ndarray, capacity: int) -> None:
        self.s, self.policy, self.hp, self.capacity = s, policy, hp, capacity
        self.jobs = make_jobs(s)
        n = len(hp)
        self.trace = {"hp": np.zeros(n, int), "train": np.zeros(n, int), "useful": np.zeros(n)}

    def _stop(self, job: Job, now: int, keep: int) -> None:
        """Take GPUs away. Stopped gracefully the workers save at their next step (a step is seconds, well inside a
        grace period); killed hard, everything since the last checkpoint is lost (torchrun restarts from it)."""
        if not self.s.graceful_stops:
            job.work += job.since_ckpt
            job.wasted += job.since_ckpt
        job.since_ckpt, job.running_since_ckpt = 0.0, 0
        job.preemptions += 1
        job.alloc = keep
        if keep:
            self._restart(job, now)

    def _restart(self, job: Job, now: int) -> None:
        job.warm_at = now + self.s.restart_min
        job.last_change = now
        job.restarts += 1

    def _preempt(self, now: int, need: int) -> None:
        active = sorted((j for j in self.jobs if j.alloc), key=lambda j: -j.slack(now, self.s))
        if self.policy == "elastic":
            for j in active:
                if need <= 0:
                    return
                give = min(need, j.alloc - j.model.min_gpus)
                if give > 0:
                    need -= give
                    self._stop(j, now, j.alloc - give)
        for j in active:
            if need <= 0:
                return
            if j.alloc:
                need -= j.alloc
                self._stop(j, now, 0)

    def _admit(self, now: int, free: int) -> int:
        waiting = sorted((j for j in self.jobs if j.finished is None and j.release <= now), key=lambda j: j.due)
        elastic = self.policy == "elastic"
        spare = free - (int(self.s.elastic_headroom * self.capacity) if elastic else 0)
        for j in waiting:
            if j.alloc:
                continue
            want = j.model.size if not elastic else min(j.model.max_gpus, max(spare, j.model.min_gpus))
            if want <= free and (not elastic or want <= spare or j.slack(now, self.s) < 0):
                j.alloc = want
                free -= want
                spare -= want
                self._restart(j, now)
        free = min(free, spare) if elastic else free
        if elastic:
            for j in waiting:
                if j.alloc and free > 0 and now - j.last_change >= self.s.grow_hold_min and j.alloc < j.model.max_gpus:
                    add = min(free, j.model.max_gpus - j.alloc)
                    if add >= max(1, j.alloc // 2):  # a restart is worth it only for a real step up
                        self._stop(j, now, j.alloc + add)
                        j.preemptions -= 1  # growing is a membership change, not a preemption
                        free -= add
        return free

    def _progress(self, now: int) -> None:
        s = self.s
        for j in self.jobs:
            if not j.alloc:
                continue
            j.gpu_minutes += j.alloc
            if now < j.warm_at:
                continue
            done = min(j.work, j.rate(j.alloc, s))
            j.work -= done
            j.since_ckpt += done
            self.trace["useful"][now] += done
            j.running_since_ckpt += 1
            if j.running_since_ckpt >= s.checkpoint_min:
                j.since_ckpt, j.running_since_ckpt = 0.0, 0
            if j.work <= 1e-9:
                j.finished, j.alloc, j.since_ckpt = now + 1, 0, 0.0

    def run(self) -> Cluster:
        for now in range(len(self.hp)):
            hp = int(self.hp[now]) if self.policy != "dedicated" else 0
            used = sum(j.alloc for j in self.jobs)
            if hp + used > self.capacity:
                self._preempt(now, hp + used - self.capacity)
            used = sum(j.alloc for j in self.jobs)
            self._admit(now, self.capacity - hp - used)
            self.trace["hp"][now] = hp
            self.trace["train"][now] = sum(j.alloc for j in self.jobs)
            self._progress(now)
        return self


def dedicated_size(s: Scenario) -> int:
    """The peak of the nightly jobs, each at its fixed size from its release: what a dedicated cluster must have."""
    c = Cluster(s, "dedicated", np.zeros((s.days + s.tail_days) * DAY, int), 10**9).run()
    return int(c.trace["train"].max())


def summarise(c: Cluster, s: Scenario) -> dict:
    week = s.days * DAY
    busy = c.trace["hp"][:week].sum() + c.trace["train"][:week].sum()
    fresh: dict[str, list[float]] = {}
    misses = 0
    for j in c.jobs:
        promoted = (j.finished + s.promote_min) if j.finished is not None else None
        hours = (promoted - j.day_end) / 60 if promoted is not None else math.inf
        fresh.setdefault(j.model.name, []).append(hours)
        misses += promoted is None or promoted > j.due
    train_h = sum(j.gpu_minutes for j in c.jobs) / 60
    return {
        "gpus": c.capacity,
        "utilisation": round(float(busy) / (c.capacity * week), 4),
        "hp_only_utilisation": round(float(c.trace["hp"][:week].sum()) / (c.capacity * week), 4),
        "gpu_hours_paid": round(c.capacity * week / 60, 1),
        "extra_gpu_hours_paid": round(c.capacity * week / 60 if c.policy == "dedicated" else 0.0, 1),
        "training_gpu_hours": round(train_h, 1),
        "useful_gpu_hours": round(sum(j.total for j in c.jobs) / 60, 1),
        "wasted_gpu_hours": round(sum(j.wasted for j in c.jobs) / 60, 1),
        "preemptions": sum(j.preemptions for j in c.jobs),
        "restarts": sum(j.restarts for j in c.jobs),
        "deadline_misses": misses,
        "model_nights": len(c.jobs),
        "freshness_h": {m: {"mean": round(float(np.mean(v)), 2), "max": round(float(np.max(v)), 2)}
                        for m, v in fresh.items()},
    }


def measured_costs() -> dict:
    """What the repo measured about a night's training, quoted so the job sizes' basis is visible."""
    out: dict = {}
    md = RESULTS / "train_gpu.md"
    if md.exists():
        found = re.findall(r"^\{.*\"samples_per_s\".*\}$", md.read_text(), re.M)
        if found:
            run = json.loads(found[-1])
            out["train_gpu"] = {k: run.get(k) for k in ("device", "samples_per_s", "rows", "epochs", "params")}
    inc = RESULTS / "incremental.json"
    if inc.exists():
        summary = json.loads(inc.read_text()).get("summary", {})
        out["incremental_cost_last_vs_first"] = {k: v.get("d", {}).get("cost_ratio_last_vs_first")
                                                 for k, v in summary.items()}
    return out


def simulate(s: Scenario) -> tuple[dict, dict[str, Cluster]]:
    hp = hp_demand(s)
    clusters = {"dedicated": Cluster(s, "dedicated", hp, dedicated_size(s)).run(),
                "preemptible": Cluster(s, "preemptible", hp, s.cluster_gpus).run(),
                "elastic": Cluster(s, "elastic", hp, s.cluster_gpus).run()}
    return {p: summarise(c, s) for p, c in clusters.items()}, clusters


def sweep(s: Scenario, means: tuple[float, ...]) -> list[dict]:
    """The same week under heavier or lighter high-priority load, with graceful stops and with hard kills: where
    each shared policy starts missing."""
    rows = []
    for graceful in (True, False):
        for mean in means:
            fields = {k: getattr(s, k) for k in s.__dataclass_fields__}
            r, _ = simulate(Scenario(**{**fields, "hp_mean": mean, "graceful_stops": graceful}))
            rows.append({"hp_mean": mean, "graceful_stops": graceful,
                         **{p: {k: r[p][k] for k in ("utilisation", "deadline_misses", "wasted_gpu_hours",
                                                     "preemptions")} for p in ("preemptible", "elastic")}})
    return rows


def sweep_table(rows: list[dict]) -> str:
    out = ["| stops | high-priority mean | preemptible: utilisation / misses / wasted GPU-h | "
           "elastic: utilisation / misses / wasted GPU-h |", "|---|---:|---|---|"]
    for r in rows:
        cells = [f"{r[p]['utilisation']:.1%} / {r[p]['deadline_misses']} / {r[p]['wasted_gpu_hours']:,.0f}"
                 for p in ("preemptible", "elastic")]
        out.append(f"| {'graceful' if r['graceful_stops'] else 'hard kill'} | {r['hp_mean']:.2f} | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(clusters: dict[str, Cluster], summary: dict, s: Scenario, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(12, 10))
    week = s.days * DAY
    hours = np.arange(week) / 60
    for ax, policy in zip(axes[:2], ("preemptible", "elastic"), strict=True):
        t = clusters[policy].trace
        ax.stackplot(hours, t["hp"][:week], t["train"][:week], labels=["high-priority load", "training"],
                     colors=["#9bb7d4", "#e07b39"], linewidth=0)
        ax.axhline(s.cluster_gpus, color="k", lw=0.8)
        ax.set_title(f"shared cluster, {policy}: utilisation {summary[policy]['utilisation']:.0%}, "
                     f"deadline misses {summary[policy]['deadline_misses']}")
        ax.set_ylabel("GPUs")
        ax.set_xlim(0, week / 60)
        ax.legend(loc="lower right", fontsize=8)
    names = [m.name for m in s.models]
    x = np.arange(len(names))
    for i, policy in enumerate(POLICIES):
        worst = [min(summary[policy]["freshness_h"][n]["max"], s.deadline_h * 2) for n in names]
        axes[2].bar(x + (i - 1) * 0.27, worst, 0.27, label=policy)
    axes[2].axhline(s.deadline_h, color="r", ls="--", lw=1, label="deadline")
    axes[2].set_xticks(x, names)
    axes[2].set_ylabel("worst freshness (h)")
    axes[2].legend(fontsize=8)
    axes[2].set_xlabel("model")
    axes[1].set_xlabel("hour of the week (UTC)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(summary: dict, s: Scenario) -> str:
    rows = ["| policy | GPUs | utilisation | high-priority only | extra GPU-h paid | training GPU-h (useful / "
            "wasted) | preemptions | restarts | deadline misses | worst freshness (h) |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for p in POLICIES:
        r = summary[p]
        worst = max(v["max"] for v in r["freshness_h"].values())
        hp = "-" if p == "dedicated" else f"{r['hp_only_utilisation']:.1%}"
        rows.append(f"| {p} | {r['gpus']} | {r['utilisation']:.1%} | {hp} | {r['extra_gpu_hours_paid']:,.0f} | "
                    f"{r['training_gpu_hours']:,.0f} ({r['useful_gpu_hours']:,.0f} / {r['wasted_gpu_hours']:,.0f}) | "
                    f"{r['preemptions']} | {r['restarts']} | {r['deadline_misses']}/{r['model_nights']} | "
                    f"{worst:.2f} |")
    rows += ["", "Freshness per model, mean / worst hours from the end of its data day to its promoted model "
             f"(deadline {s.deadline_h:g} h):", "", "| model | " + " | ".join(POLICIES) + " |",
             "|---|" + "---|" * len(POLICIES)]
    for m in s.models:
        cells = [f"{summary[p]['freshness_h'][m.name]['mean']:.2f} / {summary[p]['freshness_h'][m.name]['max']:.2f}"
                 for p in POLICIES]
        rows.append(f"| {m.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=Scenario.seed)
    ap.add_argument("--cluster-gpus", type=int, default=Scenario.cluster_gpus)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    s = Scenario(seed=args.seed, cluster_gpus=args.cluster_gpus)
    summary, clusters = simulate(s)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(clusters, summary, s, args.out / "cluster_sim.png")
    assumptions = {k: v for k, v in asdict(s).items() if k != "models"}
    assumptions["models"] = [asdict(m) for m in s.models]
    measured = measured_costs()
    report = {"utilisation": {p: summary[p]["utilisation"] for p in POLICIES},
              "deadline_misses": {p: summary[p]["deadline_misses"] for p in POLICIES},
              "extra_gpu_hours_paid": {p: summary[p]["extra_gpu_hours_paid"] for p in POLICIES},
              "wasted_gpu_hours": {p: summary[p]["wasted_gpu_hours"] for p in POLICIES},
              "preemptions": {p: summary[p]["preemptions"] for p in POLICIES},
              "hp_only_utilisation": summary["elastic"]["hp_only_utilisation"]}
    sens = sweep(s, (0.6, 0.7, 0.75, 0.8, 0.85))
    report["sweep"] = sens
    print(table(summary, s))
    print("\nSensitivity to the high-priority load (same seed, models and deadlines):\n")
    print(sweep_table(sens))
    print("\nassumptions:", json.dumps(assumptions))
    print("measured inputs:", json.dumps(measured))
    (args.out / "cluster_sim.json").write_text(json.dumps({"summary": summary, "assumptions": assumptions,
                                                           "measured": measured, "sweep": sens}, indent=1))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
