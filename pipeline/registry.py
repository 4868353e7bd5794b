"""Everything that talks to the MLflow tracking server and model registry.

Versions carry their lineage as tags (`flywheel.*`), so the registry alone answers: which day's data trained
this version, from which parent, with which metrics and gate decision, and which run produced it.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from feature_store.spec import FeatureSpec, FeatureType
from pipeline import ledger
from pipeline.config import Settings
from pipeline.errors import AliasConflict, PromotionRefused, StageError
from pipeline.learn.model import ModelBundle
from pipeline.ledger import AliasMove
from pipeline.tags import Alias, Tag, Why

log = logging.getLogger("flywheel.registry")

PYFUNC_CODE = Path(__file__).parent / "learn" / "pyfunc_model.py"
PIP_REQUIREMENTS = ["torch", "pandas", "pyarrow", "safetensors", "mlflow"]


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]
    aliases: list[str]

    @property
    def data_day(self) -> date | None:
        return date.fromisoformat(self.tags[Tag.DAY]) if Tag.DAY in self.tags else None

    @classmethod
    def of(cls, mv: ModelVersion) -> VersionInfo:
        return cls(mv.name, str(mv.version), mv.run_id, dict(mv.tags or {}), list(mv.aliases or []))


def connect(settings: Settings) -> MlflowClient:
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    return MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)


def signature(spec: FeatureSpec) -> ModelSignature:
    cols = [ColSpec("double" if f.type is FeatureType.NUMERIC else "string", n) for n, f in spec.features.items()]
    return ModelSignature(inputs=Schema(cols), outputs=Schema([ColSpec("double", "score")]))


def bundle_digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def log_bundle(bundle: ModelBundle, spec: FeatureSpec, workdir: Path, input_example=None) -> str:
    """Log the bundle as the active run's pyfunc model; returns the model URI."""
    path = bundle.save(workdir / "bundle")
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(PYFUNC_CODE),
        artifacts={"bundle": str(path)},
        signature=signature(spec),
        input_example=input_example,
        pip_requirements=PIP_REQUIREMENTS,
    )
    mlflow.set_tags({Tag.BUNDLE: bundle_digest(path), Tag.MODEL_URI: info.model_uri, Tag.MODEL_ID: info.model_id})
    return info.model_uri


def get_alias(client: MlflowClient, name: str, alias: str) -> VersionInfo | None:
    try:
        return VersionInfo.of(client.get_model_version_by_alias(name, alias))
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def get_version(client: MlflowClient, name: str, version: str) -> VersionInfo:
    return VersionInfo.of(client.get_model_version(name, version))


def find_version(client: MlflowClient, name: str, tag: str, value: str) -> VersionInfo | None:
    found = client.search_model_versions(f"name = '{name}' and tags.`{tag}` = '{value}'")
    return VersionInfo.of(sorted(found, key=lambda mv: int(mv.version))[0]) if found else None


def register(client: MlflowClient, name: str, run_id: str, tags: dict[str, str]) -> VersionInfo:
    """Register the run's model once: a rerun of the same run returns the version it already made."""
    existing = find_version(client, name, Tag.RUN, run_id)
    if existing:
        return existing
    try:
        client.create_registered_model(name, description="Managed by Flywheel; aliases champion/challenger.")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # MLflow 3 keeps logged models apart from run artifacts: the version's source is the logged model
    # (models:/m-...), which is what `mlflow models serve -m models:/NAME/V` and the UI resolve.
    run = client.get_run(run_id)
    model_uri = run.data.tags.get(Tag.MODEL_URI, f"runs:/{run_id}/model")
    mv = client.create_model_version(name, model_uri, run_id=run_id, tags={**tags, Tag.RUN: run_id},
                                     model_id=run.data.tags.get(Tag.MODEL_ID),
                                     description=run.data.tags.get("mlflow.note.content", ""))
    if Tag.BUNDLE in run.data.tags:
        client.set_model_version_tag(name, mv.version, Tag.BUNDLE, run.data.tags[Tag.BUNDLE])
    return get_version(client, name, str(mv.version))


