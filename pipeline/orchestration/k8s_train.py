"""Hands a stage's result from a training pod back to Airflow.

`KubernetesPodOperator(do_xcom_push=True)` mounts an emptyDir at `/airflow/xcom` and its sidecar returns
`return.json` as the task's XCom, so `evaluate` receives the same `TrainResult` dict whether `train` ran in
the worker or in a pod. The file is written to a temp name and renamed, so the sidecar never reads half a result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

XCOM_FILE = Path("/airflow/xcom/return.json")


def write_xcom(result: BaseModel | dict, path: Path = XCOM_FILE) -> Path:
    """Write `result` as the pod's XCom; a missing mount means the pod was not launched for XCom."""
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} is not mounted: --xcom only works in a pod started by "
                                "KubernetesPodOperator(do_xcom_push=True)")
    data = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, default=str))
    os.replace(tmp, path)
    return path


def with_xcom(stage: Callable[..., Any], path: Path = XCOM_FILE) -> Callable[..., Any]:
    """`stage` that also hands its result to the XCom sidecar; what `flywheel train --xcom` runs. A failing stage
    writes nothing, so the task fails instead of passing a stale result downstream."""

    def run(*args: Any) -> Any:
        result = stage(*args)
        write_xcom(result, path)
        return result

    return run
