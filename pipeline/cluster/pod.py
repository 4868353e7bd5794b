"""The training pod of a night, rendered from `infra/k8s/training-pod-template.yaml` so operators review one YAML
file, with the day, image, resources and priority filled in from settings (the day may be Airflow's `{{ ds }}`).
"""

from __future__ import annotations

import copy
from datetime import date
from functools import lru_cache

import yaml

from pipeline.config import REPO, Settings

TEMPLATE = REPO / "infra" / "k8s" / "training-pod-template.yaml"
CONTAINER = "train"


@lru_cache(maxsize=1)
def _template() -> dict:
    return yaml.safe_load(TEMPLATE.read_text())


def train_args(day: str, xcom: bool = False) -> list[str]:
    """The container's `flywheel` arguments; with `xcom` the result is also written where the sidecar reads it."""
    return ["train", "--day", day, *(["--xcom"] if xcom else [])]


def training_pod(s: Settings, day: date | str, xcom: bool = False) -> dict:
    """The pod for one day; `day` may be a Jinja template (`{{ ds }}`) that Airflow renders per run."""
    label = day.isoformat() if isinstance(day, date) else day
    pod = copy.deepcopy(_template())
    pod["metadata"]["name"] = f"flywheel-train-{label}"
    pod["metadata"]["namespace"] = s.cluster.namespace
    pod["metadata"]["labels"]["flywheel/day"] = label
    pod["spec"]["priorityClassName"] = s.cluster.priority_class
    container = pod["spec"]["containers"][0]
    if container["name"] != CONTAINER:
        raise ValueError(f"{TEMPLATE}: the first container must be named {CONTAINER!r}, got {container['name']!r}")
    container["image"] = s.cluster.image
    container["args"] = train_args(label, xcom)
    resources = container["resources"]
    resources["requests"]["cpu"] = str(s.cluster.cpus)
    resources["requests"]["memory"] = resources["limits"]["memory"] = s.cluster.memory
    if s.cluster.gpus:
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"] = str(s.cluster.gpus)
    else:
        resources["requests"].pop("nvidia.com/gpu", None)
        resources["limits"].pop("nvidia.com/gpu", None)
        pod["spec"].pop("tolerations", None)
    return pod
