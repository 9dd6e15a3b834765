"""Suites ``pam`` and ``mfis``: merging single-task networks on ``multidigits`` (one run directory per task set)."""

from __future__ import annotations

from pathlib import Path

from .common import results_dir


def _merge_runs(method: str, configs: dict[str, list[str]], scale: str, out) -> dict:
    """Run a merge config once per task set; each run directory keeps its report, figure and summary."""
    from ..recipe import prepare_run_dir

    folder = results_dir(method, out)
    summaries = {}
    for label, overrides in configs.items():
        if scale == "small":
            overrides = [*overrides, "data.kwargs.n_train=600", "data.kwargs.n_val=200", "train.epochs=2"]
        run_dir = folder / label
        if method == "pam":
            from ..merging.experiment import load_merge_config, run_merge

            cfg = load_merge_config(Path("configs") / "merge_pam_multidigits.yaml", overrides)
            summaries[label] = run_merge(cfg, prepare_run_dir(run_dir, overwrite=True), quiet=True)
        else:
            from ..merging.mfis.run import load_mfis_config, run_from_config

            cfg = load_mfis_config(Path("configs") / "merge_mfis_multidigits.yaml", overrides)
            summaries[label] = run_from_config(cfg, prepare_run_dir(run_dir, overwrite=True), quiet=True)
    return {"suite": method, "scale": scale, "runs": list(summaries)}


def run_pam(scale: str = "cpu", out=None, **_) -> dict:
    """PAM on multidigits with LeNet-5, 2 and 3 tasks (``configs/merge_pam_multidigits.yaml``)."""
    return _merge_runs("pam", {"2tasks": [], "3tasks": ["tasks=[left,right,parity]"]}, scale, out)


def run_mfis(scale: str = "cpu", out=None, **_) -> dict:
    """MFIS on multidigits with LeNet-5, 3 tasks (``configs/merge_mfis_multidigits.yaml``)."""
    return _merge_runs("mfis", {"3tasks": []}, scale, out)
