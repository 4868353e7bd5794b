"""The Kubernetes pod that runs a night's training on a shared cluster.

Rendered from `infra/k8s/training-pod-template.yaml` so operators review one YAML file, with the day, image,
resources and priority filled in from settings. The nightly DAG still trains in its own worker; launching this
pod from the DAG (KubernetesPodOperator) is the next step.
"""

from __future__ import annotations

import copy
from datetime import date
from functools import lru_cache
from pathlib import Path

import yaml

from pipeline.config import Settings

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "k8s" / "training-pod-template.yaml"


@lru_cache(maxsize=1)
def _template() -> dict:
    return yaml.safe_load(TEMPLATE.read_text())


def training_pod(s: Settings, day: date) -> dict:
    pod = copy.deepcopy(_template())
    pod["metadata"]["name"] = f"flywheel-train-{day.isoformat()}"
    pod["metadata"]["namespace"] = s.training_namespace
    pod["metadata"]["labels"]["flywheel/day"] = day.isoformat()
    pod["spec"]["priorityClassName"] = s.training_priority_class
    container = pod["spec"]["containers"][0]
    container["image"] = s.training_image
    container["args"] = ["train", "--day", day.isoformat()]
    resources = container["resources"]
    resources["requests"]["cpu"] = str(s.training_cpus)
    resources["requests"]["memory"] = resources["limits"]["memory"] = s.training_memory
    if s.training_gpus:
        resources["requests"]["nvidia.com/gpu"] = resources["limits"]["nvidia.com/gpu"] = str(s.training_gpus)
    else:
        resources["requests"].pop("nvidia.com/gpu", None)
        resources["limits"].pop("nvidia.com/gpu", None)
        pod["spec"].pop("tolerations", None)
    return pod
