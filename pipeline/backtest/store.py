"""The backtest's own state in its home, written atomically (temp file + rename) so an interrupted run resumes:
a period whose result file exists is done; a period whose served scores exist is not sent to the server again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from pipeline.errors import StageError


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root

    def check_inputs(self, inputs: dict) -> None:
        """Resuming with other inputs would mix two backtests in one home: refuse, naming the difference."""
        path = self.root / "inputs.json"
        if path.exists():
            before = json.loads(path.read_text())
            changed = sorted(k for k in set(before) | set(inputs) if before.get(k) != inputs.get(k))
            if changed:
                raise StageError(f"{self.root.parent} holds a backtest with other inputs ({', '.join(changed)} "
                                 "differ): pass another --home, or delete that one to start over")
            return
        _atomic(path, lambda p: p.write_text(json.dumps(inputs, indent=2)))

    def read_json(self, name: str) -> dict | None:
        path = self.root / name
        return json.loads(path.read_text()) if path.exists() else None

    def write_json(self, name: str, data: dict) -> None:
        _atomic(self.root / name, lambda p: p.write_text(json.dumps(data, indent=2, default=str)))

    def result(self, k: int) -> dict | None:
        return self.read_json(f"periods/p{k:05d}.json")

    def save_result(self, k: int, data: dict) -> None:
        self.write_json(f"periods/p{k:05d}.json", data)

    def served(self, k: int) -> pd.DataFrame | None:
        path = self.root / "served" / f"p{k:05d}.parquet"
        return pd.read_parquet(path) if path.exists() else None

    def save_served(self, k: int, frame: pd.DataFrame) -> None:
        _atomic(self.root / "served" / f"p{k:05d}.parquet", lambda p: frame.to_parquet(p, index=False))
