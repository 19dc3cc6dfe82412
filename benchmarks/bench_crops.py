"""Feature extraction over many rock crops: crops per second and peak memory, on 1 and 2 local
processes (joblib) and on a Dask LocalCluster (loopback), the path of train/predict/evaluate/
select/adapt (sorting.stages.features.dataset_features).

With ``--verbs N``: the verbs themselves (``train``, ``predict``, ``evaluate``, ``select``,
``adapt``), each a ``sorting`` command in its own process on the first N crops (a dataset of
symbolic links to them), with ``--jobs 1``, ``--jobs 2`` and ``--scheduler`` (a Dask
LocalCluster of 2 single-threaded worker processes on loopback): wall seconds, crops per
second (crops / wall seconds, the whole verb: features, fitting, cross-validation, writing),
and the peak resident memory of the verb's process tree (and of the cluster's workers).
``adapt`` runs with ``--no-parent-data`` (the parent's training rocks are not regenerated).

With ``--paced``: the reference belt (20 s, occupancy 0.3, seed 0, as ``sorting bench`` builds
it) run paced at the line rate (``sorting run --realtime``) without and with every particle's
crop saved (``--save-crops DIR --save-every 1``), alternately, ``--repeats`` times each: late
count, p99.9 latency, crops written and dropped, and the 1-minute load average before each run
(the machine may be shared; ``--settle S`` waits up to S seconds before each run for the
machine to be idle, and records how busy it was).

The crops are simulated once into --work and reused, and read once before the configurations,
so that each reads them from the OS's file cache (not the first from disk and the rest from
memory). Each configuration runs in a fresh
subprocess, so its peak memory (ru_maxrss of the process and of its finished children) is its
own: ru_maxrss of the main process, and the peak of the whole process tree (main process and
workers, sampled with psutil). Writes benchmarks/results/crops.json.

    python benchmarks/bench_crops.py [--n 10000] [--work /tmp/bench_crops] [--out FILE]
    python benchmarks/bench_crops.py --verbs 10000 [--work /tmp/bench_crops]
    python benchmarks/bench_crops.py --paced [--repeats 2] [--settle 600] [--work /tmp/bench_crops]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIGS = ("local_1", "local_2", "dask_local_2")


def one(config: str, dataset: Path) -> dict:
    """Run one configuration in this process; returns its figures."""
    import numpy as np

    from sorting.io import read_rocks_dataset
    from sorting.parallel import Workers
    from sorting.stages.calibrate import calibrate
    from sorting.stages.features import dataset_features

    ds = read_rocks_dataset(dataset)
    cal = calibrate(ds.calibration)
    n = len(ds.rows)
    cluster = None
    if config == "local_1":
        workers = Workers(1)
    elif config == "local_2":
        workers = Workers(2)
    else:
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, protocol="tcp", host="127.0.0.1",
                               dashboard_address="127.0.0.1:0")
        workers = Workers(-1, cluster.scheduler_address)
    # warm-up on the same workers: processes started, kernels loaded (compiled once, cached on
    # disk); the start-up is timed on its own
    t0 = time.perf_counter()
    dataset_features(ds, cal, range(min(64, n)), progress=False, workers=workers, chunk_rocks=32)
    startup = time.perf_counter() - t0
    peak = _TreePeak()
    t0 = time.perf_counter()
    X, ok, _ = dataset_features(ds, cal, progress=False, workers=workers)
    wall = time.perf_counter() - t0
    tree_mb = peak.stop()
    if cluster is not None:
        cluster.close()
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"config": config, "crops": n, "ok": int(ok.sum()), "seconds": round(wall, 2),
            "crops_per_s": round(n / wall, 1), "startup_seconds": round(startup, 2),
            "peak_rss_mb": round(self_kb / 1024, 1), "peak_rss_mb_process_tree": tree_mb,
            "feature_checksum": float(np.nansum(X.astype(np.float64)))}


def _warm_file_cache(dataset: Path) -> float:
    """Read every file of the dataset once (into the OS's file cache); returns the seconds taken."""
    t0 = time.perf_counter()
    buf = bytearray(1 << 20)
    for path in sorted(dataset.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    return time.perf_counter() - t0


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "load_average_1min": os.getloadavg()[0]}


class _TreePeak:
    """Peak resident memory of this process and all its descendants (workers), sampled every 0.1 s."""

    def __init__(self) -> None:
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            import psutil  # noqa: F401 - only whether it is there
        except ImportError:
            return
        me = [os.getpid()]
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, _tree_rss_mb(me))

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return round(self.peak, 1) if self.peak else None


VERBS = ("train", "predict", "evaluate", "select", "adapt")


