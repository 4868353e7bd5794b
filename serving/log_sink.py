"""Durable, append-only prediction and feedback logs: an Arrow IPC spool sealed into immutable Parquet segments.

Two durability modes. `group` (the server's default): rows are appended to a buffer, and the request that
appended them waits until an fsync covering them has returned; every request that arrives while one fsync is in
flight shares the next one (group commit, as databases do it), so a SIGKILL loses nothing that was answered.
`interval`: rows are written and fsync'd every flush interval by a background thread, so the answer goes out
first and a SIGKILL loses at most one interval. Under load a group commit first waits `commit_delay_s` when the
previous commit carried several requests' rows (PostgreSQL's commit_delay with commit_siblings): more rows share
each fsync. Measured at batch 1, c32, 2 workers: 0.5 ms took group commit from 0.62 to 0.74-0.76 of interval
mode's requests/s (server CPU per request 212 -> 179 us); 2 ms was worse (0.51). A lone client never waits.

A write is all or nothing: the spool is cut back to its last complete record when a write fails (a full disk),
so the spool never holds a torn record followed by good ones. In `group` mode the failed rows are dropped (their
requests are answered 503, so a client's retry logs them once); in `interval` mode they were already answered
and stay buffered until the spool works again. A spool that cannot be cut back, or whose sealing failed, is kept
(and its flock held) and sealed again at every seal until it succeeds, so the running server seals everything it
answered without a restart.

Sealing closes the spool and rewrites it as Parquet segments in the lake, one per day partition, named after the
spool file: a crash during sealing is repaired by sealing the same spool again, which rewrites the same segment
names with the same rows instead of duplicating them. Each spool file is held under an exclusive flock, so
several server processes share a spool directory and a restarting process only recovers files that no live
process owns.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc

from feature_store.offline import Lake
from pipeline.errors import LogUnavailable

log = logging.getLogger("flywheel.log_sink")

Durability = Literal["group", "interval"]


class _Spool:
    """One open spool file: an unbuffered descriptor under flock, and the length of its complete records."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "xb", buffering=0)  # noqa: SIM115 - kept open (and locked) for its lifetime
        fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.good = 0

    def write(self, header: bytes, payload: list[bytes]) -> None:
        """Append whole records and fsync; on failure cut the file back to its last complete record."""
        start = self.good
        try:
            for chunk in ([header] if start == 0 else []) + payload:
                view = memoryview(chunk)
                while view:
                    view = view[self.file.write(view):]
            os.fsync(self.file.fileno())
        except OSError:
            self.cut(start)
            raise
        self.good = self.file.tell()

    def cut(self, offset: int) -> None:
        try:
            os.ftruncate(self.file.fileno(), offset)
            self.file.seek(offset)
            os.fsync(self.file.fileno())
        except OSError as e:  # the torn tail stays; reading stops there, after every complete record
            log.error("could not cut spool back to its last complete record",
                      extra={"spool": self.path.name, "error": str(e)})
            self.good = -1  # never written again: the owner retires it

    def close(self) -> None:
        self.file.close()


