"""Logging for people and for machines at once: the console gets short human lines from Flywheel itself
(third-party chatter and warnings only with `-v`), while a JSON-lines file under the home keeps everything,
with any `extra={...}` fields as keys, so the server's and the stages' logs can be filtered by model version,
stream or day without parsing prose. `--log-format json` puts the JSON lines on the console too (CI, scripts)."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from rich.console import Console

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
NOISY = ("httpx", "httpcore", "matplotlib", "great_expectations", "urllib3", "alembic", "filelock")
OURS = "flywheel"
LogFormat = Literal["human", "json"]

#: Environment switches of libraries that otherwise write to our console behind logging's back.
QUIET_ENV = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # the "🏃 View run ..." lines go to stdout otherwise
    "MLFLOW_CONFIGURE_LOGGING": "false",  # let mlflow's records reach our handlers (and filters)
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "TQDM_DISABLE": "1",
}


_shared: Console | None = None
_format: LogFormat | None = None  # set by setup_logging; None in a library or Airflow task: no live displays


def console() -> Console:
    """The one stderr console that log lines, status spinners and progress bars share: rich keeps a live display
    and the lines printed under it from overwriting each other only when they go through one console."""
    global _shared
    if _shared is None:
        from rich.console import Console

        terminal = Console(stderr=True).is_terminal
        _shared = Console(stderr=True, width=None if terminal else 150)
    return _shared


@contextmanager
def progress(total: int, what: str, shown: bool = True) -> Iterator[Callable[[str], None]]:
    """A transient bar for a long loop on a person's terminal (between its log lines, the loop shows it moves);
    nothing on a file, in CI, with JSON logs, where Flywheel's CLI did not set up logging, or when not `shown`
    (a DDP worker other than rank 0). Yields `step(info)`: one unit done, `info` shown beside the bar."""
    out = console() if shown and _format == "human" else None
    if out is None or not out.is_terminal:
        yield lambda info="": None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=out, transient=True) as bar:
        task = bar.add_task(what, total=total, info="")
        yield lambda info="": bar.update(task, advance=1, info=info)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        data.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class ConsoleFilter(logging.Filter):
    """Flywheel's own records pass; everything else (library loggers, `warnings`) only from ERROR up, unless
    verbose: a new user's terminal shows what Flywheel did, the file shows everything."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == OURS or record.name.startswith(OURS + ".")
        return self.verbose or ours or record.levelno >= logging.ERROR


def _console_handler(fmt: LogFormat) -> logging.Handler:
    if fmt == "json":
        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        return handler
    from rich.logging import RichHandler

    out = console()
    if not out.is_terminal:  # piped to a file or CI: one unwrapped line per record
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
        return handler
    handler = RichHandler(console=out, show_path=False, markup=False, log_time_format="%H:%M:%S")
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def log_file(log_dir: Path) -> Path:
    return log_dir / "flywheel.jsonl"


def setup_logging(verbose: bool = False, fmt: LogFormat = "human", log_dir: Path | None = None) -> None:
    global _format
    _format = fmt
    if not verbose:
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    logging.captureWarnings(True)
    console = _console_handler(fmt)
    console.addFilter(ConsoleFilter(verbose))
    handlers = [console]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        to_file = logging.handlers.RotatingFileHandler(log_file(log_dir), maxBytes=20 * 2**20, backupCount=3,
                                                       encoding="utf-8")
        to_file.setFormatter(JsonFormatter())
        handlers.append(to_file)
    root = logging.getLogger()
    root.handlers[:] = handlers
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
