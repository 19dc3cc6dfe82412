"""The ``sorting`` command line.

Exit status: 0 done; 2 bad usage or bad input (one line on stderr, no traceback);
1 internal error; 130 / 143 stopped by SIGINT / SIGTERM before the work was finished.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from sorting.errors import InputError, Interrupted
from sorting.resources import SHIPPED_MODEL, shipped_config


def _default(path: Path) -> str:
    """A help text's default: a shipped file, with where this install keeps it."""
    return f"default: the shipped {path.name} in {path.parent}".replace("%", "%%")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        sys.stderr.write(f"{self.prog}: {message}\n")
        raise SystemExit(2)


def _add_configs(p: argparse.ArgumentParser, ore: bool = True) -> None:
    p.add_argument("--machine", type=Path, default=None,
                   help=f"machine config YAML ({_default(shipped_config('machine_reference.yaml'))})")
    if ore:
        p.add_argument("--ore", type=Path, default=None,
                       help=f"ore model YAML ({_default(shipped_config('ore_crater_lake.yaml'))})")
    p.add_argument("--materials", type=Path, default=None,
                   help=f"material library YAML ({_default(shipped_config('materials.yaml'))})")


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
    belt.add_argument("--splice-every-s", type=float, default=0.0,
                      help="a steel-laced belt splice once every this many seconds (one belt revolution; 0: none)")
    belt.add_argument("--tramp", type=int, default=0, help="pieces of tramp steel (bolts, plates) on the belt")
    belt.add_argument("--slabs", type=int, default=0, help="rock slabs longer than the particle limit on the belt")
    belt.add_argument("--slab-mm", type=float, default=700.0, help="length of each slab along the belt (mm)")
    _add_configs(belt)
    for p in (rocks, belt):
        p.add_argument("--force", action="store_true",
                       help="replace the contents of a non-empty OUT (refused without it)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    insp = sub.add_parser("inspect", help="validate a dataset, recording, calibration folder, TIFF, model "
                          "(.onnx) or sorter/machine/ore/materials YAML, and summarize it")
    insp.add_argument("path", type=Path)

    run = sub.add_parser("run", help="stream a belt recording through the sorting loop")
    run.add_argument("recording", type=Path, help="xrt-belt/1 folder (its calibration/ and recording.json "
                     "are used; lines come from lines.u16 or, with --listen, from a TCP line stream)")
    run.add_argument("--model", type=Path, required=True)
    run.add_argument("--sorter", type=Path, required=True, help="sorter YAML (docs/formats.md)")
    run.add_argument("--events", type=Path, required=True, help="JSON-lines event log to write")
    run.add_argument("--realtime", action="store_true", help="pace the replay at the line rate")
    run.add_argument("--chunk-lines", type=int, default=32)
    run.add_argument("--udp", metavar="HOST:PORT", default=None, help="send valve commands as UDP datagrams")
    run.add_argument("--listen", metavar="HOST:PORT", default=None,
                     help="take lines from a TCP line stream (sorting/wire.py) instead of lines.u16")
    run.add_argument("--summary-json", type=Path, default=None, help="write the run summary as JSON")
    run.add_argument("--workers", type=int, default=1,
                     help="processes: the loop (lines, particles, decisions) and N-1 feature workers "
                          "(features, scores); the events equal one worker's")
    run.add_argument("--save-crops", type=Path, default=None, metavar="DIR",
                     help="write the decided particles' crops to DIR as an xrt-rocks/1 dataset (new or empty "
                     "folder; one worker only)")
    run.add_argument("--save-every", type=int, default=1, metavar="N",
                     help="with --save-crops: keep every N-th decided particle (default 1: every one)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    demo = sub.add_parser("demo", help="simulate a belt of Crater Lake ore and sort it with the shipped model")
    demo.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the recording, events and plot")
    demo.add_argument("--seconds", type=float, default=8.0)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--model", type=Path, default=None, help=_default(SHIPPED_MODEL))
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
    bench.add_argument("--machine", type=Path, default=None, help=_default(shipped_config("machine_reference.yaml")))
    bench.add_argument("--model", type=Path, default=None, help=_default(SHIPPED_MODEL))
    bench.add_argument("--sorter", type=Path, default=None, help=_default(shipped_config("sorter_reference.yaml")))
    bench.add_argument("--chunk-lines", type=int, default=32)
    bench.add_argument("--no-paced", action="store_true", help="skip the paced (latency) run")
    bench.add_argument("--repeats", type=int, default=3,
                       help="unpaced and --workers runs each (the median is reported; default 3)")
    bench.add_argument("--dense-seconds", type=float, default=8.0,
                       help="belt seconds of the paced run at twice the occupancy, on a simulated belt "
                       "(0: skip; default 8)")
    bench.add_argument("--workers", type=int, default=2,
                       help="also measure particle-parallel throughput with this many processes (0 or 1 = skip)")
    bench.add_argument("--save-crops", action="store_true",
                       help="also the paced run with every decided particle's crop saved (run --save-crops)")
    bench.add_argument("--quiet", action="store_true")

    # commissioning on the machine itself: `dataset` and `simulate rockbyrock` (sorting/cli/dataset.py)
    from sorting.cli.dataset import add_parsers as _add_dataset_parsers

    _add_dataset_parsers(sub, simsub, _add_configs)
    # serve: the control-PC service (sorting/cli/serve.py)
    from sorting.cli.serve import add_parser as _add_serve_parser

    _add_serve_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.verb == "simulate":
        from sorting.cli import simulate

        if args.what == "rocks":
            return simulate.cli_rocks(args)
        if args.what == "rockbyrock":
            from sorting.cli.dataset import cli_rockbyrock

            return cli_rockbyrock(args)
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
    if args.verb == "serve":
        from sorting.cli.serve import cli_serve

        return cli_serve(args)
    if args.verb == "dataset":
        from sorting.cli.dataset import cli_dataset

        return cli_dataset(args)
    if args.verb == "inspect":
        from sorting.cli.inspect import describe_any

        print(describe_any(args.path))
        return 0
    raise AssertionError(args.verb)


def _terminated(signum, frame) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM outside the sorting loop (which handles its own) ends the verb as Ctrl-C does: 143
    try:
        old_term = signal.signal(signal.SIGTERM, _terminated)
    except ValueError:  # not the main thread: the caller owns signals
        old_term = None
    try:
        return _run(args)
    except InputError as exc:
        sys.stderr.write(f"sorting {args.verb}: error: {exc}\n")
        return 2
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", int(signal.SIGINT))
        sys.stderr.write(f"sorting {args.verb}: interrupted ({signal.Signals(signum).name})\n")
        return 128 + signum
    except BrokenPipeError:
        # the reader went away (`sorting ... | head`): not an error of ours; silence the final flush
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