def subset(dataset: Path, n: int, work: Path) -> Path:
    """The first ``n`` rows of ``dataset`` as a dataset of their own (links to the same files)."""
    out = work / f"{dataset.name}_first_{n}"
    if (out / "dataset.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for name in ("rocks", "calibration"):
        if not (out / name).exists():
            (out / name).symlink_to((dataset / name).resolve())
    with open(dataset / "rocks.csv") as src, open(out / "rocks.csv", "w") as dst:
        for k, line in enumerate(src):
            if k > n:
                break
            dst.write(line)
    shutil.copy(dataset / "dataset.json", out / "dataset.json")
    return out


def _tree_rss_mb(pids: list[int]) -> float:
    import psutil

    total = 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p, *p.children(recursive=True)]
        except psutil.Error:
            continue
        for q in procs:
            try:
                total += q.memory_info().rss
            except psutil.Error:
                pass
    return total / 2**20


def verbs(dataset: Path, work: Path) -> list[dict]:
    """Each verb once per configuration, in its own process; wall seconds and peak memory."""
    from sorting.resources import SHIPPED_MODEL

    runs = []
    model = work / "verbs_model.onnx"
    n = sum(1 for _ in open(dataset / "rocks.csv")) - 1
    for config in CONFIGS:
        cluster = None
        extra = ["--jobs", "1" if config == "local_1" else "2"]
        watch: list[int] = []
        if config.startswith("dask"):
            from distributed import LocalCluster

            cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, protocol="tcp",
                                   host="127.0.0.1", dashboard_address="127.0.0.1:0")
            extra = ["--scheduler", cluster.scheduler_address]
            watch = [w.pid for w in cluster.workers.values() if getattr(w, "pid", None)]
        for verb in VERBS:
            out = work / f"verb_{config}_{verb}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            argv = {"train": ["train", str(dataset), "--out", str(model)],
                    "predict": ["predict", str(dataset), "--model", str(model), "--out", str(out / "scores.csv")],
                    "evaluate": ["evaluate", str(dataset), "--model", str(model), "--report", str(out / "report")],
                    "select": ["select", str(dataset), "--model", str(SHIPPED_MODEL), "--n", "100", "--out",
                               str(out / "picks.csv")],
                    "adapt": ["adapt", str(SHIPPED_MODEL), str(dataset), "--out", str(out / "adapted.onnx"),
                              "--no-parent-data"]}[verb]
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "sorting.cli", *argv, *extra, "--quiet"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            peak = 0.0
            while proc.poll() is None:
                peak = max(peak, _tree_rss_mb([proc.pid, *watch]))
                time.sleep(0.1)
            wall = time.perf_counter() - t0
            err = proc.stderr.read()
            if proc.returncode != 0:
                raise RuntimeError(f"{verb} ({config}) failed: {err.strip()[-500:]}")
            r = {"verb": verb, "config": config, "crops": n, "seconds": round(wall, 2),
                 "crops_per_s": round(n / wall, 1), "peak_rss_mb_process_tree": round(peak, 1),
                 "load_average_1min_before": round(load, 2)}
            runs.append(r)
            print(r, flush=True)
        if cluster is not None:
            cluster.close()
    return runs


def _match(run: Path, model: Path) -> dict:
    """``sorting predict`` on a run's saved crops against the run's event log: the share of
    crops whose batch score is within 1e-3 of the loop's."""
    import csv

    subprocess.run([sys.executable, "-m", "sorting.cli", "predict", str(run / "crops"), "--model", str(model),
                    "--out", str(run / "scores.csv"), "--quiet"], check=True, capture_output=True)
    loop = {}
    with open(run / "events.jsonl") as fh:
        for line in fh:
            e = json.loads(line)
            loop[str(e["particle"])] = e["score"]
    with open(run / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    close = sum(abs(float(r["score"]) - loop[r["rock_id"]]) < 1e-3 and not r["problem"] for r in rows)
    return {"crops": len(rows), "within_1e-3": close, "fraction": round(close / max(len(rows), 1), 5)}


def _busy(seconds: float = 5.0) -> float:
    """The share of the machine's CPU time that was busy over ``seconds`` (/proc/stat; None elsewhere)."""
    def sample():
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:9]]
        return sum(v), v[3] + v[4]
    try:
        t0, i0 = sample()
        time.sleep(seconds)
        t1, i1 = sample()
    except OSError:
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def _settle(limit_s: float) -> float | None:
    """Wait (up to ``limit_s``) until the machine is idle, another's job not running: under 10 %
    busy over 5 s. Returns the last busy share."""
    t0 = time.monotonic()
    while True:
        busy = _busy()
        if busy is None or busy < 0.10 or time.monotonic() - t0 > limit_s:
            return busy
        print(f"machine busy ({busy:.0%}); waiting", flush=True)
        time.sleep(25)


