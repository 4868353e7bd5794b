"""Durable, append-only prediction and feedback logs: an Arrow IPC spool sealed into immutable Parquet segments.

Rows are buffered in memory and written to a per-process spool file every flush interval (fsync'd), so a SIGKILL
loses at most one interval. Sealing closes the spool and rewrites it as Parquet segments in the lake, one per
day partition, named after the spool file: a crash during sealing is repaired by sealing the same spool again,
which rewrites the same segment names with the same rows instead of duplicating them. Each spool file is held
under an exclusive flock, so several server processes share a spool directory and a restarting process only
recovers files that no live process owns.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from feature_store.offline import Lake
from pipeline.errors import LogUnavailable

log = logging.getLogger("flywheel.log_sink")


class SegmentLog:
    def __init__(
        self,
        stream: str,
        schema: pa.Schema,
        spool_dir: Path,
        lake: Lake,
        lake_dir: str,
        partition_columns: tuple[str, ...],
    ) -> None:
        self.stream, self.schema, self.lake, self.lake_dir = stream, schema, lake, lake_dir
        self.partition_columns = partition_columns
        self.spool_dir = spool_dir
        self._buf_lock = threading.Lock()  # guards the in-memory buffers; held for microseconds
        self._io_lock = threading.Lock()  # serialises spool writes and sealing; never taken by append
        self._pending: list[pa.RecordBatch] = []
        self._columns: dict[str, list] = {name: [] for name in schema.names}
        self._column_rows = 0
        self._file = None
        self._writer: pa.ipc.RecordBatchStreamWriter | None = None
        self._spool_path: Path | None = None
        self.error: str | None = None
        self.rows_appended = 0
        self.rows_sealed = 0
        self.segments_sealed = 0

    def _open(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        path = self.spool_dir / f"{self.stream}-{os.getpid()}-{uuid.uuid4().hex[:12]}.arrows"
        f = open(path, "wb")  # noqa: SIM115 - kept open for the spool's lifetime
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._file, self._spool_path = f, path
        self._writer = pa.ipc.new_stream(f, self.schema)

    def append(self, batch: pa.RecordBatch) -> None:
        if self.error:
            raise LogUnavailable(self.error)
        with self._buf_lock:
            self._pending.append(batch)
            self.rows_appended += batch.num_rows

    def append_columns(self, columns: dict[str, list], rows: int) -> None:
        """Buffer plain Python columns; they become one Arrow batch per flush, which is far cheaper per row than
        building a batch per request on the serving path."""
        if self.error:
            raise LogUnavailable(self.error)
        with self._buf_lock:
            for name, buf in self._columns.items():
                buf.extend(columns[name])
            self._column_rows += rows
            self.rows_appended += rows

    @property
    def pending_rows(self) -> int:
        return sum(b.num_rows for b in self._pending) + self._column_rows

    def _take(self) -> list[pa.RecordBatch]:
        with self._buf_lock:
            batches, self._pending = self._pending, []
            if self._column_rows:
                columns = self._columns
                self._columns = {name: [] for name in self.schema.names}
                self._column_rows = 0
            else:
                columns = None
        if columns is not None:
            batches.append(pa.RecordBatch.from_pydict(
                {f.name: pa.array(columns[f.name], f.type) for f in self.schema}, schema=self.schema))
        return batches

    def flush(self) -> None:
        with self._io_lock:
            self._flush_io()

    def _flush_io(self) -> None:
        batches = self._take()
        if not batches:
            return
        try:
            if self._writer is None:
                self._open()
            for b in batches:
                self._writer.write_batch(b)
            self._file.flush()
            os.fsync(self._file.fileno())
            self.error = None
        except OSError as e:
            with self._buf_lock:  # keep the rows: they are written once the spool works again
                self._pending[:0] = batches
            if self._writer is not None and self._spool_path is not None and not self._spool_path.exists():
                self._writer = self._file = self._spool_path = None
            self.error = f"{self.stream} spool not writable: {e}"
            log.error("spool flush failed", extra={"stream": self.stream, "error": str(e)})
            raise LogUnavailable(self.error) from e

    def seal(self) -> int:
        """Flush, close the current spool and turn it into Parquet segments; returns rows sealed."""
        with self._io_lock:
            self._flush_io()
            if self._writer is None:
                return 0
            self._writer.close()
            path, f = self._spool_path, self._file
            self._writer = self._file = self._spool_path = None
            try:
                return self._seal_file(path)
            finally:
                f.close()

    def _seal_file(self, path: Path) -> int:
        table = read_spool(path, self.schema)
        if table.num_rows:
            cols = [table[c] for c in self.partition_columns]
            days = pc.strftime(pc.coalesce(*cols) if len(cols) > 1 else cols[0], format="%Y-%m-%d")
            for day in sorted(set(days.to_pylist())):
                part = table.filter(pc.equal(days, day))
                dest = f"{self.lake_dir}/dt={day}/seg-{path.stem}.parquet"
                self.lake.write_file_atomic(self.lake.path(dest), Lake.parquet_bytes(part))
                self.segments_sealed += 1
        path.unlink()
        self.rows_sealed += table.num_rows
        log.info("sealed spool", extra={"stream": self.stream, "rows": table.num_rows, "spool": path.name})
        return table.num_rows

    def recover(self) -> int:
        """Seal spool files left by dead processes (those whose flock can be taken)."""
        if not self.spool_dir.exists():
            return 0
        total = 0
        for path in sorted(self.spool_dir.glob(f"{self.stream}-*.arrows")):
            with open(path, "rb") as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                total += self._seal_file(path)
        return total


def read_spool(path: Path, schema: pa.Schema) -> pa.Table:
    """Every complete batch of a spool; a torn last batch (SIGKILL mid-write) is dropped, never half-read."""
    batches: list[pa.RecordBatch] = []
    try:
        with pa.OSFile(str(path), "rb") as f:
            reader = pa.ipc.open_stream(f)
            while True:
                try:
                    batches.append(reader.read_next_batch())
                except StopIteration:
                    break
    except (pa.ArrowInvalid, OSError) as e:
        log.warning("spool truncated", extra={"spool": path.name, "error": str(e)})
    return pa.Table.from_batches(batches, schema=schema)


class Flusher:
    """Background thread: flush every interval, seal every seal interval."""

    def __init__(self, logs: list[SegmentLog], flush_s: float, seal_s: float,
                 on_error: Callable[[Exception], None] | None = None,
                 on_tick: Callable[[], None] | None = None) -> None:
        self.logs, self.flush_s, self.seal_s, self.on_error = logs, flush_s, seal_s, on_error
        self.on_tick = on_tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-flusher", daemon=True)
        self._last_seal = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            seal = time.monotonic() - self._last_seal >= self.seal_s
            for lg in self.logs:
                try:
                    lg.seal() if seal else lg.flush()
                except Exception as e:  # keep flushing the other logs; the error is surfaced in health
                    log.error("log flush failed", extra={"stream": lg.stream, "error": str(e)})
                    if self.on_error:
                        self.on_error(e)
            if seal:
                self._last_seal = time.monotonic()
            if self.on_tick:
                try:
                    self.on_tick()
                except Exception as e:
                    if self.on_error:
                        self.on_error(e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for lg in self.logs:
            lg.seal()
