"""Run logging: ``metrics.jsonl`` (one JSON line per epoch), TensorBoard under ``run_dir/tb``, a progress bar.

Only the main rank logs. Each JSONL record is appended with one write + fsync, so a crash never leaves half
a line; on resume, records of epochs the checkpoint does not cover are dropped.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..utils.atomic import append_line, atomic_write_text

log = logging.getLogger("mtprune")


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become ``null``."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _scalars(value, tag + "/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and key != "epoch":
            yield tag, float(value)


class RunLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events; does nothing when ``enabled`` is false."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("tensorboard is not installed; TensorBoard logging is off")
            else:
                self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        append_line(self.path, json.dumps(_clean(record), sort_keys=True, allow_nan=False))
        if self.writer is not None:
            for tag, value in _scalars(record):
                self.writer.add_scalar(tag, value, global_step=int(record["epoch"]))
            self.writer.flush()

    def drop_after(self, epoch: int) -> None:
        """Keep only the records of epochs ``<= epoch`` (used on resume; TensorBoard hides the later steps)."""
        if self.writer is not None:  # a killed run may have logged epochs its checkpoint does not cover
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self.writer.log_dir
            self.writer.close()
            self.writer = SummaryWriter(log_dir=log_dir, purge_step=epoch + 1)
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("epoch", 0) <= epoch]
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def progress_enabled(quiet: bool) -> bool:
    """A bar only for an interactive terminal, and never with ``quiet``."""
    return not quiet and sys.stdout.isatty()


@contextmanager
def progress_bar(total: int, description: str, enabled: bool) -> Iterator[Callable[[str], None]]:
    """Yield ``step(info)``, which advances the bar by one and shows ``info``; a no-op when disabled."""
    if not enabled:
        yield lambda info="": None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total, info="")
        yield lambda info="": bar.update(task, advance=1, info=info)
