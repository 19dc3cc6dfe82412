"""Starting `sorting serve` for tests: a real process on loopback, its addresses read from stderr."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "crater_lake.onnx"
SORTER = REPO / "configs" / "sorter_reference.yaml"
BANNER = re.compile(r"line stream on ([\d.]+):(\d+), page and API on http://([\d.]+):(\d+)/")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A running `sorting serve`; ``stop()`` sends SIGTERM and returns (exit status, stdout)."""

    def __init__(self, machine: Path, tmp: Path, *extra: str, token: str | None = None, opcua: bool = False,
                 model: Path = SHIPPED_MODEL):
        self.tmp = tmp
        self.events = tmp / "events.jsonl"
        self.audit = tmp / "audit.jsonl"
        self.token = token
        args = [sys.executable, "-m", "sorting.cli", "serve", str(machine), "--model", str(model),
                "--sorter", str(SORTER), "--listen", f"127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}",
                "--events", str(self.events), "--audit", str(self.audit), *extra]
        if token is not None:
            tf = tmp / "token"
            tf.write_text(token + "\n")
            tf.chmod(0o600)
            args += ["--token-file", str(tf)]
        self.opcua_url = None
        if opcua:
            self.opcua_url = f"opc.tcp://127.0.0.1:{free_port()}"
            args += ["--opcua", self.opcua_url]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.stderr_path = tmp / "serve.err"
        self._err = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._err, text=True, env=env, cwd=tmp)
        deadline = time.monotonic() + 120
        m = None
        while m is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve did not start: {self.stderr_path.read_text()}")
            time.sleep(0.1)
            m = BANNER.search(self.stderr_path.read_text())
        self.listen = (m[1], int(m[2]))
        self.http = f"http://{m[3]}:{m[4]}"

    def request(self, method: str, path: str, body=None, token: str | None = None, raw: bytes | None = None,
                headers: dict | None = None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.http + path, method=method, data=data)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def status(self) -> dict:
        code, text = self.request("GET", "/api/status")
        assert code == 200
        return json.loads(text)

    def wait_for(self, pred, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.status()
            if pred(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; last status {s}")
            time.sleep(0.1)

    def stop(self, sig=signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=60)
        self._err.close()
        return self.proc.returncode, out


def particles(path: Path) -> list[dict]:
    """The particle lines of an event log (setpoint-change records left out)."""
    out = []
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if "particle" in e:
            out.append(e)
    return out