def parent_for_day(client: MlflowClient, name: str, day: date) -> VersionInfo | None:
    """The model that was champion before `day` was trained: the current champion, or, when a rerun finds the
    champion already trained on `day` or later, its ancestor. Keeps reruns of a day deterministic."""
    current = get_alias(client, name, Alias.CHAMPION)
    while current is not None and current.data_day is not None and current.data_day >= day:
        parent = current.tags.get(Tag.PARENT)
        current = get_version(client, name, parent) if parent else None
    return current


def _find_bundle(root: Path, what: str) -> Path:
    found = sorted(root.rglob("artifacts/bundle/config.json"))
    if not found:
        raise FileNotFoundError(f"{what} has no Flywheel bundle (artifacts/bundle) in its MLflow model")
    return found[0].parent


def download_bundle(client: MlflowClient, name: str, version: str, cache: Path) -> Path:
    """Fetch a version's bundle into a per-version cache dir and check it against the digest recorded at
    registration, so a tampered or truncated artifact is never served."""
    target = cache / name / version
    mv = client.get_model_version(name, version)
    expected = (mv.tags or {}).get(Tag.BUNDLE)
    if not (target / "config.json").exists():
        tmp = cache / name / f".tmp-{version}-{uuid.uuid4().hex[:8]}"  # several server workers load at once
        tmp.mkdir(parents=True)
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
            bundle = _find_bundle(Path(local), f"model {name} v{version}")
            if not (target / "config.json").exists():
                shutil.rmtree(target, ignore_errors=True)
                try:
                    bundle.rename(target)
                except OSError:  # another worker's copy landed first
                    if not (target / "config.json").exists():
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not expected:
        raise ValueError(f"model {name} v{version} has no {Tag.BUNDLE} tag (the artifact digest recorded at "
                         "registration): registered outside Flywheel or tampered with, refusing to serve it unchecked")
    if bundle_digest(target) != expected:
        shutil.rmtree(target, ignore_errors=True)
        raise ValueError(f"model {name} v{version}: artifact digest mismatch, refusing to load")
    return target


def rolled_back_days(client: MlflowClient, name: str) -> set[date]:
    """The data days of versions that were rolled back: live traffic judged what was learned from them."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{Tag.ROLLED_BACK}` = 'true'")
    return {date.fromisoformat(mv.tags[Tag.DAY]) for mv in found if Tag.DAY in (mv.tags or {})}


def fallback_versions(client: MlflowClient, name: str, broken: str) -> list[str]:
    """What a server falls back to when the champion cannot be loaded: `previous` and every earlier version
    that was champion once (never one rolled back), newest first."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{Tag.PROMOTED}` = 'true'")
    versions = {str(mv.version) for mv in found
                if int(mv.version) < int(broken) and (mv.tags or {}).get(Tag.ROLLED_BACK) != "true"}
    previous = get_alias(client, name, Alias.PREVIOUS)
    if previous is not None:
        versions.add(previous.version)
    versions.discard(broken)
    return sorted(versions, key=int, reverse=True)


def load_version(client: MlflowClient, name: str, version: str, cache: Path) -> ModelBundle:
    return ModelBundle.load(download_bundle(client, name, version, cache))


def load_run_bundle(run_id: str, cache: Path) -> ModelBundle:
    target = cache / "runs" / run_id
    if not (target / "config.json").exists():
        tmp = cache / "tmp" / run_id
        shutil.rmtree(tmp, ignore_errors=True)
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/model", dst_path=str(tmp))
        bundle = _find_bundle(Path(local), f"run {run_id}")
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(bundle), str(target))
        shutil.rmtree(tmp, ignore_errors=True)
    return ModelBundle.load(target)


# --- guarded alias moves (issue 6) ---------------------------------------------------------------------------


def lock_name(name: str) -> str:
    return f"{name}.promotion-lock"


