"""The web process of `sorting serve`: the operator page, the Prometheus metrics, the JSON API
and (with ``--opcua``) the OPC UA server, in one asyncio event loop.

Started by the loop's process as ``python -m sorting.realtime.service.web SNAP_FD CTL_FD``:
it reads the loop's snapshots from the first socket and sends setpoint requests over the
second (formats in :mod:`sorting.realtime.service.channel`). It holds nothing the loop
waits for; if it falls behind, snapshots are dropped, never the loop delayed.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import itertools
import json
import math
import os
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)

from sorting.realtime.service import channel
from sorting.resources import SERVICE_STATIC

STATIC = SERVICE_STATIC
#: request bodies over this are refused (413) before they are read
MAX_BODY_BYTES = 4096
#: attenuation shown as white on the belt picture (high channel)
PICTURE_ATT_MAX = 4.0
#: how far back the page's latency distribution looks, s
WINDOW_S = 10.0
#: how far back the page's throughput looks, s
RATE_S = 2.0
#: SSE messages queued per page at most (a slow page misses pictures, never blocks the rest)
CLIENT_QUEUE = 64
#: seconds a setpoint request waits for the loop process's answer
REPLY_TIMEOUT_S = 30.0
ALARM_TEXT = {"dropped": "lines dropped by the detector", "saturated": "saturated lines",
              "dark": "dark lines (tube off or shutter closed)", "stuck_module": "frozen detector module",
              "particle_error": "particles whose own processing failed (passed, logged with their error)",
              "tramp": "tramp metal on the belt (handled by the sorter's tramp setting)"}


class Hub:
    """The latest state as the loop published it, what the page derives from it, and the pages
    listening for updates."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.hello: dict = {}
        self.snap: dict = {"state": "NotAvailable", "lines": 0, "particles": 0, "ejects": 0, "late": 0,
                           "undecided": 0, "threshold": None, "model": cfg.get("model"), "connected": False,
                           "alarms": {}, "latency_buckets": [0] * (len(channel.LATENCY_BUCKETS_MS) + 1),
                           "latency_sum_ms": 0.0, "product": [0, 0.0], "reject": [0, 0.0], "tcp": {}}
        self.card: dict = cfg.get("model_card", {})
        self.history: deque = deque()  # (t, lines, latency buckets) for the rolling window
        self.alarms: deque = deque(maxlen=50)  # {"time", "kind", "text"} newest last
        self.clients: set[asyncio.Queue] = set()
        self.snaps = 0
        self.unauthorized = 0
        self.started = time.time()
        self._pv_dark = self._pv_flat_log = None
        self._seen: dict[str, int] = {}

    # ---------------------------------------------------------------- from the loop
    def on_hello(self, obj: dict) -> None:
        self.hello = obj
        self._pv_dark = np.asarray(obj["pv_dark"], np.float32)
        self._pv_flat_log = np.log(np.maximum(np.asarray(obj["pv_flat"], np.float32), 1.0))

    def on_snap(self, snap: dict, blob: memoryview) -> dict:
        """Take a snapshot in; returns the update sent to the pages."""
        self.snaps += 1
        card_changed = "model_card" in snap
        if card_changed:
            self.card = snap.pop("model_card")
        new_alarms = self._alarms(snap)
        self.snap = snap
        now = snap["t"]
        self.history.append((now, snap["lines"], list(snap["latency_buckets"])))
        while len(self.history) > 2 and now - self.history[0][0] > WINDOW_S:
            self.history.popleft()
        update = {"status": self.status(), "alarms_new": new_alarms, "particles": snap.get("particles_new", [])}
        if card_changed:
            update["card"] = self.card
        rows = snap.get("pv_rows", 0)
        if rows and self._pv_dark is not None:
            counts = np.frombuffer(blob, np.uint16).reshape(rows, -1).astype(np.float32)
            att = self._pv_flat_log - np.log(np.maximum(counts - self._pv_dark, 0.5))
            gray = np.clip(att * (255.0 / PICTURE_ATT_MAX), 0, 255).astype(np.uint8)
            update["belt"] = {"first_line": snap["pv_first_line"], "rows": rows, "width": gray.shape[1],
                              "sx": self.hello.get("sx"), "sy": self.hello.get("sy"),
                              "data": base64.b64encode(gray.tobytes()).decode()}
        return update

    def _alarms(self, snap: dict) -> list[dict]:
        out = []
        t = snap["t"]
        counts = dict(snap.get("alarms", {}))
        counts["late"] = snap.get("late", 0)
        counts["undecided"] = snap.get("undecided", 0)
        counts["connection"] = sum(snap.get("tcp", {}).get(k, 0) for k in ("rejected", "broken"))
        for kind, n in counts.items():
            before = self._seen.get(kind, 0)
            if n > before and self.snaps > 0:
                text = {"late": "late ejects (deadline missed, not sent)",
                        "undecided": "particles left undecided (loop overloaded)",
                        "connection": "line stream: connection dropped (bad, stalled or broken frames)"
                        }.get(kind, ALARM_TEXT.get(kind, kind))
                a = {"time": t, "kind": kind, "count": n - before, "text": text}
                out.append(a)
                self.alarms.append(a)
            self._seen[kind] = n
        return out

    def window(self) -> tuple[float | None, list[int]]:
        """Lines per second and the latency histogram over the last ``WINDOW_S``."""
        if len(self.history) < 2:
            return None, [0] * len(self.snap["latency_buckets"])
        (_, _, b0), (t1, l1, b1) = self.history[0], self.history[-1]
        # throughput over the last RATE_S (the latency distribution over the whole window)
        tr, lr = next((t, n) for t, n, _ in self.history if t1 - t <= RATE_S)
        if tr == t1:
            tr, lr = self.history[-2][0], self.history[-2][1]
        rate = (l1 - lr) / (t1 - tr) if t1 > tr else None
        return rate, [y - x for x, y in zip(b0, b1)]

    @staticmethod
    def percentile(buckets: list[int], q: float) -> float | None:
        """The bucket bound below which ``q`` of the decisions fell (an upper bound), ms."""
        n = sum(buckets)
        if n == 0:
            return None
        acc = 0
        for bound, k in zip(list(channel.LATENCY_BUCKETS_MS) + [math.inf], buckets):
            acc += k
            if acc >= q * n:
                return bound
        return math.inf

    def status(self) -> dict:
        s = self.snap
        rate, win = self.window()
        product, reject = s["product"], s["reject"]
        mass = product[1] + reject[1]
        return {
            "state": s["state"], "connected": s["connected"], "peer": s.get("peer"),
            "lines": s["lines"], "particles": s["particles"], "ejects": s["ejects"], "passes": s.get("passes", 0),
            "late": s["late"], "undecided": s["undecided"], "cut": s.get("cut", 0),
            "gaps": s.get("gaps", 0), "dropped_lines": s.get("dropped_lines", 0),
            "threshold": s["threshold"], "model": s["model"], "eject_class": s.get("eject_class"),
            "product": product[0], "reject": reject[0],
            "mass_pull": product[1] / mass if mass > 0 else None,
            "line_rate_hz": self.hello.get("line_rate_hz"),
            "throughput_lines_s": rate,
            "latency_window_ms": {"buckets_le": list(channel.LATENCY_BUCKETS_MS) + ["+Inf"], "counts": win,
                                  "p50": self.percentile(win, 0.5), "p99": self.percentile(win, 0.99)},
            "alarms": s.get("alarms", {}), "tcp": s.get("tcp", {}),
            "valve_datagrams": s.get("valve_datagrams", 0), "valve_errors": s.get("valve_errors", 0),
            "changes": s.get("changes", 0), "last_change": s.get("last_change"),
            "writes_enabled": bool(self.cfg.get("token")), "models_dir": bool(self.cfg.get("models_dir")),
            "snapshot_age_s": time.time() - s["t"] if "t" in s else None,
            "snapshots_dropped": s.get("snaps_dropped", 0),
        }

    def broadcast(self, update: dict) -> None:
        msg = "event: update\ndata: " + json.dumps(_clean(update), separators=(",", ":"), default=_jsonable) + "\n\n"
        for q in list(self.clients):
            if q.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()  # the oldest goes: a slow page misses a picture, nobody waits
            q.put_nowait(msg)

    # ---------------------------------------------------------------- Prometheus
    def collect(self):
        s = self.snap
        yield CounterMetricFamily("sorting_lines", "Detector lines processed", value=s["lines"])
        parts = CounterMetricFamily("sorting_particles", "Particles decided, by decision", labels=["decision"])
        parts.add_metric(["eject"], s["ejects"])
        parts.add_metric(["pass"], s.get("passes", 0))
        yield parts
        yield CounterMetricFamily("sorting_late", "Late ejects (deadline missed; logged, never sent)", value=s["late"])
        yield CounterMetricFamily("sorting_undecided", "Particles left undecided on overload (they pass)",
                                  value=s["undecided"])
        alarms = CounterMetricFamily("sorting_alarms", "Fault episodes, by kind", labels=["kind"])
        for kind, n in s.get("alarms", {}).items():
            alarms.add_metric([kind], n)
        yield alarms
        bounds = channel.LATENCY_BUCKETS_MS
        cum = list(itertools.accumulate(s["latency_buckets"]))
        yield HistogramMetricFamily(
            "sorting_latency_ms", "From a particle's last line acquired to its decision, ms",
            buckets=[(f"{b:g}", c) for b, c in zip(bounds, cum)] + [("+Inf", cum[-1])], sum_value=s["latency_sum_ms"])
        yield CounterMetricFamily("sorting_gaps", "Gaps in the line stream", value=s.get("gaps", 0))
        yield CounterMetricFamily("sorting_dropped_lines", "Lines missing in gaps", value=s.get("dropped_lines", 0))
        yield CounterMetricFamily("sorting_valve_datagrams", "Valve commands sent", value=s.get("valve_datagrams", 0))
        yield CounterMetricFamily("sorting_valve_errors", "Valve commands that could not be sent",
                                  value=s.get("valve_errors", 0))
        tcp = CounterMetricFamily("sorting_tcp_events", "Line stream connection events, by kind", labels=["kind"])
        for k, v in s.get("tcp", {}).items():
            if k not in ("frames", "lines"):
                tcp.add_metric([k], v)
        yield tcp
        yield CounterMetricFamily("sorting_setpoint_changes", "Threshold and model changes applied",
                                  value=s.get("changes", 0))
        yield CounterMetricFamily("sorting_http_unauthorized", "Write requests refused for a missing or wrong token",
                                  value=self.unauthorized)
        yield CounterMetricFamily("sorting_snapshots_dropped", "Loop snapshots the web side missed",
                                  value=s.get("snaps_dropped", 0))
        if s["threshold"] is not None:
            yield GaugeMetricFamily("sorting_threshold", "Score threshold in force", value=s["threshold"])
        yield GaugeMetricFamily("sorting_connected", "1 while a line stream connection is open",
                                value=1 if s["connected"] else 0)
        state = GaugeMetricFamily("sorting_state", "MachineryItemState (1 = current)", labels=["state"])
        for name in ("NotAvailable", "OutOfService", "NotExecuting", "Executing"):
            state.add_metric([name], 1 if s["state"] == name else 0)
        yield state
        info = InfoMetricFamily("sorting_model", "The model in use")
        info.add_metric([], {"name": str(s["model"]),
                             "feature_version": str(self.card.get("feature_version", "")),
                             "estimator": str(self.card.get("estimator", ""))})
        yield info
        if self.hello.get("line_rate_hz"):
            yield GaugeMetricFamily("sorting_line_rate_hz", "The machine's line rate", value=self.hello["line_rate_hz"])


