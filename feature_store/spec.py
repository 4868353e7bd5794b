"""The feature spec: one YAML file declaring entities, features, event time and label.

Everything downstream (request validation, log schema, expectation suite, model inputs) is derived from it, so a
mistake here must surface at load time with the file and the offending key named, not as a KeyError mid-night.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import SpecError

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
RESERVED = frozenset(
    {"request_id", "row", "score", "model_version", "served_at", "label", "label_time", "dt", "reason", "_row_id"}
)


class FeatureType(StrEnum):
    NUMERIC = "numeric"
    CATEGORICAL = "categorical"


def parse_duration(value: object) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=float(value))
    if isinstance(value, str) and (m := _DURATION.match(value)):
        return timedelta(**{_UNITS[m.group(2)]: float(m.group(1))})
    raise ValueError(f"expected a duration like '30m', '2h', '1d' or seconds, got {value!r}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Entity(_Strict):
    key: str = Field(description="Request column that identifies the entity.")
    description: str = ""


class Feature(_Strict):
    type: FeatureType
    entity: str | None = Field(default=None, description="Entity this feature describes, if any.")
    min: FiniteFloat | None = None
    max: FiniteFloat | None = None
    nullable: bool = False
    source: str | None = Field(default=None, min_length=1, description="Column of the user's files (history, "
                               "entity tables) this feature is read from, when its name there differs: lets a "
                               "column named like one of Flywheel's log columns keep its name at the source.")
    description: str = ""

    @model_validator(mode="after")
    def _range(self) -> Feature:
        if self.type is FeatureType.CATEGORICAL and (self.min is not None or self.max is not None):
            raise ValueError("min/max only apply to numeric features")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self


class Label(_Strict):
    name: str
    source: str | None = Field(default=None, min_length=1, description="Column of the history file holding "
                               "the label, when it differs from `name` (e.g. a column called 'label').")
    attribution_window: timedelta = Field(description="How long after a prediction its feedback still counts.")
    missing: Literal["negative", "drop"] = Field(
        default="negative", description="Rows whose feedback never arrives: a negative example, or dropped."
    )

    @field_validator("attribution_window", mode="before")
    @classmethod
    def _duration(cls, v: object) -> timedelta:
        window = parse_duration(v)
        if not timedelta(0) < window < timedelta(days=3650):
            raise ValueError(f"must be positive and finite (a window of {v!r} would never join a label)")
        return window


class Slice(_Strict):
    """A subpopulation the promotion gate checks on its own, so a candidate cannot trade a regression on, say,
    new users for a gain on everyone else. `category`: one slice per value of a categorical feature (its most
    frequent `top` values). `new_vs_returning`: rows whose value the parent model's vocabulary already knew
    (returning) against those it did not (new)."""

    feature: str
    kind: Literal["category", "new_vs_returning"] = "category"
    top: int = Field(default=10, ge=1, description="category slices: how many of the most frequent values.")
    description: str = ""


class Migration(_Strict):
    """A declared change of the model's inputs, so a warm start can carry the parent's weights over instead of
    refusing: `added` features start with zero input weights (the parent's predictions are unchanged until
    training moves them), `removed` features have their input weights dropped, `renamed` ones keep theirs."""

    added: list[str] = Field(default_factory=list, description="New features; their input weights start at zero.")
    removed: list[str] = Field(default_factory=list, description="Features dropped; their input weights go.")
    renamed: dict[str, str] = Field(default_factory=dict, description="old name -> new name; weights carried.")
    description: str = ""

    @model_validator(mode="after")
    def _disjoint(self) -> Migration:
        names = [*self.added, *self.removed, *self.renamed, *self.renamed.values()]
        for n in names:
            if not _IDENT.match(n):
                raise ValueError(f"{n!r} is not a valid column name (letters, digits, underscore)")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{twice} named more than once in one migration (added/removed/renamed)")
        if not names:
            raise ValueError("an empty migration: name features under added, removed or renamed")
        return self

    def apply(self, features: dict[str, str]) -> dict[str, str] | None:
        """The feature->type map after this migration, or None when it does not fit `features` (a removed or
        renamed feature absent, an added or new name already present). Added features get type '?': the spec
        they are checked against says what they are."""
        gone = [*self.removed, *self.renamed]
        if any(n not in features for n in gone) or any(n in features for n in [*self.added, *self.renamed.values()]
                                                       if n not in gone):
            return None
        out = {n: t for n, t in features.items() if n not in gone}
        out.update({new: features[old] for old, new in self.renamed.items()})
        out.update(dict.fromkeys(self.added, "?"))
        return out


class MigrationPlan(BaseModel):
    """The declared migrations that turn a parent model's features into the spec's, in order."""

    steps: list[Migration]
    added: list[str]
    removed: list[str]
    renamed: dict[str, str]

    def summary(self) -> str:
        return json.dumps({"added": self.added, "removed": self.removed, "renamed": self.renamed}, sort_keys=True)


class FeatureSpec(_Strict):
    name: str
    event_time: str = Field(description="Optional request column with the event's time; partitions the log.")
    entities: dict[str, Entity] = Field(default_factory=dict)
    features: dict[str, Feature]
    label: Label
    slices: dict[str, Slice] = Field(default_factory=dict, description="Evaluation slices, gated one by one.")
    migrations: list[Migration] = Field(
        default_factory=list, description="Declared feature changes, oldest first, that warm starts may apply.")
    description: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        names = [self.name, self.event_time, self.label.name, *self.features]
        for n in names:
            if not _IDENT.match(n):
                raise ValueError(f"{n!r} is not a valid column name (letters, digits, underscore)")
        for n in [self.event_time, self.label.name, *self.features]:
            if n in RESERVED:
                where = "label.name" if n == self.label.name else "event_time" if n == self.event_time else \
                    f"features.{n}"
                raise ValueError(f"{where}: {n!r} is reserved for Flywheel's own log columns; keep the column as "
                                 f"it is and give it another name that reads it, e.g. {_rename_hint(where, n)}")
        columns = list(self.source_columns.values())
        if twice := sorted({c for c in columns if columns.count(c) > 1}):
            raise ValueError(f"source column(s) {twice} read by more than one of features/label/event_time")
        if not self.features:
            raise ValueError("at least one feature is required")
        if self.label.name in self.features or self.event_time in self.features:
            raise ValueError("label and event_time must not also be features")
        for fname, f in self.features.items():
            if f.entity is not None and f.entity not in self.entities:
                raise ValueError(f"feature {fname!r} names unknown entity {f.entity!r}")
        for ename, e in self.entities.items():
            if e.key not in self.features:
                raise ValueError(f"entity {ename!r} key {e.key!r} is not a declared feature")
        for sname, sl in self.slices.items():
            if sl.feature not in self.features:
                raise ValueError(f"slice {sname!r} names unknown feature {sl.feature!r}")
            if self.features[sl.feature].type is not FeatureType.CATEGORICAL:
                raise ValueError(f"slice {sname!r}: feature {sl.feature!r} must be categorical to slice on")
        if self.migrations:
            last = self.migrations[-1]
            if absent := [n for n in [*last.added, *last.renamed.values()] if n not in self.features]:
                raise ValueError(f"migrations[{len(self.migrations) - 1}] adds or renames to {absent}, which are "
                                 "not declared under features")
            if present := [n for n in [*last.removed, *last.renamed] if n in self.features]:
                raise ValueError(f"migrations[{len(self.migrations) - 1}] removes or renames away {present}, which "
                                 "are still declared under features")
        return self

    def plan_migration(self, parent: dict[str, str]) -> MigrationPlan:
        """The declared migrations (a suffix of `migrations`, oldest first) that turn the parent model's features
        (name -> 'numeric'/'categorical') into this spec's exactly. Anything else is refused with the difference
        named, so a model can never be warm-started with its inputs silently misaligned."""
        target = {n: f.type.value for n, f in self.features.items()}
        if parent == target:
            return MigrationPlan(steps=[], added=[], removed=[], renamed={})
        for start in range(len(self.migrations)):
            state: dict[str, str] | None = dict(parent)
            for m in self.migrations[start:]:
                state = m.apply(state)
                if state is None:
                    break
            if state is not None and {n: target.get(n) if t == "?" else t for n, t in state.items()} == target:
                return self._plan(parent, self.migrations[start:])
        added = sorted(set(target) - set(parent))
        removed = sorted(set(parent) - set(target))
        retyped = sorted(n for n in set(target) & set(parent) if target[n] != parent[n])
        what = "; ".join(p for p in (f"added {added}" if added else "", f"removed {removed}" if removed else "",
                                     f"type changed {retyped}" if retyped else "") if p)
        declared = json.dumps([m.model_dump(exclude_defaults=True) for m in self.migrations])
        declared = f" (the declared migrations {declared} do not explain it)" if self.migrations else ""
        raise SpecError(
            f"feature spec {self.name!r} differs from the parent model's features: {what or 'same features'}"
            f"{declared}; declare the change under the spec's top-level 'migrations:' key (a list entry with "
            "'added:', 'removed:' and/or 'renamed: {old: new}'), or bootstrap a new model")

    @staticmethod
    def _plan(parent: dict[str, str], steps: list[Migration]) -> MigrationPlan:
        names = {n: n for n in parent}  # original name -> current name
        added: list[str] = []
        for m in steps:
            for old, new in m.renamed.items():
                names = {o: new if c == old else c for o, c in names.items()}
                added = [new if a == old else a for a in added]
            for r in m.removed:
                if r in added:
                    added.remove(r)
                names = {o: c for o, c in names.items() if c != r}
            added += m.added
        renamed = {o: c for o, c in names.items() if o != c}
        removed = sorted(set(parent) - set(names))
        return MigrationPlan(steps=steps, added=added, removed=removed, renamed=renamed)

    @cached_property
    def source_columns(self) -> dict[str, str]:
        """Spec name -> the column of the user's files it is read from (the same name unless `source` says)."""
        out = {n: f.source or n for n, f in self.features.items()}
        out[self.event_time] = self.event_time
        out[self.label.name] = self.label.source or self.label.name
        return out

    @cached_property
    def feature_names(self) -> list[str]:
        return list(self.features)

    @cached_property
    def categorical(self) -> list[str]:
        return [n for n, f in self.features.items() if f.type is FeatureType.CATEGORICAL]

    @cached_property
    def numeric(self) -> list[str]:
        return [n for n, f in self.features.items() if f.type is FeatureType.NUMERIC]

    @cached_property
    def digest(self) -> str:
        """Identity of the model-relevant part of the spec; a model trained on another digest needs a migration."""
        body = {"features": {n: f.type.value for n, f in self.features.items()}, "label": self.label.name}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def sticky_key(self) -> str | None:
        """The first entity's key: what canary routing and per-entity analysis key on."""
        return next(iter(self.entities.values())).key if self.entities else None


