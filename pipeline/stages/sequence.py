"""The nightly sequence, declared once. `stages.nightly` runs it in-process, the nightly DAG makes one task per
entry (the task id is the stage's name), and `flywheel nightly` names them in its help; none of them lists
the stages again (`flywheel <name>` runs one by hand, with that stage's own options).

Only names and import paths live here: the DAG file reads this at parse time, which must not import pandas,
torch or MLflow. Each stage takes the run's day (if `dated`) and the fields of earlier results it names in
`inputs`; those come from pydantic results in-process and from their XCom dicts in Airflow, alike."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date
from importlib import import_module
from typing import Any


def _field(results: Mapping[str, Any], ref: str) -> Any:
    """`stage` is that stage's whole result, `stage.field` one field of it (a dict from XCom or a model)."""
    stage, _, field = ref.partition(".")
    value = results[stage]
    if not field:
        return value
    return value[field] if isinstance(value, Mapping) else getattr(value, field)


@dataclass(frozen=True)
class Stage:
    """One nightly step: `target` is "module:function", imported only when the stage runs."""

    name: str
    target: str
    inputs: tuple[str, ...] = ()
    dated: bool = True
    when: str | None = None  # "stage.field": the stage runs only if that earlier result is true
    doc: str = ""

    def function(self) -> Callable[..., Any]:
        module, _, attr = self.target.partition(":")
        return getattr(import_module(module), attr)

    def arguments(self, day: str | date, results: Mapping[str, Any]) -> list[Any]:
        return ([day] if self.dated else []) + [_field(results, ref) for ref in self.inputs]

    def needs(self) -> tuple[str, ...]:
        """The earlier stages whose results this one reads (its data dependencies in the DAG)."""
        refs = (*self.inputs, *([self.when] if self.when else []))
        return tuple(dict.fromkeys(ref.partition(".")[0] for ref in refs))

    def skip_reason(self, results: Mapping[str, Any]) -> str | None:
        """Why the stage does not run tonight (its `when` is false), or None when it runs."""
        if self.when is None or _field(results, self.when):
            return None
        earlier = self.when.partition(".")[0]
        why = _field(results, f"{earlier}.reason") if "reason" in _keys(results[earlier]) else ""
        return f"{self.when} is false{f': {why}' if why else ''}"

    def run(self, day: str | date, results: Mapping[str, Any], *extra: Any) -> Any:
        """Call the stage with its arguments, then `extra` (the in-process runner passes its Runtime)."""
        return self.function()(*self.arguments(day, results), *extra)


def _keys(result: Any) -> set[str]:
    return set(result) if isinstance(result, Mapping) else set(type(result).model_fields)


NIGHTLY: tuple[Stage, ...] = (
    Stage("collect", "pipeline.stages.collect:collect",
          doc="Reads the sealed `logs/predictions` and `logs/feedback` segments of D; writes `training/dt=D` "
              "(joined, labelled, deduplicated) and lists rejected and late segments."),
    Stage("validate", "pipeline.stages.validate:validate",
          doc="Reads `training/dt=D`; writes `validated/dt=D`, `quarantine/dt=D` (with the reason), `drift/dt=D` "
              "and the report in `reports/validation/dt=D`. Fails the night when the gate fails."),
    Stage("train", "pipeline.stages.train:train",
          doc="Reads `validated/dt=D`, the replay reservoir and the champion; writes one MLflow run "
              "(warm-started weights, metrics, the day's validation report) and updates the reservoir."),
    Stage("evaluate", "pipeline.stages.evaluate:evaluate", inputs=("train.run_id",),
          doc="Reads the candidate run and the champion; scores both on D's held-out slice and logs the "
              "evaluation report (paired CIs, calibration, slices) to the candidate's run."),
    Stage("register", "pipeline.stages.register:register_candidate", inputs=("evaluate",),
          doc="Registers the candidate as a model version with its lineage and gate outcome (tags); a passing "
              "candidate becomes `challenger`."),
    Stage("promote", "pipeline.stages.promote:promote", inputs=("register.version",), dated=False,
          doc="Moves `champion` to the candidate when it passed (and was approved in review mode), keeping the "
              "replaced one as `previous`; compare-and-set under the registry lock."),
    Stage("rollout", "pipeline.stages.promote:rollout", dated=False, when="promote.promoted",
          doc="Asks the model server to reload and waits until it serves the new champion."),
)
"""The nightly stages in order: each runs after the one before it."""

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in NIGHTLY)


def stage(name: str) -> Stage:
    return next(s for s in NIGHTLY if s.name == name)