class SegmentLog:
    def __init__(
        self,
        stream: str,
        schema: pa.Schema,
        spool_dir: Path,
        lake: Lake,
        lake_dir: str,
        partition_columns: tuple[str, ...],
        durability: Durability = "interval",
        commit_delay_s: float = 0.0,
    ) -> None:
        self.stream, self.schema, self.lake, self.lake_dir = stream, schema, lake, lake_dir
        self.partition_columns = partition_columns
        self.spool_dir = spool_dir
        self.durability = durability
        self.commit_delay_s = commit_delay_s
        self._appends = 0  # requests whose rows were appended since the last commit began
        self._last_group = 0  # requests the last commit carried: more than one means others are writing
        self._header = schema.serialize().to_pybytes()
        self._buf_lock = threading.Lock()  # guards the in-memory buffers; held for microseconds
        self._io_lock = threading.Lock()  # serialises spool writes and the spool switch; never taken by append
        self._seal_lock = threading.Lock()  # one seal at a time; writes go on to the new spool meanwhile
        self._pending: list[pa.RecordBatch] = []
        self._columns: dict[str, list] = {name: [] for name in schema.names}
        self._column_rows = 0
        self._spool: _Spool | None = None
        self._retired: list[_Spool] = []  # closed to writing, not sealed yet: retried at every seal
        self._durable = 0  # rows up to this sequence number are in the spool, or were dropped
        self._dropped: deque[tuple[int, int]] = deque(maxlen=8192)  # (after, upto] ranges a failed write dropped
        self._commit: asyncio.Future | None = None
        self.error: str | None = None  # the spool cannot be written: predictions are refused
        self.seal_error: str | None = None  # the lake cannot be written: spools wait, nothing is lost
        self.rows_appended = 0
        self.rows_sealed = 0
        self.rows_dropped = 0
        self.segments_sealed = 0

    @property
    def _file(self):
        """The current spool's file object (tests close it to simulate a dead process's released flock)."""
        return self._spool.file if self._spool else None

    def _open(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._spool = _Spool(self.spool_dir / f"{self.stream}-{os.getpid()}-{uuid.uuid4().hex[:12]}.arrows")

    def append(self, batch: pa.RecordBatch) -> int:
        """Buffer a batch; returns its sequence number for `durable`."""
        if self.error and self.durability == "interval":
            raise LogUnavailable(self.error)
        with self._buf_lock:
            self._pending.append(batch)
            self._appends += 1
            self.rows_appended += batch.num_rows
            return self.rows_appended

    def append_columns(self, columns: dict[str, list], rows: int, requests: int = 1) -> int:
        """Buffer plain Python columns; they become one Arrow batch per flush, which is far cheaper per row than
        building a batch per request on the serving path. Returns the rows' sequence number for `durable`."""
        if self.error and self.durability == "interval":
            raise LogUnavailable(self.error)
        with self._buf_lock:
            for name, buf in self._columns.items():
                buf.extend(columns[name])
            self._column_rows += rows
            self._appends += requests
            self.rows_appended += rows
            return self.rows_appended

    async def durable(self, seq: int) -> None:
        """Group commit: return once the rows up to `seq` are fsync'd, sharing one write and fsync with every
        append made meanwhile; raise LogUnavailable if the write that carried them failed. Interval mode
        returns at once. The fsync runs in a thread, so the event loop keeps parsing and scoring."""
        if self.durability != "group":
            return
        loop = asyncio.get_running_loop()
        delayed = False
        while (state := self._state(seq)) == "pending":
            task = self._commit
            if task is None or task.done():
                if not delayed and self.commit_delay_s and self._last_group > 1:
                    delayed = True  # others are writing too: let more rows join this commit, then look again
                    await asyncio.sleep(self.commit_delay_s)
                    continue
                task = self._commit = loop.run_in_executor(None, self._commit_quietly)
            await asyncio.shield(task)
        if state == "dropped":
            raise LogUnavailable(self.error or f"{self.stream} spool write failed")

    def _state(self, seq: int) -> str:
        if any(after < seq <= upto for after, upto in self._dropped):
            return "dropped"
        return "durable" if seq <= self._durable else "pending"

    def _commit_quietly(self) -> None:
        try:
            self.flush()
        except LogUnavailable:
            pass  # each waiter reads its own rows' outcome

    @property
    def pending_rows(self) -> int:
        return sum(b.num_rows for b in self._pending) + self._column_rows

    def _take(self) -> tuple[list[pa.RecordBatch], dict[str, list] | None, int]:
        with self._buf_lock:
            batches, self._pending = self._pending, []
            self._last_group, self._appends = self._appends, 0
            columns = None
            if self._column_rows:
                columns = self._columns
                self._columns = {name: [] for name in self.schema.names}
                self._column_rows = 0
            return batches, columns, self.rows_appended

    def flush(self) -> None:
        with self._io_lock:
            self._flush_io()

    def _flush_io(self) -> None:
        batches, columns, upto = self._take()
        if not batches and columns is None:
            if self.error:  # nothing to write, but the refusal must end once the spool works again: probe it
                batches = [pa.RecordBatch.from_pylist([], schema=self.schema)]
            else:
                return
        try:
            if columns is not None:
                batches.append(pa.RecordBatch.from_pydict(
                    {f.name: pa.array(columns[f.name], f.type) for f in self.schema}, schema=self.schema))
            if self._spool is None:
                self._open()
            self._spool.write(self._header, [b.serialize().to_pybytes() for b in batches])
        except Exception as e:
            self._write_failed(batches, upto, e)
            raise LogUnavailable(self.error) from e
        self._durable = upto
        self.error = None

    def _write_failed(self, batches: list[pa.RecordBatch], upto: int, e: Exception) -> None:
        rows = sum(b.num_rows for b in batches)
        if self.durability == "group":  # their requests get 503: a retry logs them once
            self._dropped.append((upto - rows, upto))
            self.rows_dropped += rows
            self._durable = max(self._durable, upto)
        else:  # already answered: keep them until the spool works again
            with self._buf_lock:
                self._pending[:0] = batches
        if self._spool is not None and (self._spool.good < 0 or not self._spool.path.exists()):
            self._retire()
        self.error = f"{self.stream} spool not writable: {e}"
        log.error("spool write failed", extra={"stream": self.stream, "error": str(e), "rows": rows,
                                               "kept": self.durability != "group"})

    def _retire(self) -> None:
        if self._spool is not None:
            self._retired.append(self._spool)
            self._spool = None

    def seal(self) -> int:
        """Flush, close the current spool and turn it, and every spool whose sealing failed before, into Parquet
        segments; returns rows sealed. A failed flush does not stop the sealing of what is already written.

        Only the switch to a new spool holds the write lock: the Parquet work runs beside the group commits,
        which would otherwise wait for a whole seal (a few hundred ms for a busy 10 s) and make the tail."""
        with self._io_lock:
            flush_error: LogUnavailable | None = None
            try:
                self._flush_io()
            except LogUnavailable as e:
                flush_error = e
            self._retire()
        with self._seal_lock:
            with self._io_lock:
                retired = list(self._retired)
            total = 0
            for spool in retired:
                try:
                    total += self._seal_file(spool.path)
                except Exception as e:
                    self.seal_error = f"{self.stream} sealing {spool.path.name} failed, kept for the next seal: {e}"
                    log.error("seal failed", extra={"stream": self.stream, "spool": spool.path.name,
                                                    "error": str(e)})
                    raise LogUnavailable(self.seal_error) from e
                with self._io_lock:
                    self._retired.remove(spool)
                spool.close()
            self.seal_error = None
        if flush_error is not None:
            raise flush_error
        return total

    def _seal_file(self, path: Path) -> int:
        # One chunk, not one per group commit: at batch 1 a 10 s spool holds thousands of 5-row batches, and
        # filtering and writing such a table took 19x longer than the same rows in one chunk (2.0 against 0.1 s
        # for 60k rows); it was 8.5 % of a loaded worker's samples (py-spy, bench/results/serving.md).
        table = read_spool(path, self.schema).combine_chunks()
        if table.num_rows:
            cols = [table[c] for c in self.partition_columns]
            # a cast to date, not strftime: formatting every row's time was most of a seal (py-spy, batch 256)
            days = pc.cast(pc.coalesce(*cols) if len(cols) > 1 else cols[0], pa.date32())
            for day in sorted(pc.unique(days).to_pylist()):
                part = table.filter(pc.equal(days, pa.scalar(day, pa.date32())))
                dest = f"{self.lake_dir}/dt={day.isoformat()}/seg-{path.stem}.parquet"
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

    def health(self) -> dict:
        """What /health reports: counts, and why the log refuses rows or cannot seal, if it does."""
        return {"durability": self.durability, "appended": self.rows_appended, "sealed": self.rows_sealed,
                "dropped": self.rows_dropped, "unsealed_spools": len(self._retired) + (self._spool is not None),
                "error": self.error, "seal_error": self.seal_error}


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
    """Background thread: flush every interval, seal every seal interval, then run `on_tick` (the cross-worker
    flush requests). Every failure is logged with its traceback and kept in `last_error` for /health; the next
    success clears it."""

    def __init__(self, logs: list[SegmentLog], flush_s: float, seal_s: float,
                 on_error: Callable[[Exception], None] | None = None,
                 on_tick: Callable[[], None] | None = None) -> None:
        self.logs, self.flush_s, self.seal_s, self.on_error = logs, flush_s, seal_s, on_error
        self.on_tick = on_tick
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-flusher", daemon=True)
        self._last_seal = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def _failed(self, what: str, e: Exception) -> None:
        error = f"{what}: {type(e).__name__}: {e}"
        if error != self.last_error:  # once per distinct failure, not every tick while it lasts
            log.exception("%s failed", what)
        self.last_error = error
        if self.on_error:
            self.on_error(e)

    def tick(self) -> None:
        seal = time.monotonic() - self._last_seal >= self.seal_s
        failed = False
        for lg in self.logs:
            try:
                lg.seal() if seal else lg.flush()
            except Exception as e:  # keep flushing the other logs
                failed = True
                self._failed(f"{lg.stream} {'seal' if seal else 'flush'}", e)
        if seal:
            self._last_seal = time.monotonic()
        if self.on_tick:
            try:
                self.on_tick()
            except Exception as e:
                failed = True
                self._failed("cross-worker flush request", e)
        if not failed:
            self.last_error = None

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.tick()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for lg in self.logs:
            try:
                lg.seal()
            except Exception as e:  # what is not sealed stays in the spool: the next start recovers it
                self._failed(f"{lg.stream} seal at shutdown", e)
