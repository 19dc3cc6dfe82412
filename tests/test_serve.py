"""`sorting serve` end to end: a real service process on loopback, lines fed over TCP, the HTTP
API, Prometheus metrics and OPC UA read by real clients from this (another) process."""
from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
import time

import numpy as np
import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("asyncua")

from serve_helpers import SHIPPED_MODEL, SORTER, Served, particles  # noqa: E402
from udp_receiver import UDPReceiver  # noqa: E402

from sorting.io import read_belt_recording  # noqa: E402
from sorting.io.wire import decode_valve  # noqa: E402
from sorting.realtime.service.feeder import feed  # noqa: E402

TOKEN = "t0ken-for-tests-0123456789abcdef"
KEYS = ("first_line", "last_line", "x_min_px", "x_max_px", "centroid_line", "centroid_px", "area_mm2", "score",
        "decision", "valves", "open_s", "close_s", "class", "cut", "split")


def _other_features_model(dest):
    """The shipped model relabelled as built on feature version 3: the pipeline must refuse it."""
    import onnx

    proto = onnx.load(str(SHIPPED_MODEL))
    for p in proto.metadata_props:
        if p.key == "sorting":
            meta = json.loads(p.value)
            meta["feature_version"] = "3"
            p.value = json.dumps(meta)
    onnx.save(proto, str(dest))


@pytest.fixture(scope="module")
def rec(small_belt):
    return read_belt_recording(small_belt)


@pytest.fixture(scope="module")
def run_events(small_belt, tmp_path_factory):
    """`sorting run` on the recording: the reference decisions."""
    from sorting.cli import main

    out = tmp_path_factory.mktemp("run") / "events.jsonl"
    assert main(["run", str(small_belt), "--model", str(SHIPPED_MODEL), "--sorter", str(SORTER),
                 "--events", str(out), "--quiet"]) == 0
    return particles(out)