@contextmanager
def alias_lock(client: MlflowClient, name: str, owner: str, stale_s: float = 300.0,
               wait_s: float = 30.0) -> Iterator[None]:
    """Mutual exclusion for alias moves. MLflow has no conditional alias update, but creating a registered model
    is atomic (its name is unique in the store), so an empty `<name>.promotion-lock` model is the mutex. A lock
    older than `stale_s` (its holder died) is broken; that break is itself not atomic, so two breakers racing in
    the same instant after a crash is the residual window, acceptable for a lock that only a crash leaves."""
    lock = lock_name(name)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={"owner": owner, "since": f"{time.time():.3f}"},
                                           description=f"Flywheel promotion lock for {name}; held by {owner}.")
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except MlflowException:
            continue  # released between our create and this read
        since = float((held.tags or {}).get("since", "0"))
        if time.time() - since > stale_s:
            log.warning("breaking stale promotion lock on %s held by %s", name, held.tags.get("owner"))
            delete_quietly(client, lock)
            continue
        if time.monotonic() > deadline:
            raise AliasConflict(f"promotion lock on {name} held by {held.tags.get('owner')!r} for "
                                f"{time.time() - since:.0f}s; another run is moving aliases")
        time.sleep(0.2)
    try:
        yield
    finally:
        delete_quietly(client, lock)


def delete_quietly(client: MlflowClient, registered_model: str) -> None:
    try:
        client.delete_registered_model(registered_model)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            raise


def delete_alias(client: MlflowClient, name: str, alias: str) -> None:
    try:
        client.delete_registered_model_alias(name, alias)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise


def actor(default: str | None = None) -> str:
    """Who moves an alias: the Airflow DAG run when inside a task (the task runner exports its context),
    else `default`, else the OS user."""
    dag, run = os.environ.get("AIRFLOW_CTX_DAG_ID"), os.environ.get("AIRFLOW_CTX_DAG_RUN_ID")
    if dag and run:
        return f"{dag} run {run}" + (f" ({default})" if default else "")
    return default or getpass.getuser()


def hard_refusal(tags: dict[str, str]) -> str | None:
    """Why a version may never (or, after a review timeout, not until re-reviewed) become champion or
    challenger: rolled back, failed its gate, rejected, or its review timed out."""
    approval = (tags.get(Tag.APPROVAL) or "").strip().lower()
    if tags.get(Tag.ROLLED_BACK) == "true":
        return f"it was rolled back ({tags.get(Tag.ROLLBACK_REASON, 'no reason recorded')})"
    if tags.get(Tag.GATE_PASSED) != "true":
        return f"it did not pass its gate ({tags.get(Tag.GATE_REASON, 'no gate decision recorded')})"
    if approval == "rejected":
        return f"the reviewer rejected it ({tags.get(Tag.APPROVER) or 'reviewer unknown'})"
    if Tag.REVIEW_TIMED_OUT_AT in tags and approval != "approved":
        return f"its review timed out at {tags[Tag.REVIEW_TIMED_OUT_AT][:16]}Z with no decision"
    return None


def champion_refusal(tags: dict[str, str], review: bool) -> str | None:
    """Why a version may not become champion, or None. The one rule every path applies: the hard refusals, and,
    in review mode or once a review was requested for the version, anything but an approval."""
    if hard := hard_refusal(tags):
        return hard
    approval = (tags.get(Tag.APPROVAL) or "").strip().lower()
    if (review or Tag.REVIEW_REQUESTED_AT in tags) and approval != "approved":
        return f"review mode: {Tag.APPROVAL} is {approval or 'not set'}"
    return None


def _append_ledger(client: MlflowClient, name: str, moves: list[AliasMove]) -> None:
    """Append to the ledger and re-render the registered model's description. Called only under alias_lock."""
    model = client.get_registered_model(name)
    tags = dict(model.tags or {})
    before: dict[str, str | None] = {}
    for m in moves:
        before.setdefault(m.alias, m.replaced)
    moves = [*ledger.unrecorded(ledger.read(tags), before, moves[0].at if moves else ""), *moves]
    for key, value in ledger.append(tags, moves).items():
        client.set_registered_model_tag(name, key, value)
        tags[key] = value
    aliases = {a: str(v) for a, v in (model.aliases or {}).items()}
    for m in moves:
        if m.version is None:
            aliases.pop(m.alias, None)
        else:
            aliases[m.alias] = m.version
    client.update_registered_model(name, description=ledger.render(name, ledger.read(tags), aliases))


