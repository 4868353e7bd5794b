"""Open an HTML report in real headless Chromium, as a person would, over the DevTools protocol: what the
console said, which images failed to decode, how much text shows, and a screenshot. Chromium comes from
Debian's package (`make sysdeps`, `.ci/run`)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from websockets.sync.client import connect

from tests.helpers import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
BROKEN_IMAGES = "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"


@dataclass
class Rendered:
    errors: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    images: int = 0
    text_chars: int = 0
    screenshot: Path | None = None


class _Tab:
    def __init__(self, ws_url: str) -> None:
        self.ws = connect(ws_url, max_size=None, open_timeout=20)
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    def call(self, method: str, timeout: float = 30, **params) -> dict:
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_event(self, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == name for e in self.events):
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))))

    def value(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"]["value"]

    def errors(self) -> list[str]:
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(p["exceptionDetails"].get("exception", {}).get("description") or p["exceptionDetails"]["text"])
            elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
            elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(p["entry"]["text"] + " " + p["entry"].get("url", ""))
        return out


def render(page: Path | str, screenshot: Path, width: int = 1280, height: int = 1000,
           settle_s: float = 0.0) -> Rendered:
    """Load `page` (a file or a URL) and report what a person would see; the screenshot covers the whole page
    height. `settle_s` gives a single-page app (the MLflow UI) time to fetch and draw after the load event."""
    assert CHROMIUM, "chromium is not installed: run `make sysdeps` (Debian package `chromium`)"
    port = free_port()
    # Chromium's helper processes (renderer, crashpad) outlive the browser process by a moment and keep writing
    # to the profile: the whole process group is stopped and waited for before the profile is removed (a profile
    # file written during the removal once failed a CI run with "Directory not empty").
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                 f"--remote-debugging-port={port}", f"--user-data-dir={profile}",
                                 f"--window-size={width},{height}", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            return _inspect(port, page, screenshot, width, settle_s)
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the browser's process group, SIGKILL to what is left after 10 s, then until none is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.wait(5)
                return
            proc.poll()
            time.sleep(0.05)


def _inspect(port: int, page: Path | str, screenshot: Path, width: int, settle_s: float) -> Rendered:
    deadline = time.monotonic() + 30
    while True:
        try:
            tabs = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
            ws_url = next(t["webSocketDebuggerUrl"] for t in tabs if t["type"] == "page")
            break
        except (httpx.HTTPError, StopIteration):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    tab = _Tab(ws_url)
    try:
        for domain in ("Page", "Runtime", "Log"):
            tab.call(f"{domain}.enable")
        tab.call("Page.navigate", url=page if isinstance(page, str) else page.resolve().as_uri())
        tab.wait_event("Page.loadEventFired")
        time.sleep(settle_s)
        out = Rendered(broken_images=tab.value(BROKEN_IMAGES), images=tab.value("document.images.length"),
                       text_chars=tab.value("document.body ? document.body.innerText.trim().length : 0"))
        full = tab.value("Math.max(document.body.scrollHeight, document.documentElement.scrollHeight)")
        tab.call("Emulation.setDeviceMetricsOverride", width=width, height=min(int(full), 8000),
                 deviceScaleFactor=1, mobile=False)
        shot = tab.call("Page.captureScreenshot", format="png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        out.screenshot = screenshot
        out.errors = tab.errors()
        return out
    finally:
        tab.ws.close()
