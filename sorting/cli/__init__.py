"""The ``sorting`` command line (CONTRACT.md section 6).

Exit status: 0 done; 2 bad usage or bad input (one line on stderr, no traceback);
1 internal error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sorting.errors import InputError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"{self.prog}: {message}\n")
        raise SystemExit(2)


def _add_configs(p: argparse.ArgumentParser, ore: bool = True) -> None:
    p.add_argument("--machine", type=Path, default=None,
                   help="machine config YAML (default: configs/machine_reference.yaml)")
    if ore:
        p.add_argument("--ore", type=Path, default=None,
                       help="ore model YAML (default: configs/ore_crater_lake.yaml)")
    p.add_argument("--materials", type=Path, default=None,
                   help="material library YAML (default: configs/materials.yaml)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sorting", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)

    sim = sub.add_parser("simulate", help="generate data with the digital twin")
    simsub = sim.add_subparsers(dest="what", required=True, parser_class=_Parser)
    rocks = simsub.add_parser("rocks", help="an xrt-rocks/1 dataset of labeled rock crops")
    rocks.add_argument("out", type=Path)
    rocks.add_argument("--n", type=int, default=600, help="number of rocks (default 600)")
    rocks.add_argument("--seed", type=int, default=0)
    rocks.add_argument("--test-fraction", type=float, default=0.3, help="share of rocks in split=test")
    _add_configs(rocks)
    belt = simsub.add_parser("belt", help="an xrt-belt/1 recording with truth.csv")
    belt.add_argument("out", type=Path)
    belt.add_argument("--seconds", type=float, default=20.0)
    belt.add_argument("--seed", type=int, default=0)
    belt.add_argument("--occupancy", type=float, default=0.3, help="share of belt area covered by rocks")
    belt.add_argument("--touching", type=float, default=0.0, help="share of rocks placed touching a neighbour")
    belt.add_argument("--drift", type=float, default=0.0,
                      help="relative tube/gain drift over the run, e.g. -0.05 (air level 5 %% lower at the end)")
    _add_configs(belt)
    for p in (rocks, belt):
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    insp = sub.add_parser("inspect", help="validate a dataset or recording and summarize it")
    insp.add_argument("path", type=Path)

    run = sub.add_parser("run", help="stream a belt recording through the sorting loop")
    run.add_argument("recording", type=Path, help="xrt-belt/1 folder (its calibration/ and recording.json "
                     "are used; lines come from lines.u16 or, with --listen, from a TCP line stream)")
    run.add_argument("--model", type=Path, required=True)
    run.add_argument("--sorter", type=Path, required=True, help="sorter YAML (CONTRACT.md section 5)")
    run.add_argument("--events", type=Path, required=True, help="JSON-lines event log to write")
    run.add_argument("--realtime", action="store_true", help="pace the replay at the line rate")
    run.add_argument("--chunk-lines", type=int, default=32)
    run.add_argument("--udp", metavar="HOST:PORT", default=None, help="send valve commands as UDP datagrams")
    run.add_argument("--listen", metavar="HOST:PORT", default=None,
                     help="take lines from a TCP line stream (sorting/wire.py) instead of lines.u16")
    run.add_argument("--summary-json", type=Path, default=None, help="write the run summary as JSON")
    run.add_argument("--workers", type=int, default=1,
                     help="lane-parallel worker processes, each owning a range of columns (replay only)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="simulate a belt of Crater Lake ore and sort it with the shipped model")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the recording, events and plot")
    demo.add_argument("--seconds", type=float, default=8.0)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--model", type=Path, default=None, help="default: models/crater_lake.onnx")
    # train / predict / evaluate: the batch verbs on xrt-rocks/1 datasets (sorting/batch.py)
    from sorting.cli.batch import add_parsers as _add_batch_parsers

    _add_batch_parsers(sub)
    # select / adapt / compare: the commissioning verbs (sorting/cli/commission.py)
    from sorting.cli.commission import add_parsers as _add_commission_parsers

    _add_commission_parsers(sub)
    bench = sub.add_parser("bench", help="throughput and latency against the sorter's timing")
    bench.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    bench.add_argument("--recording", type=Path, default=None, help="an xrt-belt/1 recording (default: simulate one)")
    bench.add_argument("--seconds", type=float, default=20.0, help="belt seconds to simulate (default 20)")
    bench.add_argument("--occupancy", type=float, default=0.3)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--machine", type=Path, default=None)
    bench.add_argument("--model", type=Path, default=None, help="default: models/crater_lake.onnx")
    bench.add_argument("--sorter", type=Path, default=None, help="default: configs/sorter_reference.yaml")
    bench.add_argument("--chunk-lines", type=int, default=32)
    bench.add_argument("--no-paced", action="store_true", help="skip the paced (latency) run")
    bench.add_argument("--repeats", type=int, default=3,
                       help="unpaced and lane runs each (the median is reported; default 3)")
    bench.add_argument("--dense-seconds", type=float, default=8.0,
                       help="belt seconds of the paced run at twice the occupancy, on a simulated belt "
                       "(0: skip; default 8)")
    bench.add_argument("--workers", type=int, default=2,
                       help="also measure lane-parallel throughput with this many workers (0 = skip)")
    bench.add_argument("--quiet", action="store_true")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.verb == "simulate":
        from sorting.cli import simulate

        if args.what == "rocks":
            return simulate.cli_rocks(args)
        return simulate.cli_belt(args)
    if args.verb == "run":
        from sorting.cli.run import cli_run

        return cli_run(args)
    if args.verb == "bench":
        from sorting.cli.bench import cli_bench

        return cli_bench(args)
    if args.verb == "demo":
        from sorting.cli.demo import cli_demo

        return cli_demo(args)
    if args.verb in ("train", "predict", "evaluate"):
        from sorting.cli.batch import VERBS

        return VERBS[args.verb](args)
    if args.verb in ("select", "adapt", "compare"):
        from sorting.cli.commission import VERBS as COMMISSION_VERBS

        return COMMISSION_VERBS[args.verb](args)
    if args.verb == "inspect":
        from sorting.io import describe

        print(describe(args.path))
        return 0
    raise AssertionError(args.verb)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except InputError as exc:
        sys.stderr.write(f"sorting {args.verb}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("sorting: interrupted\n")
        return 130
    except BrokenPipeError:
        # the reader went away (`sorting ... | head`): not an error of ours; silence the final flush
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

