"""Training shows a progress bar on a person's terminal, and only there: a pipe (CI, a log file) and JSON logs
get the per-epoch log lines alone. Run in a real pseudo-terminal, as a person's shell would run it."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys

import pytest

from pipeline.ops.stack import REPO

SCRIPT = """
from datetime import date
import torch
from feature_store.spec import load_spec
from pipeline.learn.model import ModelBundle
from pipeline.learn.trainer import fit
from pipeline.logs import setup_logging
from tests.helpers import LOANS_SPEC, loans_frame

setup_logging(fmt={fmt!r})
frame = loans_frame(date(2026, 3, 1), 400, seed=4)
bundle = ModelBundle.create(load_spec(LOANS_SPEC), frame, embedding_dim=4, hidden=(8,), min_count=1, seed=2)
fit(bundle, frame, "defaulted", epochs=3, batch_size=32, lr=1e-2, seed=1, device=torch.device("cpu"))
"""


def _run(fmt: str, terminal: bool) -> str:
    cmd = [sys.executable, "-c", SCRIPT.format(fmt=fmt)]
    env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
    if not terminal:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=120).stderr
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=120) == 0, b"".join(chunks).decode(errors="replace")
    os.close(leader)
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))  # colours off


def test_a_terminal_sees_the_epoch_bar_and_the_epoch_lines():
    out = _run("human", terminal=True)
    assert "training epochs" in out and "3/3" in out, out
    assert "epoch 3 done" in out, out


@pytest.mark.parametrize(("fmt", "terminal"), [("human", False), ("json", True)])
def test_pipes_and_json_logs_get_lines_without_a_bar(fmt, terminal):
    out = _run(fmt, terminal)
    assert "training epochs" not in out, out
    assert "epoch 3 done" in out, out
