"""Waiting until something outside this process is ready: a server answers, a DAG is parsed, a run finishes, the
model server serves the champion, stopped processes are gone. One helper over tenacity instead of a
while/sleep/deadline loop per caller, so each caller states only what "ready" means, how long it waits, how
often it looks and what it says when time is up. A leaf module: stages, ops and the backtest all use it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, overload

from tenacity import RetryCallState, Retrying, retry_if_result, stop_before_delay, wait_fixed

T = TypeVar("T")


@overload
def wait_until(check: Callable[[], T | None], timeout: float, interval: float,
               timeout_error: Callable[[], Exception]) -> T: ...


@overload
def wait_until(check: Callable[[], T | None], timeout: float, interval: float,
               timeout_error: None = None) -> T | None: ...


def wait_until(check: Callable[[], T | None], timeout: float, interval: float,
               timeout_error: Callable[[], Exception] | None = None) -> T | None:
    """Call `check` every `interval` seconds until it returns something other than None, and return that; no
    look starts after `timeout` seconds. Then raise `timeout_error()` (built at that moment, so it can say what
    the last look saw), or return None when there is none: a bounded wait whose caller goes on either way.
    An exception from `check` ends the wait at once: it is a verdict (the process died), not a "not yet"."""

    def gave_up(state: RetryCallState) -> None:
        if timeout_error is not None:
            raise timeout_error()

    retrying = Retrying(stop=stop_before_delay(timeout), wait=wait_fixed(interval),
                        retry=retry_if_result(lambda result: result is None), retry_error_callback=gave_up)
    return retrying(check)
