from __future__ import annotations

import os

import pytest

from pipeline.ops import stack
from tests.helpers import free_port, make_settings

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server (SQLite backend, served artifacts) shared by the session."""
    home = tmp_path_factory.mktemp("mlflow-home")
    port = free_port()
    s = make_settings(home, port)
    stack.start_mlflow(s)
    yield f"http://127.0.0.1:{port}", port
    stack.stop_all(s)


@pytest.fixture
def settings_factory(tmp_path, mlflow_server):
    """Settings in a fresh home against the shared MLflow server; each test gets its own model name."""
    _, port = mlflow_server
    counter = iter(range(1000))

    def make(**overrides):
        name = overrides.pop("model_name", f"m-{tmp_path.name}-{next(counter)}")
        return make_settings(tmp_path / "home", port, model_name=name, **overrides)

    return make
