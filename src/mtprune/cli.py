"""The ``mtprune`` command: a thin layer over the library.

Exit codes: 0 success; 2 bad input (one clear line, ``--debug`` adds the traceback); 1 internal error.
"""

from __future__ import annotations

import argparse
import errno
import sys
import traceback

from .utils.errors import MTPruneInputError

HELP = {  # help texts shared by several sub-commands
    "config": "YAML config file (see configs/; every key is validated on load)",
    "set": "override one config key, e.g. --set train.lr=1e-4 (the value is parsed as YAML); repeatable",
    "out": "run directory (default runs/<config name>)",
    "overwrite": "replace an existing run directory, only one that mtprune made (it holds a .mtprune-run file)",
    "resume": "continue a killed run in its run directory; settings that change the result may not change",
    "device": "auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps",
}


class _Parser(argparse.ArgumentParser):
    """``argparse`` with one-line errors: ``mtprune CMD: error: ...`` and exit code 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def seed_list(text: str) -> tuple[int, ...]:
    """``0,2`` -> (0, 2): non-negative integers, each once."""
    try:
        seeds = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be comma-separated integers, got {text!r}") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct non-negative integers, got {text!r}")
    return seeds


def positive_int(text: str) -> int:
    """An integer >= 1 (argparse ``type``)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def input_shape(text: str) -> list[int]:
    """``C,H,W`` as positive integers (argparse ``type``)."""
    try:
        shape = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers such as 3,64,80") from None
    if not 1 <= len(shape) <= 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 to 4 positive sizes such as 3,64,80")
    return shape


def _config_command(sub, name: str, help: str, *, resume: bool = True) -> argparse.ArgumentParser:
    """A sub-command that runs a YAML config into a run directory."""
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("config", help=HELP["config"])
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=HELP["set"])
    p.add_argument("--out", default=None, help=HELP["out"])
    p.add_argument("--overwrite", action="store_true", help=HELP["overwrite"])
    if resume:
        p.add_argument("--resume", action="store_true", help=HELP["resume"])
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mtprune")
    except PackageNotFoundError:
        return "unknown"


def _bench_epilog() -> str:
    from .bench import DESCRIPTIONS, SUITES

    width = max(map(len, SUITES))
    return "suites:\n" + "\n".join(f"  {name:<{width}}  {DESCRIPTIONS.get(name, '')}" for name in SUITES)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mtprune", description="Compress multi-task neural networks.",
                epilog="exit codes: 0 success, 2 bad input (one line), 1 internal error")
    p.add_argument("--version", action="version", version=f"mtprune {_version()}")
    p.add_argument("--debug", action="store_true", help="print tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no progress lines")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="the main job on the default data, end to end")
    demo.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    demo.add_argument("--device", default="auto", help=HELP["device"])
    demo.add_argument("--overwrite", action="store_true", help=HELP["overwrite"])
    demo.add_argument("--resume", action="store_true", help=HELP["resume"])
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=HELP["set"])

    _config_command(sub, "train", "train a multi-task model from a YAML config")
    _config_command(sub, "prune", "train (or load) a model, prune it on a schedule, fine-tune, report")
    _config_command(sub, "sparsify", "unstructured sparsification (DiSparse and baselines), train, report")

    from . import export as export_command
    from .merging import command as merge_command

    merge_command.register(sub)
    export_command.register(sub)

    prof = sub.add_parser("profile", help="parameters, MACs per task subset and latency of a .mtp model")
    prof.add_argument("model", help="a .mtp model file")
    prof.add_argument("--input-shape", type=input_shape, default=None,
                      help="C,H,W (default: the shape stored in the file)")
    prof.add_argument("--batch-size", type=positive_int, default=1, help="batch size of the measured input")
    prof.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default: torch's)")
    prof.add_argument("--device", default="cpu", help=HELP["device"])
    prof.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the profile as JSON")
    prof.add_argument("--tasks", default=None, help="comma-separated tasks: the cost of serving just this subset")
    prof.add_argument("--runtime", default="torch", choices=["torch", "onnx"],
                      help="onnx: also ONNX Runtime latency (needs mtprune[onnx])")

    rep = sub.add_parser("report", help="(re)write report.md and plots of a prune run directory")
    rep.add_argument("run_dir", help="the run directory of a finished prune or sparsify run")

    from .bench import SCALES, SUITES

    bench = sub.add_parser("bench", help="run a benchmark suite; results go to benchmarks/results/SUITE/",
                           epilog=_bench_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("suite", choices=list(SUITES), metavar="SUITE", help="the suite to run (listed below)")
    bench.add_argument("--scale", default="cpu", choices=SCALES, help="model/input scale of the suite")
    bench.add_argument("--out", default=None, help="results folder (default benchmarks/results/SUITE)")
    bench.add_argument("--threads", type=positive_int, default=2, help="CPU threads for the suite")
    bench.add_argument("--resume", action="store_true",
                       help="keep the entries that already finished (only ones made at the same --scale)")
    bench.add_argument("--gather", action="store_true",
                       help="run nothing: write the tables from the entries finished so far (criteria)")
    bench.add_argument("--seeds", type=seed_list, default=None,
                       help="run only these seeds, comma-separated (suites with seeds: criteria, garg2023, pam, mfis, "
                            "disparse2022); processes with disjoint seeds may share one results folder, and a "
                            "final --resume run without --seeds writes the combined tables")
    bench.add_argument("--pools", type=lambda t: tuple(x for x in t.split(",") if x), default=None,
                       help="run only these candidate pools, comma-separated (criteria: all, backbone)")

    ev = sub.add_parser("evaluate", help="evaluate a run directory on its validation split")
    ev.add_argument("target", help="a run directory (or a .mtp file with --config)")
    ev.add_argument("--config", default=None, help="config of the data and tasks, for a .mtp file")
    ev.add_argument("--split", default=None, help="data split (default: the config's data.val_split)")
    ev.add_argument("--device", default="auto", help=HELP["device"])
    return p


def os_error_line(err: OSError) -> str:
    """One line for a failed file operation, naming the path: ``disk full: PATH`` or ``PATH: reason``."""
    path = err.filename if err.filename is not None else "?"
    if err.errno == errno.ENOSPC:
        return f"disk full: {path}"
    return f"{path}: {err.strerror or err}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .engine.logging import set_progress_lines
    from .utils.rundir import release_locks

    set_progress_lines(not args.quiet and not sys.stdout.isatty())
    try:
        from .commands import COMMANDS

        code = COMMANDS[args.command](args)
        return int(code or 0)
    except MTPruneInputError as err:
        if args.debug:
            traceback.print_exc()
        print(f"mtprune: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # read-only folder, full disk, a file where a folder should be: the user's to fix
        if args.debug:
            traceback.print_exc()
        print(f"mtprune: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mtprune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001
        if args.debug:
            traceback.print_exc()
        first = (str(err).splitlines() or [""])[0]
        print(f"mtprune: internal error: {type(err).__name__}: {first} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        release_locks()
        set_progress_lines(False)


if __name__ == "__main__":
    sys.exit(main())