def _jsonable(x):
    return str(x)


def _json(obj, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(_clean(obj), default=_jsonable), status=status,
                        content_type="application/json")


def _clean(obj):
    """``obj`` with non-finite floats as null (JSON has no inf or NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


class Service:
    """The aiohttp application and the link to the loop's process."""

    def __init__(self, cfg: dict, snap_sock: socket.socket, ctl_sock: socket.socket):
        self.cfg = cfg
        self.hub = Hub(cfg)
        self.snap_sock, self.ctl_sock = snap_sock, ctl_sock
        self.token = cfg.get("token") or None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self.opcua = None
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.hub)
        self.registry = registry

    # ---------------------------------------------------------------- app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_security_headers])
        app.router.add_get("/", self.page)
        app.router.add_get("/app.js", self.static("app.js", "text/javascript"))
        app.router.add_get("/style.css", self.static("style.css", "text/css"))
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/status", self.api_status)
        app.router.add_get("/api/model", self.api_model)
        app.router.add_get("/api/models", self.api_models)
        app.router.add_get("/api/alarms", self.api_alarms)
        app.router.add_get("/api/stream", self.stream)
        app.router.add_put("/api/threshold", self.put_threshold)
        app.router.add_put("/api/model", self.put_model)
        return app

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=(STATIC / "index.html").read_bytes(), content_type="text/html", charset="utf-8")

    def static(self, name: str, ctype: str):
        body = (STATIC / name).read_bytes()  # a fixed file of the package, read once

        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type=ctype, charset="utf-8")

        return handler

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def api_status(self, request: web.Request) -> web.Response:
        return _json(self.hub.status())

    async def api_model(self, request: web.Request) -> web.Response:
        return _json({"model": self.hub.snap["model"], "card": self.hub.card})

    async def api_models(self, request: web.Request) -> web.Response:
        folder = self.cfg.get("models_dir")
        if not folder:
            return _json({"models_dir": None, "models": []})
        names = sorted(p.name for p in Path(folder).glob("*.onnx") if p.is_file())
        return _json({"models_dir": True, "models": names})

    async def api_alarms(self, request: web.Request) -> web.Response:
        return _json({"alarms": list(self.hub.alarms)})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``hello`` once, then an ``update`` per snapshot."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        q: asyncio.Queue = asyncio.Queue(maxsize=CLIENT_QUEUE)
        hello = {"hello": {k: v for k, v in self.hub.hello.items() if k not in ("pv_dark", "pv_flat")},
                 "status": self.hub.status(), "card": self.hub.card, "alarms": list(self.hub.alarms)}
        await resp.write(("event: hello\ndata: " + json.dumps(_clean(hello), default=_jsonable) + "\n\n").encode())
        self.hub.clients.add(q)
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(q.get(), timeout=15.0)
                except asyncio.TimeoutError:
                    msg = ": keep-alive\n\n"
                await resp.write(msg.encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.hub.clients.discard(q)
        return resp

    # ---------------------------------------------------------------- writes
    def _who(self, request: web.Request) -> str:
        return f"http {request.remote}"

    def _authorize(self, request: web.Request) -> web.Response | None:
        if self.token is None:
            return _json({"error": "writes are disabled: the service runs without --token-file"}, 403)
        auth = request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            self.hub.unauthorized += 1
            resp = _json({"error": "missing or wrong bearer token"}, 401)
            resp.headers["WWW-Authenticate"] = 'Bearer realm="sorting"'
            return resp
        return None

    async def _body(self, request: web.Request, key: str):
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=request.content_length)
        raw = await request.read()  # capped by client_max_size
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _Bad("body must be a JSON object") from None
        if not isinstance(body, dict) or key not in body:
            raise _Bad(f'body must be a JSON object with "{key}"')
        return body[key]

    async def ask(self, req: dict) -> dict:
        """Send a request to the loop's process and wait for its answer."""
        rid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            if not channel.send_nowait(self.ctl_sock, {**req, "id": rid}):
                return {"ok": False, "status": 503, "error": "the loop cannot take requests now"}
            return await asyncio.wait_for(fut, REPLY_TIMEOUT_S)
        except asyncio.TimeoutError:
            return {"ok": False, "status": 503, "error": "no answer from the loop"}
        finally:
            self._waiting.pop(rid, None)

    async def put_threshold(self, request: web.Request) -> web.Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        try:
            value = await self._body(request, "threshold")
        except _Bad as exc:
            return _json({"error": str(exc)}, 400)
        reply = await self.ask({"kind": "threshold", "value": value, "who": self._who(request)})
        if not reply.get("ok"):
            return _json({"error": reply.get("error")}, reply.get("status", 400))
        return _json({"threshold": reply["threshold"], "previous": reply.get("previous"),
                      "in_force": "from the next chunk"})

    async def put_model(self, request: web.Request) -> web.Response:
        denied = self._authorize(request)
        if denied is not None:
            return denied
        try:
            name = await self._body(request, "name")
        except _Bad as exc:
            return _json({"error": str(exc)}, 400)
        reply = await self.ask({"kind": "model", "name": name, "who": self._who(request)})
        if not reply.get("ok"):
            return _json({"error": reply.get("error")}, reply.get("status", 400))
        return _json({"model": reply["model"], "previous": reply.get("previous"), "in_force": "from the next chunk"})

    # ---------------------------------------------------------------- the loop's messages
    def on_snap_readable(self) -> None:
        while True:
            try:
                msg = self.snap_sock.recv(channel.MAX_MESSAGE_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            try:
                obj, blob = channel.decode(msg)
            except ValueError:
                continue
            if obj["kind"] == "hello":
                self.hub.on_hello(obj)
            elif obj["kind"] == "snap":
                update = self.hub.on_snap(obj, blob)
                self.hub.broadcast(update)

    def on_ctl_readable(self) -> None:
        while True:
            try:
                msg = self.ctl_sock.recv(channel.MAX_MESSAGE_BYTES)
            except (BlockingIOError, InterruptedError, OSError):
                return
            try:
                obj, _ = channel.decode(msg)
            except ValueError:
                continue
            fut = self._waiting.get(obj.get("id"))
            if obj["kind"] == "reply" and fut is not None and not fut.done():
                fut.set_result(obj)


class _Bad(Exception):
    pass


@web.middleware
async def _security_headers(request: web.Request, handler):
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _json({"error": exc.reason}, exc.status)
        raise
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Cache-Control", "no-store")
    if resp.content_type == "text/html":
        resp.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; "
                                                   "style-src 'self'; script-src 'self'")
    return resp


