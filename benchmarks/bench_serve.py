"""Does the service's web side delay the loop? The paced reference belt three ways:

- ``run_replay``: ``sorting run --realtime`` (the bench's paced run: lines replayed in-process);
- ``run_tcp``: ``sorting run --listen`` fed over TCP by a paced feeder process;
- ``serve``: ``sorting serve`` fed the same way, with the operator page open in headless
  chromium (when installed), ``/metrics`` scraped every second and an OPC UA client subscribed
  to the counters.

Latency percentiles and late ejects are computed the same way for all three, from the event
logs (``latency_ms``, ``late``). Writes JSON (default benchmarks/results/serve/bench_serve.json).

    python benchmarks/bench_serve.py [--seconds 20] [--recording DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "crater_lake.onnx"
SORTER = REPO / "configs" / "sorter_reference.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stats(events_path: Path) -> dict:
    ev = [json.loads(x) for x in events_path.read_text().splitlines()]
    ev = [e for e in ev if "particle" in e]
    lat = np.array([e["latency_ms"] for e in ev])
    return {"particles": len(ev), "late_ejects": sum(e["decision"] == "eject" and e["late"] for e in ev),
            "undecided": sum(bool(e.get("undecided")) for e in ev),
            "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                           "p999": float(np.percentile(lat, 99.9)), "max": float(lat.max())}}


def feeder(address, recording: Path) -> subprocess.Popen:
    code = ("from sorting.io import read_belt_recording; from sorting.realtime.service.feeder import feed; "
            f"r = read_belt_recording({str(recording)!r}); "
            f"feed(({address[0]!r}, {address[1]}), r.lines, r.line_rate_hz)")
    return subprocess.Popen([sys.executable, "-c", code], env=_env())


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def wait_port(port: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


def run_replay(recording: Path, out: Path) -> dict:
    subprocess.run([sys.executable, "-m", "sorting.cli", "run", str(recording), "--model", str(MODEL), "--sorter",
                    str(SORTER), "--events", str(out), "--realtime", "--quiet"], check=True, env=_env(),
                   stdout=subprocess.DEVNULL)
    return stats(out)


def run_tcp(recording: Path, out: Path, meta: dict) -> dict:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sorting.cli", "run", str(recording), "--model", str(MODEL),
                             "--sorter", str(SORTER), "--events", str(out), "--listen", f"127.0.0.1:{port}",
                             "--quiet"], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(8)  # start-up; the feeder retries its connection until the loop listens
    f = feeder(("127.0.0.1", port), recording)
    f.wait()
    proc.wait(timeout=120)
    return stats(out)


def _page(url: str, tmp: Path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}"):
        opts.add_argument(a)
    os.environ.setdefault("SE_OFFLINE", "true")
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.get(url)
    return d


def run_serve(recording: Path, tmp: Path) -> dict:
    listen, http, opc = free_port(), free_port(), free_port()
    events = tmp / "serve_events.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "sorting.cli", "serve", str(recording), "--model", str(MODEL),
                             "--sorter", str(SORTER), "--listen", f"127.0.0.1:{listen}",
                             "--http", f"127.0.0.1:{http}", "--opcua", f"opc.tcp://127.0.0.1:{opc}",
                             "--events", str(events)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    wait_port(http)
    wait_port(listen)
    wait_port(opc)
    page = _page(f"http://127.0.0.1:{http}/", tmp)
    stop = threading.Event()
    scrapes = []
    notes = []

    def scrape():
        while not stop.is_set():
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as r:
                r.read()
            scrapes.append(time.time())
            stop.wait(1.0)

    def opcua():
        from asyncua import Client

        async def go():
            async with Client(f"opc.tcp://127.0.0.1:{opc}", timeout=10) as c:
                ns = await c.get_namespace_index("urn:sorting")
                sorter = await c.nodes.objects.get_child(f"{ns}:Sorter")

                class H:
                    def datachange_notification(self, node, val, data):
                        notes.append(val)

                sub = await c.create_subscription(250, H())
                for name in ("LinesTotal", "ParticlesTotal", "EjectsTotal", "LateTotal"):
                    await sub.subscribe_data_change(await sorter.get_child(f"{ns}:{name}"))
                while not stop.is_set():
                    await asyncio.sleep(0.2)

        asyncio.run(go())

    threads = [threading.Thread(target=scrape), threading.Thread(target=opcua)]
    for t in threads:
        t.start()
    time.sleep(2)
    f = feeder(("127.0.0.1", listen), recording)
    f.wait()
    time.sleep(2)
    stop.set()
    for t in threads:
        t.join()
    if page is not None:
        page.quit()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    res = stats(events)
    res.update({"exit_status": proc.returncode, "page_open": page is not None, "metrics_scrapes": len(scrapes),
                "opcua_notifications": len(notes)})
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--recording", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "serve" / "bench_serve.json")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from sorting.cli.bench import machine_description

    with tempfile.TemporaryDirectory(prefix="bench_serve_") as td:
        tmp = Path(td)
        rec = args.recording
        if rec is None:
            rec = tmp / "belt"
            subprocess.run([sys.executable, "-m", "sorting.cli", "simulate", "belt", str(rec), "--seconds",
                            str(args.seconds), "--seed", "0", "--quiet"], check=True, env=_env())
        meta = json.loads((rec / "recording.json").read_text())
        load = os.getloadavg()
        result = {"machine": machine_description(), "load_average_at_start": load,
                  "stream_s": meta["lines"] / meta["line_rate_hz"], "line_rate_hz": meta["line_rate_hz"],
                  "run_replay": run_replay(rec, tmp / "replay.jsonl"),
                  "run_tcp": run_tcp(rec, tmp / "tcp.jsonl", meta),
                  "serve": run_serve(rec, tmp)}
        result["load_average_at_end"] = os.getloadavg()
        result["serve_p999_minus_run_tcp_ms"] = (result["serve"]["latency_ms"]["p999"]
                                                 - result["run_tcp"]["latency_ms"]["p999"])
        result["serve_p999_minus_run_replay_ms"] = (result["serve"]["latency_ms"]["p999"]
                                                    - result["run_replay"]["latency_ms"]["p999"])
    text = json.dumps(result, indent=2)
    print(text)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