@pytest.fixture(scope="module")
def served(small_belt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    models = tmp / "models"
    models.mkdir()
    shutil.copy(SHIPPED_MODEL, models / "adapted.onnx")
    _other_features_model(models / "old_features.onnx")
    (tmp / "outside.onnx").write_bytes(SHIPPED_MODEL.read_bytes())
    udp = UDPReceiver()
    udp.start()
    s = Served(small_belt, tmp, "--models-dir", str(models), "--udp", f"127.0.0.1:{udp.port}", token=TOKEN,
               opcua=True)
    s.udp = udp
    yield s
    if s.proc.poll() is None:
        s.stop()
    udp.finish()


def _feed(served, rec, **kw):
    return feed(served.listen, rec.lines, rec.line_rate_hz, **kw)


def test_decisions_equal_sorting_run_on_the_same_lines(served, rec, run_events):
    n = rec.n_lines
    _feed(served, rec)  # paced at the line rate, as the detector sends them
    s = served.wait_for(lambda s: s["lines"] == n)
    assert s["undecided"] == 0 and s["gaps"] == 0
    got = particles(served.events)
    # the particles still open at the end of the recording come out when the stream goes on
    # (`sorting run` flushes them, cut, at its end)
    assert len(got) > 50
    assert [{k: e[k] for k in KEYS} for e in got] == [{k: e[k] for k in KEYS} for e in run_events[:len(got)]]
    assert all(e["cut"] for e in run_events[len(got):])
    assert [e["particle"] for e in got] == list(range(len(got)))
    # a datagram for every in-time eject, none for the rest
    fired = {e["particle"] for e in got if e["decision"] == "eject" and not e["late"]}
    served.wait_for(lambda s: s["valve_datagrams"] == len(fired))
    assert {decode_valve(m)["particle"] for m in list(served.udp.got)} == fired


def test_metrics_are_prometheus_text_and_match_the_status(served, rec):
    from prometheus_client.parser import text_string_to_metric_families

    code, text = served.request("GET", "/metrics")
    assert code == 200
    fam = {f.name: f for f in text_string_to_metric_families(text)}
    s = served.status()
    assert fam["sorting_lines"].samples[0].value == s["lines"] == rec.n_lines
    by = {x.labels["decision"]: x.value for x in fam["sorting_particles"].samples}
    assert by["eject"] == s["ejects"] and by["eject"] + by["pass"] == s["particles"]
    assert fam["sorting_late"].samples[0].value == s["late"]
    assert {x.labels["kind"] for x in fam["sorting_alarms"].samples} >= {"dark", "saturated"}
    hist = {(x.name, x.labels.get("le")): x.value for x in fam["sorting_latency_ms"].samples}
    assert hist[("sorting_latency_ms_count", None)] == s["particles"]
    assert hist[("sorting_latency_ms_bucket", "+Inf")] == s["particles"]
    # the latencies logged fall in the buckets the metric reports
    lat = np.array([e["latency_ms"] for e in particles(served.events)])
    assert hist[("sorting_latency_ms_bucket", "50")] == np.count_nonzero(lat <= 50.0)


def test_opcua_reads_anonymously_and_writes_only_with_credentials(served, rec):
    from asyncua import Client, ua
    from asyncua.ua.uaerrors import BadUserAccessDenied

    async def session():
        async with Client(served.opcua_url, timeout=10) as c:
            ns = await c.get_namespace_index("urn:sorting")
            di = await c.get_namespace_index("http://opcfoundation.org/UA/DI/")
            mach = await c.get_namespace_index("http://opcfoundation.org/UA/Machinery/")
            sorter = await c.nodes.objects.get_child(f"{ns}:Sorter")
            # the counters reach OPC UA through the loop's snapshots: wait (bounded) until the
            # whole recording fed by the first test shows, however busy the machine is
            lines_node = await sorter.get_child(f"{ns}:LinesTotal")
            deadline = time.monotonic() + 30.0
            while await lines_node.read_value() != rec.n_lines and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            values = {name: await (await sorter.get_child(f"{ns}:{name}")).read_value()
                      for name in ("LinesTotal", "ParticlesTotal", "EjectsTotal", "LateTotal", "AlarmsTotal",
                                   "Threshold")}
            maker = await (await sorter.get_child([f"{di}:Identification", f"{di}:Manufacturer"])).read_value()
            software = await (await sorter.get_child([f"{di}:Identification", f"{di}:SoftwareRevision"])).read_value()
            model_file = await (await sorter.get_child([f"{di}:Identification", f"{ns}:ModelFile"])).read_value()
            state = await sorter.get_child([f"{mach}:MachineryItemState", "0:CurrentState"])
            state_text, state_id = await state.read_value(), await (await state.get_child("0:Id")).read_value()
            # a subscription sees the counters move while lines arrive
            seen = []

            class Handler:
                def datachange_notification(self, node, val, data):
                    seen.append(val)

            sub = await c.create_subscription(100, Handler())
            await sub.subscribe_data_change(await sorter.get_child(f"{ns}:LinesTotal"))
            feeder = threading.Thread(target=_feed, args=(served, rec), kwargs={"stop": 3000})
            feeder.start()
            while feeder.is_alive():
                await asyncio.sleep(0.1)
            # until the fed lines are through the loop and their counters reached the subscription
            await asyncio.to_thread(served.wait_for, lambda s: s["lines"] == rec.n_lines + 3000)
            deadline = time.monotonic() + 30.0
            while (not seen or seen[-1] != rec.n_lines + 3000) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            thr = await sorter.get_child(f"{ns}:Threshold")
            with pytest.raises(BadUserAccessDenied):
                await thr.write_value(ua.Variant(0.5, ua.VariantType.Double))
            return values, maker, software, model_file, state_text, state_id, seen, mach

    values, maker, software, model_file, state_text, state_id, seen, mach = asyncio.run(session())
    assert values["LinesTotal"] == rec.n_lines and values["Threshold"] == pytest.approx(served.status()["threshold"])
    assert values["ParticlesTotal"] >= values["EjectsTotal"] > 0 and values["LateTotal"] == 0
    assert maker.Text and software.startswith("sorting ") and model_file == "crater_lake.onnx"
    assert state_text.Text in ("Executing", "NotExecuting")
    assert state_id.Identifier == {"Executing": 5006, "NotExecuting": 5007}[state_text.Text]
    assert state_id.NamespaceIndex == mach
    assert len(seen) >= 2 and seen[-1] > seen[0] >= rec.n_lines  # the second feed was seen arriving
    assert served.status()["threshold"] == pytest.approx(values["Threshold"])  # the anonymous write changed nothing

    async def signed_in(password):
        from asyncua import Client, ua

        c = Client(served.opcua_url, timeout=10)
        c.set_user("metallurgist")
        c.set_password(password)
        async with c:
            ns = await c.get_namespace_index("urn:sorting")
            thr = await c.nodes.objects.get_child([f"{ns}:Sorter", f"{ns}:Threshold"])
            await thr.write_value(ua.Variant(0.25, ua.VariantType.Double))

    with pytest.raises(Exception):
        asyncio.run(signed_in("not-the-token-000000"))
    asyncio.run(signed_in(TOKEN))
    served.wait_for(lambda s: s["threshold"] == 0.25)
    audit = [json.loads(x) for x in served.audit.read_text().splitlines()]
    assert audit[-1]["who"] == "opcua metallurgist" and audit[-1]["new"] == 0.25 and audit[-1]["result"] == "applied"


def test_threshold_writes_need_the_token_and_a_valid_body(served):
    put = served.request
    before = served.status()["threshold"]
    assert put("PUT", "/api/threshold", {"threshold": 0.5})[0] == 401
    assert put("PUT", "/api/threshold", {"threshold": 0.5}, token="wrong-token-wrong-token")[0] == 401
    assert put("PUT", "/api/threshold", {"threshold": 1.5}, token=TOKEN)[0] == 400
    assert put("PUT", "/api/threshold", {"threshold": -0.1}, token=TOKEN)[0] == 400
    assert put("PUT", "/api/threshold", {"threshold": True}, token=TOKEN)[0] == 400
    assert put("PUT", "/api/threshold", {"value": 0.5}, token=TOKEN)[0] == 400
    assert put("PUT", "/api/threshold", raw=b"{not json", token=TOKEN)[0] == 400
    assert put("PUT", "/api/threshold", raw=b'{"threshold": 0.5, "pad": "' + b"x" * 10000 + b'"}',
               token=TOKEN)[0] == 413
    assert served.status()["threshold"] == before
    code, text = put("PUT", "/api/threshold", {"threshold": 0.6}, token=TOKEN)
    assert code == 200 and json.loads(text)["threshold"] == 0.6
    served.wait_for(lambda s: s["threshold"] == 0.6)


def test_a_threshold_change_is_in_force_from_the_next_chunk(served, rec):
    """Particles decided after the change record use the new threshold, those before the old one."""
    _feed(served, rec, stop=4000)
    served.wait_for(lambda s: s["lines"] == rec.n_lines + 3000 + 4000)
    lines = [json.loads(x) for x in served.events.read_text().splitlines()]
    thr = None
    checked = 0
    for e in lines:
        if e.get("change") == "threshold":
            thr = e["new"]
        elif "particle" in e and thr is not None and not e.get("undecided"):
            assert (e["class"] == "sc") == (e["score"] >= thr), (e, thr)
            checked += 1
    assert checked > 20
    changes = [e for e in lines if "change" in e]
    assert [c["new"] for c in changes if c["change"] == "threshold"][-2:] == [0.25, 0.6]
    # nothing skipped or processed twice: every line fed was processed once
    s = served.status()
    assert s["tcp"]["lines"] == s["lines"] and s["tcp"]["restarts"] >= 2


def test_model_swap_only_from_the_models_folder_and_only_on_the_same_features(served, rec):
    put = served.request
    code, text = put("PUT", "/api/model", {"name": "old_features.onnx"}, token=TOKEN)
    assert code == 422 and "other features" in text
    assert put("PUT", "/api/model", {"name": "missing.onnx"}, token=TOKEN)[0] == 404
    assert put("PUT", "/api/model", {"name": "../outside.onnx"}, token=TOKEN)[0] == 400
    assert put("PUT", "/api/model", {"name": "/etc/passwd"}, token=TOKEN)[0] == 400
    assert put("PUT", "/api/model", {"name": "adapted.onnx"})[0] == 401
    assert served.status()["model"] == "crater_lake.onnx"  # the running one kept going
    code, text = put("PUT", "/api/model", {"name": "adapted.onnx"}, token=TOKEN)
    assert code == 200
    _feed(served, rec, stop=2000)
    s = served.wait_for(lambda s: s["model"] == "adapted.onnx" and s["tcp"]["lines"] == s["lines"]
                        and not s["connected"])
    assert s["threshold"] == 0.6  # an operator's threshold stays in force across a model swap
    audit = [json.loads(x) for x in served.audit.read_text().splitlines()]
    swaps = [a for a in audit if a["what"] == "model"]
    assert [a["result"].split(":")[0] for a in swaps] == ["refused", "refused", "refused", "refused", "applied"]
    assert swaps[-1]["old"] == "crater_lake.onnx" and swaps[-1]["new"] == "adapted.onnx"
    assert all(a["who"].startswith("http 127.0.0.1") for a in swaps)


def test_sigterm_stops_with_exit_0_and_a_complete_log(served):
    before = served.status()
    code, out = served.stop(signal.SIGTERM)
    assert code == 0, out
    assert "stopped by a signal" in out
    got = particles(served.events)
    # every particle decided is in the log, numbered without a hole (those still open were flushed at the stop)
    assert [e["particle"] for e in got] == list(range(len(got)))
    assert len(got) >= before["particles"]
    assert f"({len(got)} particles" in out


def test_without_a_token_file_every_write_is_refused(small_belt, tmp_path):
    s = Served(small_belt, tmp_path)
    try:
        assert s.request("PUT", "/api/threshold", {"threshold": 0.5}, token="anything-anything-1")[0] == 403
        assert s.request("PUT", "/api/model", {"name": "x.onnx"})[0] == 403
        code, page = s.request("GET", "/")
        assert code == 200 and "<canvas" in page
        assert s.status()["connected"] is False
    finally:
        assert s.stop(signal.SIGINT)[0] == 0


def test_a_token_file_readable_by_others_is_refused(small_belt, tmp_path):
    import subprocess
    import sys

    tf = tmp_path / "token"
    tf.write_text(TOKEN + "\n")
    tf.chmod(0o644)
    r = subprocess.run([sys.executable, "-m", "sorting.cli", "serve", str(small_belt), "--model", str(SHIPPED_MODEL),
                        "--sorter", str(SORTER), "--listen", "127.0.0.1:1", "--http", "127.0.0.1:2",
                        "--token-file", str(tf), "--events", str(tmp_path / "e.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "group or others" in r.stderr
    assert not (tmp_path / "e.jsonl").exists()