def _rename_hint(where: str, name: str) -> str:
    if where == "label.name":
        return f"label: {{name: {name}_value, source: {name}, ...}}"
    if where == "event_time":
        return f"rename the column; {name!r} cannot be an event time"
    return f"features: {{{name}_value: {{source: {name}, ...}}}}"


def _format_loc(loc: tuple[object, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise SpecError(f"{path}: feature spec not found") from e
    except IsADirectoryError as e:
        raise SpecError(f"{path}: is a directory, not a feature spec YAML file") from e
    except OSError as e:
        raise SpecError(f"{path}: cannot be read: {e.strerror}") from e
    if b"\0" in data:
        raise SpecError(f"{path}: a binary file, not a feature spec YAML (text) file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "save the spec as UTF-8") from None


def _duplicate_keys(node: yaml.Node, where: str = "") -> list[str]:
    """Keys written twice in one mapping, as dotted paths: YAML loaders keep the last silently, which turns a
    copy-paste slip into a feature that quietly lost its first declaration."""
    found: list[str] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else "?"
            path = f"{where}.{name}" if where else name
            if name in seen:
                found.append(f"{path} (line {key.start_mark.line + 1})")
            seen.add(name)
            found += _duplicate_keys(value, path)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, f"{where}[{i}]")
    return found


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def load_spec(path: str | Path) -> FeatureSpec:
    """The spec at `path`, or a SpecError whose one-line message names the file and the offending key."""
    path = Path(path)
    text = _read_text(path)
    try:
        twice = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML: {_one_line(e)}") from None
    if twice:
        raise SpecError(f"{path}: key written twice (only one may stay): {', '.join(twice)}")
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping at the top level")
    try:
        return FeatureSpec.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"key '{_format_loc(err['loc'])}': {_one_line(err['msg'])}" if err["loc"] else
                             _one_line(err["msg"]).removeprefix("Value error, ") for err in e.errors())
        raise SpecError(f"{path}: {problems}") from None
