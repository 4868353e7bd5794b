"""Server-made request ids: a random 64-bit prefix per process and a counter, as 32 hex digits (the shape of a
uuid4's hex). `uuid4()` reads 16 bytes from the OS and builds a UUID object for every request: 2.3 against
0.28 us here, small beside a request (bench/results/serving.md) but on every one. The prefix is drawn again in
a forked child, so two workers never share one."""

from __future__ import annotations

import itertools
import os


class _Ids:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter):016x}"


_IDS = _Ids()
os.register_at_fork(after_in_child=_IDS.reset)


def new_request_id() -> str:
    return _IDS.next()


__all__ = ["new_request_id"]