def history(client: MlflowClient, name: str) -> list[AliasMove]:
    """The ledger, plus (not written) an entry for every alias the registry has elsewhere than it says."""
    model = client.get_registered_model(name)
    moves = ledger.read(dict(model.tags or {}))
    live: dict[str, str | None] = {a: None for a in (Alias.CHAMPION, Alias.PREVIOUS, Alias.CHALLENGER)}
    live.update({a: str(v) for a, v in (model.aliases or {}).items() if a in live})
    if not moves:
        return moves
    return [*moves, *ledger.unrecorded(moves, live, datetime.now(UTC).isoformat())]


def _move(at: str, alias: str, version: str | None, replaced: str | None, why: str, by: str,
          evaluation: str | None, note: str) -> AliasMove:
    return AliasMove(at=at, alias=alias, version=version, replaced=replaced, why=str(why), by=by,
                     evaluation=evaluation, note=note)


def _guarded_set(client: MlflowClient, name: str, target: VersionInfo, current: VersionInfo | None, *,
                 why: str, by: str, review: bool, keep_previous: bool, evaluation: str | None,
                 note: str) -> list[AliasMove]:
    """The one place `champion` moves, under the lock: the guard, the alias writes, `challenger` cleared when
    it is the new champion, and the ledger entries (returned, appended by the caller in the same lock)."""
    refusal = champion_refusal(target.tags, review)
    if refusal:
        raise PromotionRefused(f"v{target.version} of {name} may not become champion: {refusal}")
    at = datetime.now(UTC).isoformat()
    moves = []
    if keep_previous and current:
        old = get_alias(client, name, Alias.PREVIOUS)
        client.set_registered_model_alias(name, Alias.PREVIOUS, current.version)
        moves.append(_move(at, Alias.PREVIOUS, current.version, old.version if old else None, why, by, None,
                           f"v{current.version} kept for rollback"))
    client.set_registered_model_alias(name, Alias.CHAMPION, target.version)
    moves.append(_move(at, Alias.CHAMPION, target.version, current.version if current else None, why, by,
                       evaluation or target.tags.get(Tag.EVAL_REPORT), note))
    challenger = get_alias(client, name, Alias.CHALLENGER)
    if challenger is not None and challenger.version == target.version:
        delete_alias(client, name, Alias.CHALLENGER)
        moves.append(_move(at, Alias.CHALLENGER, None, target.version, why, by, None,
                           f"v{target.version} is champion now"))
    return moves


def move_champion(client: MlflowClient, name: str, version: str, expected: str | None, owner: str,
                  stale_s: float = 300.0, *, why: str = Why.PROMOTION, review: bool = False,
                  evaluation: str | None = None, note: str = "") -> str | None:
    """Compare-and-set of `champion`: under the alias lock, move it to `version` only if it still points at
    `expected` (the champion this run started from) and the guard allows it, keeping the replaced one as
    `previous`. Moving to where it already is returns the recorded parent (a rerun). Raises AliasConflict when
    another run moved it first and PromotionRefused when the guard says no."""
    by = actor(owner)
    with alias_lock(client, name, owner, stale_s):
        current = get_alias(client, name, Alias.CHAMPION)
        if current and current.version == version:
            return current.tags.get(Tag.PARENT)
        now = current.version if current else None
        if now != expected:
            raise AliasConflict(f"champion of {name} is v{now}, but this run expected v{expected}: another run "
                                f"promoted or rolled back since; not moving it to v{version}")
        target = get_version(client, name, version)
        why = Why.BOOTSTRAP if current is None and why == Why.PROMOTION else why
        moves = _guarded_set(client, name, target, current, why=why, by=by, review=review, keep_previous=True,
                             evaluation=evaluation, note=note or f"v{version} promoted ({why})")
        stamp = {Tag.PROMOTED: "true", Tag.PROMOTED_AT: moves[-1].at, Tag.PROMOTED_BY: by,
                 Tag.STATUS: f"champion since {moves[-1].at[:16]}Z ({why})"}
        for key, value in stamp.items():
            client.set_model_version_tag(name, version, key, value)
        _append_ledger(client, name, moves)
        return now


