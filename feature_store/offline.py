"""The lake: Parquet partitions by day on any `pyarrow.fs` filesystem, written atomically with a manifest.

A partition is written into a temporary directory and moved into place in one rename, and its manifest is the
last file written, so a reader sees either the old partition or the complete new one, and a crash mid-write
leaves only a `.tmp-*` directory that the next write of the same day removes. Re-running a day replaces the
partition instead of appending to it, which is what makes every step idempotent.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_manifest.json"


@dataclass(frozen=True)
class PartitionRef:
    table: str
    day: date
    path: str
    rows: int


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Lake:
    def __init__(self, root: str) -> None:
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(root).resolve())
        self.fs.create_dir(self.root, recursive=True)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def partition_path(self, table: str, day: date) -> str:
        return self.path(table, f"dt={day.isoformat()}")

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def list_files(self, directory: str, suffix: str = ".parquet") -> list[str]:
        if not self.exists(directory):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(directory, recursive=False))
        return sorted(
            i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix)
            and not i.base_name.startswith((".", "_"))
        )

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def write_file_atomic(self, path: str, data: bytes) -> str:
        """Temp file + rename in the same directory; returns the content's sha256."""
        directory = path.rsplit("/", 1)[0]
        self.fs.create_dir(directory, recursive=True)
        tmp = f"{directory}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, path)
        return _sha256(data)

    @staticmethod
    def parquet_bytes(table: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        return sink.getvalue().to_pybytes()

    def write_partition(
        self, table_name: str, day: date, data: pa.Table, inputs: dict[str, object] | None = None
    ) -> PartitionRef:
        final = self.partition_path(table_name, day)
        parent = self.path(table_name)
        self.fs.create_dir(parent, recursive=True)
        for stale in self.fs.get_file_info(pafs.FileSelector(parent)):
            if stale.base_name.startswith(f".tmp-dt={day.isoformat()}-"):
                self.fs.delete_dir(stale.path)
        tmp = self.path(table_name, f".tmp-dt={day.isoformat()}-{uuid.uuid4().hex}")
        self.fs.create_dir(tmp)
        body = self.parquet_bytes(data)
        with self.fs.open_output_stream(f"{tmp}/part-0.parquet") as f:
            f.write(body)
        manifest = {
            "table": table_name,
            "day": day.isoformat(),
            "rows": data.num_rows,
            "files": [{"path": "part-0.parquet", "rows": data.num_rows, "sha256": _sha256(body)}],
            "schema": [f"{f.name}:{f.type}" for f in data.schema],
            "inputs": inputs or {},
            "written_at": datetime.now(UTC).isoformat(),
        }
        with self.fs.open_output_stream(f"{tmp}/{MANIFEST}") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True).encode())
        if self.exists(final):
            trash = self.path(table_name, f".tmp-dt={day.isoformat()}-old-{uuid.uuid4().hex}")
            self.fs.move(final, trash)
            self.fs.move(tmp, final)
            self.fs.delete_dir(trash)
        else:
            self.fs.move(tmp, final)
        return PartitionRef(table_name, day, final, data.num_rows)

    def read_manifest(self, table_name: str, day: date) -> dict | None:
        path = f"{self.partition_path(table_name, day)}/{MANIFEST}"
        if not self.exists(path):
            return None
        return json.loads(self.read_bytes(path))

    def read_partition(self, table_name: str, day: date) -> pa.Table:
        manifest = self.read_manifest(table_name, day)
        if manifest is None:
            raise FileNotFoundError(f"no complete partition {table_name}/dt={day.isoformat()} in {self.root}")
        base = self.partition_path(table_name, day)
        return pa.concat_tables(
            [pq.read_table(f"{base}/{f['path']}", filesystem=self.fs) for f in manifest["files"]]
        )

    def partition_days(self, table_name: str) -> list[date]:
        directory = self.path(table_name)
        if not self.exists(directory):
            return []
        days = []
        for info in self.fs.get_file_info(pafs.FileSelector(directory)):
            if info.type == pafs.FileType.Directory and info.base_name.startswith("dt="):
                if self.exists(f"{info.path}/{MANIFEST}"):
                    days.append(date.fromisoformat(info.base_name[3:]))
        return sorted(days)
