"""Logging for people and for machines at once: the console gets short human lines from Flywheel itself
(third-party chatter and warnings only with `-v`), while a JSON-lines file under the home keeps everything,
with any `extra={...}` fields as keys, so the server's and the stages' logs can be filtered by model version,
stream or day without parsing prose. `--log-format json` puts the JSON lines on the console too (CI, scripts)."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

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
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(stderr=True)
    if not console.is_terminal:  # piped to a file or CI: one unwrapped line per record
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
        return handler
    handler = RichHandler(console=console, show_path=False, markup=False, log_time_format="%H:%M:%S")
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def log_file(log_dir: Path) -> Path:
    return log_dir / "flywheel.jsonl"


def setup_logging(verbose: bool = False, fmt: LogFormat = "human", log_dir: Path | None = None) -> None:
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