def restore_previous(client: MlflowClient, name: str, reason: str, by: str, automatic: bool,
                     expected: str | None = None, stale_s: float = 300.0,
                     evaluation: str | None = None) -> tuple[VersionInfo, VersionInfo, str]:
    """Rollback through the same guarded move: `previous` back to `champion`, the demoted version marked
    rolled back (never promoted again) and stripped of `challenger`, `previous` cleared so a second rollback
    cannot flip back. Returns (rolled back, restored, when)."""
    who = actor(by)
    with alias_lock(client, name, f"rollback by {by}", stale_s):
        champion = get_alias(client, name, Alias.CHAMPION)
        previous = get_alias(client, name, Alias.PREVIOUS)
        if champion is None:
            raise StageError(f"{name} has no champion: nothing to roll back")
        if expected is not None and champion.version != expected:
            raise StageError(f"champion of {name} is v{champion.version}, not v{expected} as this "
                             "rollback expected: it moved since the decision; not rolling back")
        if previous is None:
            raise StageError(f"{name} has no 'previous' version to restore (champion v{champion.version}); "
                             "promote a known-good version with `flywheel promote` instead")
        if previous.version == champion.version:
            raise StageError(f"'previous' and 'champion' both point at v{champion.version}; nothing to restore")
        why = Why.AUTO_ROLLBACK if automatic else Why.ROLLBACK
        moves = _guarded_set(client, name, previous, champion, why=why, by=who, review=False,
                             keep_previous=False, evaluation=evaluation, note=reason[:1000])
        at = moves[0].at
        delete_alias(client, name, Alias.PREVIOUS)
        moves.append(_move(at, Alias.PREVIOUS, None, previous.version, why, who, None, "restored as champion"))
        challenger = get_alias(client, name, Alias.CHALLENGER)
        if challenger is not None and challenger.version == champion.version:
            delete_alias(client, name, Alias.CHALLENGER)
            moves.append(_move(at, Alias.CHALLENGER, None, champion.version, why, who, None, "rolled back"))
        for key, value in {Tag.ROLLED_BACK: "true", Tag.ROLLBACK_REASON: reason[:4900], Tag.ROLLBACK_AT: at,
                           Tag.ROLLBACK_BY: by, Tag.STATUS: f"rolled back {at[:16]}Z ({why})"}.items():
            client.set_model_version_tag(name, champion.version, key, value)
        for key, value in {Tag.RESTORED_FROM: champion.version, Tag.ROLLBACK_AT: at,
                           Tag.ROLLBACK_REASON: reason[:4900],
                           Tag.STATUS: f"champion again since {at[:16]}Z ({why} of v{champion.version})"}.items():
            client.set_model_version_tag(name, previous.version, key, value)
        _append_ledger(client, name, moves)
        return champion, previous, at


def set_challenger(client: MlflowClient, name: str, version: str, by: str, stale_s: float = 300.0,
                   evaluation: str | None = None) -> bool:
    """Nominate a version as `challenger` (guarded: never a rolled-back, failed or rejected one)."""
    with alias_lock(client, name, f"challenger by {by}", stale_s):
        target = get_version(client, name, version)
        if hard_refusal(target.tags) is not None or Alias.CHAMPION in target.aliases:
            return False
        old = get_alias(client, name, Alias.CHALLENGER)
        if old is not None and old.version == version:
            return True
        client.set_registered_model_alias(name, Alias.CHALLENGER, version)
        _append_ledger(client, name, [_move(datetime.now(UTC).isoformat(), Alias.CHALLENGER, version,
                                            old.version if old else None, Why.NOMINATION, actor(by),
                                            evaluation or target.tags.get(Tag.EVAL_REPORT),
                                            f"v{version} passed its gate")])
        return True


def clear_challenger(client: MlflowClient, name: str, version: str, why: str, by: str, note: str,
                     stale_s: float = 300.0) -> bool:
    """Take `challenger` off `version` (rejected, timed out, retired): it serves no more canary traffic."""
    with alias_lock(client, name, f"challenger off by {by}", stale_s):
        current = get_alias(client, name, Alias.CHALLENGER)
        if current is None or current.version != version:
            return False
        delete_alias(client, name, Alias.CHALLENGER)
        _append_ledger(client, name, [_move(datetime.now(UTC).isoformat(), Alias.CHALLENGER, None, version,
                                            why, actor(by), None, note)])
        return True