def paced(work: Path, repeats: int, settle_s: float = 0.0) -> dict:
    """The reference belt paced, without and with --save-crops (every particle), alternately.
    ``settle_s``: before each run, wait up to that long for the machine to be idle."""
    from sorting.cli import main as sorting
    from sorting.realtime.events import missed_deadlines
    from sorting.resources import SHIPPED_MODEL, shipped_config

    belt = work / "reference_belt"
    if not (belt / "recording.json").is_file():
        assert sorting(["simulate", "belt", str(belt), "--seconds", "20", "--seed", "0", "--occupancy", "0.3",
                        "--quiet"]) == 0
    runs = []
    for k in range(repeats):
        for save in (False, True):
            tmp = Path(tempfile.mkdtemp(prefix="bench_crops_", dir=work))
            argv = [sys.executable, "-m", "sorting.cli", "run", str(belt), "--model", str(SHIPPED_MODEL), "--sorter",
                    str(shipped_config("sorter_reference.yaml")), "--events", str(tmp / "events.jsonl"),
                    "--realtime", "--quiet", "--summary-json", str(tmp / "summary.json")]
            if save:
                argv += ["--save-crops", str(tmp / "crops"), "--save-every", "1"]
            busy = _settle(settle_s) if settle_s > 0 else None
            load = os.getloadavg()[0]
            subprocess.run(argv, check=True, capture_output=True, text=True)
            s = json.loads((tmp / "summary.json").read_text())
            r = {"save_crops": save, "load_average_1min_before": round(load, 2), "particles": s["particles"],
                 "late": missed_deadlines(s["late_ejects"], s.get("undecided", 0)), "late_ejects": s["late_ejects"],
                 "undecided": s.get("undecided", 0), "p50_ms": round(s["latency_ms"]["p50"], 2),
                 "p99_ms": round(s["latency_ms"]["p99"], 2), "p999_ms": round(s["latency_ms"]["p999"], 2),
                 "max_ms": round(s["latency_ms"]["max"], 2), "cpu_fraction": round(s["cpu_fraction"], 3),
                 "intake_lag_p999_ms": round(s["intake_lag_ms"]["p999"], 2),
                 "step_p999_ms": round(s["step_ms"]["p999"], 2)}
            if busy is not None:
                r["cpu_busy_before"] = round(busy, 3)
            if save:
                c = s["save_crops"]
                r.update({"crops_written": c["written"], "crops_dropped": c["dropped"],
                          "crops_skipped": c["crops_skipped"], "writer_error": c.get("writer_error")})
                r["predict_matches_loop"] = _match(tmp, SHIPPED_MODEL)
            runs.append(r)
            print(r, flush=True)
            shutil.rmtree(tmp, ignore_errors=True)
    return {"belt": {"seconds": 20, "seed": 0, "occupancy": 0.3}, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="crops to simulate (once) and measure")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_crops"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "crops.json")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--paced", action="store_true", help="the paced reference belt with and without --save-crops")
    ap.add_argument("--repeats", type=int, default=2, help="with --paced: runs of each")
    ap.add_argument("--settle", type=float, default=0.0, metavar="S",
                    help="with --paced: before each run, wait up to S seconds for an idle machine")
    ap.add_argument("--verbs", type=int, default=0, metavar="N", help="the verbs themselves on the first N crops")
    args = ap.parse_args()
    if args.verbs:
        dataset = subset(args.work / f"rocks_{args.n}", args.verbs, args.work)
        result = json.loads(args.out.read_text()) if args.out.is_file() else {}
        result["verbs"] = {"machine": _machine(), "crops": args.verbs, "runs": verbs(dataset, args.work)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
        return
    if args.paced:
        args.work.mkdir(parents=True, exist_ok=True)
        result = json.loads(args.out.read_text()) if args.out.is_file() else {}
        result["paced_save_crops"] = {"machine": _machine(), **paced(args.work, args.repeats, args.settle)}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
        return
    dataset = args.work / f"rocks_{args.n}"
    if args.one:
        print(json.dumps(one(args.one, dataset)))
        return
    if not (dataset / "dataset.json").is_file():
        from sorting.cli import main as sorting

        assert sorting(["simulate", "rocks", str(dataset), "--n", str(args.n), "--seed", "7", "--quiet"]) == 0
    # every configuration reads the crops from memory: the first one used to read them from disk
    # (1.7 GB for 100,000 crops), which alone cut its rate from about 2,200 to 1,250 crops/s
    warm_s = _warm_file_cache(dataset)
    runs = []
    for config in args.configs:
        load = os.getloadavg()[0]
        p = subprocess.run([sys.executable, __file__, "--one", config, "--n", str(args.n), "--work", str(args.work)],
                           capture_output=True, text=True, check=True)
        runs.append({**json.loads(p.stdout.strip().splitlines()[-1]), "load_average_1min_before": round(load, 2)})
        print(runs[-1], flush=True)
    base = next((r for r in runs if r["config"] == "local_1"), None)
    for r in runs:
        r["speedup_over_1"] = round(r["crops_per_s"] / base["crops_per_s"], 2) if base else None
        r["same_features_as_1"] = base is None or r["feature_checksum"] == base["feature_checksum"]
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.update({"machine": _machine(), "crops": args.n, "file_cache_warmed_s": round(warm_s, 1), "runs": runs})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
