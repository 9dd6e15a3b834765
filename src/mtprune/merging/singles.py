"""Single-task networks trained once and shared by every merge that starts from them.

PAM (He et al., KDD 2021) and MFIS (our reconstruction of Cheng et al., Cognitive Computation 2021) both merge
T single-task networks of one architecture. To compare the two *on the same networks*, and to avoid training
the network of a task again for every task set it appears in, :func:`prepare_singles` trains each network once
into a content-addressed store and lays out a ``<task>.mtp`` folder that ``merge.singles`` of either config
reads.

Task ``t`` at position ``i`` of ``cfg.tasks`` is trained exactly as ``mtprune merge`` trains it: weights
initialised under seed ``cfg.seed + i``, the trainer seeded with ``cfg.seed``, on ``cfg.data`` with ``cfg.train``.
Its store key is the hash of all of these (plus the task name), so a changed setting never reuses a network.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from mtprune import data as data_mod
from mtprune.engine.evaluate import evaluate
from mtprune.engine.trainer import train
from mtprune.io import save
from mtprune.models import build_model
from mtprune.utils.atomic import atomic_write_json
from mtprune.utils.runtime import resolve_device, seed_everything

from .experiment import MergeConfig, _train_config, tasks_of

__all__ = ["prepare_singles", "single_key"]


def single_key(cfg: MergeConfig, task: str) -> str:
    """The store key of ``task``'s network under ``cfg`` (data, model, training, seeds, task)."""
    index = cfg.tasks.index(task)
    blob = json.dumps({"task": task, "seed": cfg.seed, "init_seed": cfg.seed + index,
                       "data": cfg.data.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
                       "train": cfg.train.model_dump(mode="json"), "device": cfg.device}, sort_keys=True)
    return f"{task}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def prepare_singles(cfg: MergeConfig, store: str | Path, folder: str | Path, *, quiet: bool = True
                    ) -> dict[str, Any]:
    """Train (or reuse from ``store``) the single-task network of every task of ``cfg`` and copy them to
    ``folder/<task>.mtp``; returns ``{task: {"key", "acc", "seconds", "reused"}}`` (validation accuracy)."""
    store, folder = Path(store), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = cfg.data
    sets: tuple[Any, Any] | None = None
    info: dict[str, Any] = {}
    for i, t in enumerate(cfg.tasks):
        key = single_key(cfg, t)
        weights, meta = store / f"{key}.mtp", store / f"{key}.json"
        reused = weights.is_file() and meta.is_file()
        if not reused:
            if sets is None:
                sets = (data_mod.load(d.name, root=d.root, split=d.train_split, tasks=cfg.tasks, **d.kwargs),
                        data_mod.load(d.name, root=d.root, split=d.val_split, tasks=cfg.tasks, **d.kwargs))
            train_set, val_set = sets
            task = tasks_of(train_set, [t])
            started = time.perf_counter()
            seed_everything(cfg.seed + i)
            model = build_model(cfg.model.name, {t: task[t].out_channels}, width=cfg.model.width,
                                head=cfg.model.head, head_kwargs=cfg.model.head_kwargs or None, **cfg.model.kwargs)
            train(model, task, train_set, val_set, store / "runs" / key, _train_config(cfg.train, cfg, quiet))
            model.cpu().eval()
            metrics = evaluate(model, val_set, task, device=resolve_device(cfg.device),
                               batch_size=cfg.train.eval_batch_size)
            save(model, weights, example_inputs=train_set[0][0][None])
            shutil.rmtree(store / "runs" / key / "checkpoints", ignore_errors=True)
            atomic_write_json(meta, {"task": t, "acc": float(metrics[t]["acc"]),
                                     "seconds": time.perf_counter() - started, "epochs": cfg.train.epochs})
        record = json.loads(meta.read_text())
        shutil.copyfile(weights, folder / f"{t}.mtp")
        info[t] = {"key": key, "acc": record["acc"], "seconds": record["seconds"], "reused": reused}
    return info
