"""Benchmark suites behind ``mtprune bench SUITE``: each writes JSON, PNG and a Markdown summary under
``benchmarks/results/<suite>/``. Ratios are always measured side by side in one process."""

from __future__ import annotations

from collections.abc import Callable

from ..utils.errors import MTPruneInputError


def _speed(**kw):
    from .speed import run

    return run(**kw)


def _disparse(scale: str = "cpu", out=None, threads: int | None = 1, **_):
    """DiSparse and its baselines at 50/70/90 % sparsity, 3 seeds (``mtprune.sparsity.benchmark``)."""
    from ..sparsity.benchmark import main

    argv = ["--threads", str(threads or 1)] + (["--out", str(out)] if out else [])
    if scale == "small":
        argv += ["--seeds", "0", "--sparsities", "0.9"]
    main(argv)
    return {"suite": "disparse2022", "scale": scale}


def _merge_runs(method: str, configs: dict[str, list[str]], scale: str, out) -> dict:
    """Run a merge config once per task set; each run directory keeps its report, figure and summary."""
    from pathlib import Path

    from .common import results_dir

    folder = results_dir(method, out)
    summaries = {}
    for label, overrides in configs.items():
        if scale == "small":
            overrides = [*overrides, "data.kwargs.n_train=600", "data.kwargs.n_val=200", "train.epochs=2"]
        run_dir = folder / label
        if method == "pam":
            from ..merging.experiment import load_merge_config, run_merge
            from ..recipe import prepare_run_dir

            cfg = load_merge_config(Path("configs") / "merge_pam_multidigits.yaml", overrides)
            summaries[label] = run_merge(cfg, prepare_run_dir(run_dir, overwrite=True), quiet=True)
        else:
            from ..merging.mfis.run import load_mfis_config, run_from_config
            from ..recipe import prepare_run_dir

            cfg = load_mfis_config(Path("configs") / "merge_mfis_multidigits.yaml", overrides)
            summaries[label] = run_from_config(cfg, prepare_run_dir(run_dir, overwrite=True), quiet=True)
    return {"suite": method, "scale": scale, "runs": list(summaries)}


def _pam(scale: str = "cpu", out=None, **_):
    """PAM on multidigits with LeNet-5, 2 and 3 tasks (``configs/merge_pam_multidigits.yaml``)."""
    return _merge_runs("pam", {"2tasks": [], "3tasks": ["tasks=[left,right,parity]"]}, scale, out)


def _mfis(scale: str = "cpu", out=None, **_):
    """MFIS on multidigits with LeNet-5, 3 tasks (``configs/merge_mfis_multidigits.yaml``)."""
    return _merge_runs("mfis", {"3tasks": []}, scale, out)


def _pagcp(**kw):
    from .pagcp_vs_global import run

    return run(**kw)


SUITES: dict[str, Callable[..., dict]] = {"speed": _speed, "disparse2022": _disparse, "pam": _pam, "mfis": _mfis,
                                          "pagcp": _pagcp}


def run_suite(name: str, **kw) -> dict:
    if name not in SUITES:
        raise MTPruneInputError(f"unknown benchmark suite {name!r}; known: {', '.join(SUITES)}")
    return SUITES[name](**kw)