async def _watch_parent(ppid: int, stop: asyncio.Event) -> None:
    while not stop.is_set():
        if os.getppid() != ppid:
            stop.set()
        await asyncio.sleep(0.5)


async def serve(cfg: dict, snap_sock: socket.socket, ctl_sock: socket.socket, ppid: int) -> int:
    svc = Service(cfg, snap_sock, ctl_sock)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    runner = web.AppRunner(svc.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        host, port = cfg["http"]
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        if cfg.get("opcua"):
            from sorting.realtime.service.opcua import OpcUaServer

            svc.opcua = OpcUaServer(cfg, svc.ask)
            await svc.opcua.start(svc.hub)
    except Exception as exc:  # address in use, not ours to bind, bad URL
        channel.send_nowait(ctl_sock, {"kind": "error", "message": f"{type(exc).__name__}: {exc}"})
        await runner.cleanup()
        return 2
    channel.send_nowait(ctl_sock, {"kind": "ready", "http": [list(a[:2]) for a in runner.addresses],
                                   "opcua": svc.opcua.endpoint if svc.opcua else None})
    loop.add_reader(snap_sock.fileno(), svc.on_snap_readable)
    loop.add_reader(ctl_sock.fileno(), svc.on_ctl_readable)
    watcher = asyncio.create_task(_watch_parent(ppid, stop))
    await stop.wait()
    watcher.cancel()
    loop.remove_reader(snap_sock.fileno())
    loop.remove_reader(ctl_sock.fileno())
    if svc.opcua is not None:
        await svc.opcua.stop()
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the loop's process decides when to stop
    snap_sock = socket.socket(fileno=int(argv[0]))
    ctl_sock = socket.socket(fileno=int(argv[1]))
    ppid = os.getppid()
    ctl_sock.settimeout(60.0)
    try:
        cfg, _ = channel.decode(ctl_sock.recv(channel.MAX_MESSAGE_BYTES))
    except (OSError, ValueError) as exc:
        print(f"sorting serve (web): no configuration from the loop ({exc})", file=sys.stderr)
        return 2
    snap_sock.setblocking(False)
    ctl_sock.setblocking(False)
    return asyncio.run(serve(cfg, snap_sock, ctl_sock, ppid))


if __name__ == "__main__":
    raise SystemExit(main())
