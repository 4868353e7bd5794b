"""Everything that talks to the MLflow tracking server and model registry.

Versions carry their lineage as tags (`flywheel.*`), so the registry alone answers: which day's data trained
this version, from which parent, with which metrics and gate decision, and which run produced it.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from feature_store.spec import FeatureSpec, FeatureType
from pipeline.config import Settings
from pipeline.model import ModelBundle

log = logging.getLogger("flywheel.registry")

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous"
TAG_DAY = "flywheel.data_day"
TAG_WINDOW = "flywheel.data_window"
TAG_PARENT = "flywheel.parent_version"
TAG_RUN = "flywheel.run_id"
TAG_WEIGHTS = "flywheel.weights_digest"
TAG_BUNDLE = "flywheel.bundle_digest"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
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
        return date.fromisoformat(self.tags[TAG_DAY]) if TAG_DAY in self.tags else None

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
    mlflow.set_tag(TAG_BUNDLE, bundle_digest(path))
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
    existing = find_version(client, name, TAG_RUN, run_id)
    if existing:
        return existing
    try:
        client.create_registered_model(name, description="Managed by Flywheel; aliases champion/challenger.")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_uri = f"runs:/{run_id}/model"
    run = client.get_run(run_id)
    mv = client.create_model_version(name, model_uri, run_id=run_id, tags={**tags, TAG_RUN: run_id},
                                     description=run.data.tags.get("mlflow.note.content", ""))
    if TAG_BUNDLE in run.data.tags:
        client.set_model_version_tag(name, mv.version, TAG_BUNDLE, run.data.tags[TAG_BUNDLE])
    return get_version(client, name, str(mv.version))


def parent_for_day(client: MlflowClient, name: str, day: date) -> VersionInfo | None:
    """The model that was champion before `day` was trained: the current champion, or, when a rerun finds the
    champion already trained on `day` or later, its ancestor. Keeps reruns of a day deterministic."""
    current = get_alias(client, name, CHAMPION)
    while current is not None and current.data_day is not None and current.data_day >= day:
        parent = current.tags.get(TAG_PARENT)
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
    expected = (mv.tags or {}).get(TAG_BUNDLE)
    if not (target / "config.json").exists():
        tmp = cache / name / f".tmp-{version}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp))
        bundle = _find_bundle(Path(local), f"model {name} v{version}")
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(bundle), str(target))
        shutil.rmtree(tmp, ignore_errors=True)
    if expected and bundle_digest(target) != expected:
        shutil.rmtree(target, ignore_errors=True)
        raise ValueError(f"model {name} v{version}: artifact digest mismatch, refusing to load")
    return target


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


def set_champion(client: MlflowClient, name: str, version: str) -> str | None:
    """Move `champion` to `version`, keeping the one it replaces as `previous`; returns that previous version."""
    current = get_alias(client, name, CHAMPION)
    if current and current.version == version:
        return current.tags.get(TAG_PARENT)
    if current:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "flywheel.promoted", "true")
    return current.version if current else None

