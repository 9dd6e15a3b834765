"""The ``mtprune merge CONFIG`` sub-command: method ``pam`` (He et al., KDD 2021) or ``mfis`` (Cheng et al. 2021).

Wiring (in ``cli.py``): ``command.register(sub)`` adds the parser; ``COMMANDS["merge"] = command.run``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]


MERGE_HELP = """methods (the config's merge.method):
  pam   PAM, He et al. KDD 2021 (the default): split neurons into shared/exclusive by mutual information,
        merge, prune with Taylor-FO and retrain; merge.relevance: the permutation-null test (else fixed alpha)
  mfis  MFIS, Cheng et al. 2021 (reconstructed): NSGA-III search of which filters the tasks share;
        merge.select: knee | budget (the cheapest front point within merge.budget.accuracy_drop)

Settings live in the config: merge.* (the method's section), train.* (the single-task networks), cost.* (how
MACs and latency are measured). Examples: configs/merge_pam_presence.yaml, configs/merge_pam_multidigits.yaml,
configs/merge_mfis_multidigits.yaml; docs/merging.md describes every key."""


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``merge CONFIG [--set k=v] [--out DIR] [--overwrite] [--resume]`` to the ``mtprune`` sub-commands."""
    from mtprune.cli import HELP

    p = subparsers.add_parser("merge", help="merge single-task networks (pam or mfis), prune, and compare the cost "
                                            "of every task subset with naive merging and no merging",
                              epilog=MERGE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML merge config; merge.method picks pam or mfis (see below)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=HELP["set"])
    p.add_argument("--out", default=None, help=HELP["out"])
    p.add_argument("--overwrite", action="store_true", help=HELP["overwrite"])
    p.add_argument("--resume", action="store_true", help=HELP["resume"])
    return p


def run(args: argparse.Namespace) -> int:
    """Run a merge config; prints the cost table and writes everything into the run directory."""
    from mtprune.recipe import prepare_run_dir

    from .experiment import load_merge_config, run_merge
    from .mfis.run import load_mfis_config, merge_method, print_summary, run_from_config

    quiet, resume = getattr(args, "quiet", False), getattr(args, "resume", False)
    if merge_method(args.config, args.overrides) == "mfis":
        mcfg = load_mfis_config(args.config, args.overrides)
        run_dir = prepare_run_dir(args.out or Path("runs") / mcfg.name, overwrite=args.overwrite, resume=resume,
                                  config=mcfg)
        print_summary(run_from_config(mcfg, run_dir, quiet=quiet, resume=resume))
        print(f"report: {run_dir / 'report.md'}")
        return 0

    cfg = load_merge_config(args.config, args.overrides)
    run_dir = prepare_run_dir(args.out or Path("runs") / cfg.name, overwrite=args.overwrite, resume=resume,
                              config=cfg)
    summary = run_merge(cfg, run_dir, quiet=quiet, resume=resume)
    _print_table(summary)
    print(f"report: {run_dir / 'report.md'}")
    return 0


def _print_table(summary: dict) -> None:
    from rich.table import Table

    from mtprune.utils.console import console

    table = Table(title=f"{summary['name']}: MMACs per task subset at equal accuracy budget")
    for col in ("subset", "no merging", "naive", "PAM", "no merging / PAM"):
        table.add_column(col, justify="left" if col == "subset" else "right")
    for row in summary["table"]:
        table.add_row(row["subset"], *(f"{row[f'{a}_macs'] / 1e6:.3f}" for a in ("no_merge", "naive", "pam")),
                      f"{row['no_merge_over_pam']:.2f}×")
    console().print(table)
