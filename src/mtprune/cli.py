"""The ``mtprune`` command: a thin layer over the library.

Exit codes: 0 success; 2 bad input (one clear line, ``--debug`` adds the traceback); 1 internal error.
"""

from __future__ import annotations

import argparse
import sys
import traceback

from .utils.errors import MTPruneInputError


def _config_command(sub, name: str, help: str, *, resume: bool = True) -> argparse.ArgumentParser:
    """A sub-command that runs a YAML config into a run directory."""
    p = sub.add_parser(name, help=help)
    p.add_argument("config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    p.add_argument("--overwrite", action="store_true")
    if resume:
        p.add_argument("--resume", action="store_true")
    return p


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtprune", description="Compress multi-task neural networks.")
    p.add_argument("--debug", action="store_true", help="print tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job on the default data, end to end")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--overwrite", action="store_true")
    demo.add_argument("--resume", action="store_true")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    _config_command(sub, "train", "train a multi-task model from a YAML config")
    _config_command(sub, "prune", "train (or load) a model, prune it on a schedule, fine-tune, report")
    _config_command(sub, "sparsify", "unstructured sparsification (DiSparse and baselines), train, report")

    from .merging import command as merge_command

    merge_command.register(sub)

    prof = sub.add_parser("profile", help="parameters, MACs per task subset and latency of a .mtp model")
    prof.add_argument("model")
    prof.add_argument("--input-shape", default=None, help="C,H,W (default: the shape stored in the file)")
    prof.add_argument("--batch-size", type=int, default=1)
    prof.add_argument("--threads", type=int, default=None)
    prof.add_argument("--device", default="cpu")
    prof.add_argument("--json", dest="json_out", default=None, help="also write the profile as JSON")

    rep = sub.add_parser("report", help="(re)write report.md and plots of a prune run directory")
    rep.add_argument("run_dir")

    bench = sub.add_parser("bench", help="run a benchmark suite; results go to benchmarks/results/SUITE/")
    bench.add_argument("suite")
    bench.add_argument("--scale", default="cpu", help="model/input scale of the suite (e.g. small, cpu, gpu)")
    bench.add_argument("--out", default=None)
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--resume", action="store_true", help="keep the suite entries that already finished")

    ev = sub.add_parser("evaluate", help="evaluate a run directory on its validation split")
    ev.add_argument("target", help="a run directory (or a .mtp file with --config)")
    ev.add_argument("--config", default=None, help="config of the data and tasks, for a .mtp file")
    ev.add_argument("--split", default=None)
    ev.add_argument("--device", default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from .commands import COMMANDS

        code = COMMANDS[args.command](args)
        return int(code or 0)
    except MTPruneInputError as err:
        if args.debug:
            traceback.print_exc()
        print(f"mtprune: error: {err}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
