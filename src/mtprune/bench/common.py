"""What every suite shares: the machine record, where results go, and resumable suite entries."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..utils.atomic import atomic_write_json
from ..utils.runtime import device_name


def machine() -> dict:
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": device_name("cpu"),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def where(m: dict) -> str:
    """The device of a result's ``machine`` record, in words: the GPU, or the CPU's model and instruction set."""
    return m.get("cpu", "cpu") if m["device"] == "cpu" else m["device"]


def timing_identity(device: str | torch.device, threads: int | None = None) -> dict:
    """What a timed entry's figures depend on besides its settings: the device named (the CPU's model and
    instruction set, or the GPU), the threads and torch. In a timed entry's fingerprint, so that ``--resume`` on
    another machine times it again instead of mixing two machines' figures in one table."""
    return {"device": device_name(device), "threads": threads or torch.get_num_threads(), "torch": torch.__version__}


def command_line(suite: str) -> str:
    """The command that runs this process, as typed: ``mtprune bench ...`` or ``python -m mtprune.bench.SUITE ...``."""
    via_cli = Path(sys.argv[0]).name == "mtprune"
    return " ".join(["mtprune" if via_cli else f"python -m mtprune.bench.{suite}", *sys.argv[1:]])


def results_dir(suite: str, out: str | Path | None) -> Path:
    path = Path(out) if out else Path("benchmarks") / "results" / suite
    path.mkdir(parents=True, exist_ok=True)
    return path


class Entries:
    """A suite's completed entries, one JSON file each under ``<folder>/entries/``.

    ``get(key, fn)`` returns the stored result of ``key`` when ``resume`` is set and the entry finished before;
    otherwise it runs ``fn()`` and stores the result atomically. A suite killed at any moment therefore resumes
    from its last completed entry (``mtprune bench SUITE --resume``); without ``--resume`` every entry reruns.
    """

    def __init__(self, folder: Path, *, resume: bool, stored_only: bool = False) -> None:
        self.folder = Path(folder) / "entries"
        self.resume = resume or stored_only
        self.stored_only = stored_only  # gather: return the finished entries, run nothing (a missing one: None)

    def path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in key)
        return self.folder / f"{safe}.json"

    def get(self, key: str, fn: Callable[[], dict], fingerprint: str | None = None) -> dict | None:
        """With ``fingerprint`` (a digest of the entry's settings), a stored entry is reused only when it was
        computed with the same one; the result is stored with it. With ``stored_only``, a missing entry is None."""
        path = self.path(key)
        if self.resume and path.is_file():
            try:
                stored = json.loads(path.read_text())
                if fingerprint is None or stored.get("fingerprint") == fingerprint:
                    return stored
            except json.JSONDecodeError:
                pass  # a damaged entry is recomputed (writes are atomic, so only a hand edit gets here)
        if self.stored_only:
            return None
        result = fn() if fingerprint is None else {**fn(), "fingerprint": fingerprint}
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, result)
        return result


def fingerprint(*parts) -> str:
    """A short digest of an entry's settings (JSON of ``parts``), for ``Entries.get``."""
    import hashlib

    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def suite_config(base: dict, overrides: dict, seed: int, label: str):
    """A suite's ``RunConfig``: ``base`` with whole keys or sections (dicts merge one level) replaced, seeded."""
    import copy

    from ..config import parse_config

    raw = copy.deepcopy(base)
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config({**raw, "seed": seed}, label)


class SuiteData:
    """What every training suite needs of one config: its tasks, datasets, an example input, a fresh model and an
    evaluator on the validation split."""

    def __init__(self, cfg) -> None:
        from .. import recipe

        self.cfg = cfg
        self.tasks = recipe.build_tasks(cfg)
        self.train_set, self.val_set = recipe.build_datasets(cfg, self.tasks)
        self.x = self.val_set[0][0].unsqueeze(0)

    def fresh(self) -> torch.nn.Module:
        from .. import recipe

        return recipe.build_configured_model(self.cfg, self.tasks)

    def evaluate(self, model: torch.nn.Module) -> dict:
        from ..engine.evaluate import evaluate

        return evaluate(model, self.val_set, self.tasks, device=self.cfg.device,
                        batch_size=self.cfg.train.eval_batch_size)
