"""The import rules of docs/architecture.md, checked on the source: a layer that reaches up (serving into a
stage, the model code into Airflow) fails here instead of surfacing as a slow import or a cycle in production."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FORBIDDEN = {
    "serving": ("airflow", "pipeline.stages", "pipeline.orchestration", "pipeline.ops", "pipeline.demo",
                "pipeline.release"),
    "feature_store": ("airflow", "mlflow", "torch", "pipeline.stages", "pipeline.learn", "pipeline.checks",
                      "pipeline.release", "pipeline.orchestration", "pipeline.registry"),
    "pipeline/learn": ("airflow", "pipeline.stages", "pipeline.orchestration", "pipeline.release",
                       "pipeline.registry", "pipeline.demo"),
    "pipeline/checks": ("airflow", "mlflow", "pipeline.stages", "pipeline.orchestration", "pipeline.release"),
    "pipeline/stages": ("airflow", "pipeline.orchestration", "pipeline.ops", "pipeline.demo"),
    "pipeline/release": ("airflow", "pipeline.orchestration", "pipeline.demo"),
    "pipeline/cluster": ("airflow", "mlflow", "pipeline.stages", "pipeline.orchestration", "pipeline.release",
                         "pipeline.registry", "pipeline.demo"),
    "pipeline/backtest": ("airflow", "pipeline.orchestration", "pipeline.demo", "serving"),
}


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_layer_imports_upward(folder):
    bad = [f"{p.relative_to(ROOT)} imports {m}" for p in sorted((ROOT / folder).rglob("*.py"))
           for m in sorted(imports(p)) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[folder])]
    assert not bad, "\n".join(bad)


def test_leaf_modules_import_nothing_from_the_project():
    for name in ("errors", "tags"):
        assert not [m for m in imports(ROOT / "pipeline" / f"{name}.py")
                    if m.split(".")[0] in ("pipeline", "serving", "feature_store")], name
