"""A FAKE Kubernetes control plane (API server + Kubeflow training operator + Kueue) for the custom-object calls
the training launcher makes. No cluster runs on this machine; everything else in the tests is real.

It answers the real `kubernetes` Python client over HTTP (create, get and delete of namespaced custom objects,
with the API's status codes and bodies), and plays the operator: a created `PyTorchJob`/`TrainJob` runs its
container's torchrun command on this machine (one node, the rendezvous moved to localhost) and its status
conditions follow the process, as the training operator reports them (`Created`, `Running`, then `Succeeded` /
`Complete` or `Failed`). A job carrying Kueue's queue label is `Suspended` for `admit_after_s` first.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
PATH = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"
                  r"(?:/(?P<name>[^/?]+))?")
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Job:
    def __init__(self, body: dict, plane: FakeKube) -> None:
        self.body, self.plane = body, plane
        self.created = time.monotonic()
        self.conditions = [{"type": "Created", "status": "True", "reason": "JobCreated", "lastTransitionTime": _now()}]
        self.proc: subprocess.Popen | None = None
        self.queued = QUEUE_LABEL in body["metadata"].get("labels", {})
        self.fail = plane.fail_next
        plane.fail_next = False

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The container's torchrun line, on this machine: one node, rendezvous on localhost."""
        if self.body["kind"] == "PyTorchJob":
            container = self.body["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
            line, env = [*container["command"], *container["args"]], container.get("env", [])
        else:
            line, env = self.body["spec"]["trainer"]["command"], self.body["spec"]["trainer"].get("env", [])
        assert line[0] == "torchrun", line
        port = free_port()
        swap = {"--nnodes": "--nnodes=1", "--nproc-per-node": f"--nproc-per-node={self.plane.procs}",
                "--rdzv-endpoint": f"--rdzv-endpoint=127.0.0.1:{port}"}
        line = [sys.executable, "-m", "torch.distributed.run",
                *(swap.get(a.split("=")[0], a) for a in line[1:])]
        if self.fail:  # the trainer exits 1: a real failure the operator reports as Failed
            line = [sys.executable, "-c", "import sys; print('bad input', file=sys.stderr); sys.exit(1)"]
        values = {e["name"]: e["value"] for e in env if "value" in e}
        return line, {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **values}

    def status(self) -> dict:
        if self.proc is None and not (self.queued and time.monotonic() - self.created < self.plane.admit_after_s):
            line, env = self.command()
            log = open(self.plane.logs / f"{self.body['metadata']['name']}.log", "ab")
            self.proc = subprocess.Popen(line, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            self.conditions.append({"type": "Running", "status": "True", "reason": "JobRunning",
                                    "lastTransitionTime": _now()})
        elif self.proc is None:
            return {"conditions": [*self.conditions, {"type": "Suspended", "status": "True",
                                                      "reason": "JobSuspended", "lastTransitionTime": _now()}]}
        code = self.proc.poll()
        if code is not None and self.conditions[-1]["type"] == "Running":
            done = "Succeeded" if self.body["kind"] == "PyTorchJob" else "Complete"
            self.conditions[-1]["status"] = "False"
            self.conditions.append({"type": done if code == 0 else "Failed", "status": "True",
                                    "reason": "JobSucceeded" if code == 0 else "JobFailed",
                                    "message": f"worker exited with code {code}", "lastTransitionTime": _now()})
        return {"conditions": self.conditions}

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class FakeKube:
    """Start with `with FakeKube(tmp) as kube:`; `kube.kubeconfig` is the file to point KUBECONFIG at."""

    def __init__(self, workdir: Path, procs: int = 1, admit_after_s: float = 0.0) -> None:
        self.workdir, self.procs, self.admit_after_s = workdir, procs, admit_after_s
        self.logs = workdir / "pods"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.jobs: dict[tuple[str, str, str], Job] = {}
        self.created: list[dict] = []
        self.fail_next = False
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.kubeconfig = workdir / "kubeconfig"
        url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": url}}],
            "users": [{"name": "fake", "user": {"token": "fake"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))

    def __enter__(self) -> FakeKube:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        for job in self.jobs.values():
            job.stop()

    def _handler(self):
        plane = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _key(self) -> tuple[tuple[str, str, str] | None, dict]:
                m = PATH.match(self.path)
                if not m:
                    return None, {}
                return (m["ns"], m["plural"], m["name"] or ""), m.groupdict()

            def _missing(self, name: str) -> None:
                self._send(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                                 "message": f"{name} not found"})

            def do_POST(self) -> None:
                key, parts = self._key()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                name = body["metadata"]["name"]
                with plane.lock:
                    if (parts["ns"], parts["plural"], name) in plane.jobs:
                        return self._send(409, {"kind": "Status", "status": "Failure", "reason": "AlreadyExists",
                                                "code": 409, "message": f"{name} already exists"})
                    plane.jobs[(parts["ns"], parts["plural"], name)] = Job(body, plane)
                    plane.created.append(body)
                self._send(201, body)

            def do_GET(self) -> None:
                key, _ = self._key()
                with plane.lock:
                    job = plane.jobs.get(key) if key else None
                    if job is None:
                        return self._missing(key[2] if key else self.path)
                    self._send(200, {**job.body, "status": job.status()})

            def do_DELETE(self) -> None:
                key, _ = self._key()
                with plane.lock:
                    job = plane.jobs.pop(key, None) if key else None
                if job is None:
                    return self._missing(key[2] if key else self.path)
                job.stop()
                self._send(200, {"kind": "Status", "status": "Success"})

        return Handler
