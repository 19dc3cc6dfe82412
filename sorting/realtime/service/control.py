"""Setpoint changes, on the loop process's side: a thread receives the web process's requests,
checks them, loads a new model off the loop, and queues the ready change; the loop applies
queued changes between chunks (:meth:`sorting.realtime.service.loop.ServiceLoop.apply_pending`).

The loop only ever pops from the queue (a ``collections.deque``: no lock it could wait on).
"""
from __future__ import annotations

import math
import re
import socket
import threading
from collections import deque
from pathlib import Path

import numpy as np

from sorting.errors import InputError
from sorting.realtime.service import channel

#: a model name: a plain file name in the models folder, no path
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.onnx$")


def check_threshold(value) -> float:
    """A threshold from a request: a finite number in [0, 1] (ValueError otherwise)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError("threshold must be a number")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {value}")
    return float(value)


def model_path(models_dir: Path | None, name) -> Path:
    """The model file ``name`` in ``models_dir``; never a path outside it.

    Raises PermissionError (no folder given), ValueError (not a plain ``*.onnx`` name),
    FileNotFoundError (no such model there)."""
    if models_dir is None:
        raise PermissionError("no --models-dir was given: models cannot be changed")
    if not isinstance(name, str) or not MODEL_NAME.match(name) or ".." in name:
        raise ValueError("name must be a plain file name ending in .onnx")
    folder = Path(models_dir).resolve()
    path = (folder / name).resolve()
    if path.parent != folder or not path.is_file():
        raise FileNotFoundError(f"no model {name!r} in the models folder")
    return path


class Control:
    """``pending``: changes ready for the loop, as tuples ``("threshold", value, who)``,
    ``("model", OnnxModel, name, who)`` or ``("audit", record)`` (a refused request)."""

    def __init__(self, sock: socket.socket, models_dir: Path | None):
        self.sock = sock
        self.models_dir = models_dir
        self.pending: deque = deque()
        self.threshold = math.nan  # what the loop last published (for replies only)
        self.model_name = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sorting-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                msg = self.sock.recv(channel.MAX_MESSAGE_BYTES)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            try:
                req, _ = channel.decode(msg)
            except ValueError:
                continue
            reply = self.handle(req)
            if reply is not None:
                try:
                    self.sock.send(channel.encode({"kind": "reply", "id": req.get("id"), **reply}))
                except OSError:
                    pass

    def _refuse(self, req: dict, what: str, status: int, why: str) -> dict:
        self.pending.append(("audit", {"who": str(req.get("who", "?")), "what": what, "old": None,
                                       "new": req.get("value", req.get("name")), "result": f"refused: {why}"}))
        return {"ok": False, "status": status, "error": why}

    def handle(self, req: dict) -> dict | None:
        kind, who = req.get("kind"), str(req.get("who", "?"))
        if kind == "threshold":
            try:
                value = check_threshold(req.get("value"))
            except ValueError as exc:
                return self._refuse(req, "threshold", 400, str(exc))
            self.pending.append(("threshold", value, who))
            return {"ok": True, "threshold": value, "previous": self.threshold}
        if kind == "model":
            from sorting.stages.inference import load_model

            name = req.get("name")
            try:
                path = model_path(self.models_dir, name)
            except PermissionError as exc:
                return self._refuse(req, "model", 403, str(exc))
            except ValueError as exc:
                return self._refuse(req, "model", 400, str(exc))
            except FileNotFoundError as exc:
                return self._refuse(req, "model", 404, str(exc))
            try:
                model = load_model(path)  # checks its features against the pipeline's
            except InputError as exc:
                return self._refuse(req, "model", 422, str(exc).split(": ", 1)[-1])
            # its first run costs extra: pay it here, not on the belt
            model.scores_f32(np.zeros((1, model.n_features), np.float32))
            self.pending.append(("model", model, name, who))
            return {"ok": True, "model": name, "previous": self.model_name}
        if kind == "audit":  # a request the web side refused before asking (e.g. a wrong token)
            record = req.get("record")
            if isinstance(record, dict):
                self.pending.append(("audit", record))
            return None
        return None
