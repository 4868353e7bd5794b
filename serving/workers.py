"""Coordination between the server's worker processes through the spool directory they share.

Each worker holds an flock on `<pid>.lock` for its lifetime, so the live set is exactly the lock files whose
lock cannot be taken. A flush request (seal every spool now) is a file with a fresh id; every worker's flusher
thread notices it within one flush interval, seals, and writes its ack; the requester waits for an ack from
each live worker. No broker, nothing to clean up after a crash: a dead worker's lock is released by the kernel.
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REQUEST = "flush-request"


class WorkerGroup:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.pid = os.getpid()
        self._lock_file = None
        self._seen: str | None = None

    def _write(self, name: str, text: str) -> None:
        tmp = self.dir / f".{name}.{self.pid}.tmp"
        tmp.write_text(text)
        tmp.replace(self.dir / name)

    def join(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.live()  # clears stale files of dead workers
        f = open(self.dir / f"{self.pid}.lock", "w")  # noqa: SIM115 - held for the worker's lifetime
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._lock_file = f
        request = self.dir / REQUEST
        self._seen = request.read_text() if request.exists() else None

    def leave(self) -> None:
        if self._lock_file:
            for name in (f"{self.pid}.lock", f"{self.pid}.ack"):
                (self.dir / name).unlink(missing_ok=True)
            self._lock_file.close()
            self._lock_file = None

    def live(self) -> list[int]:
        alive = []
        for path in self.dir.glob("*.lock"):
            with open(path) as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    alive.append(int(path.stem))
                    continue
            path.unlink(missing_ok=True)
            (self.dir / f"{path.stem}.ack").unlink(missing_ok=True)
        return sorted(alive)

    def answer_flush_request(self, seal: Callable[[], object]) -> None:
        request = self.dir / REQUEST
        if not request.exists():
            return
        rid = request.read_text()
        if rid != self._seen:
            seal()
            self._write(f"{self.pid}.ack", rid)
            self._seen = rid

    def request_flush(self, timeout: float) -> tuple[list[int], list[int]]:
        """Ask every live worker to seal (the caller has sealed its own); returns (acked, missing)."""
        rid = uuid.uuid4().hex
        self._write(REQUEST, rid)
        self._seen = rid
        self._write(f"{self.pid}.ack", rid)
        deadline = time.monotonic() + timeout
        while True:
            live = self.live()
            acked = [p for p in live if (self.dir / f"{p}.ack").exists()
                     and (self.dir / f"{p}.ack").read_text() == rid]
            missing = [p for p in live if p not in acked]
            if not missing or time.monotonic() > deadline:
                return acked, missing
            time.sleep(0.05)
