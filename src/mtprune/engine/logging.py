"""Run logging: ``metrics.jsonl`` (one JSON line per epoch), TensorBoard under ``run_dir/tb``, a progress bar.

Only the main rank logs. Each JSONL record is appended with one write + fsync, so a crash never leaves half
a line; on resume, records of epochs the checkpoint does not cover are dropped. A damaged ``metrics.jsonl``
(edited by hand, or cut by a full disk) is handled on resume: an unreadable *last* line is dropped (it can only
be a cut write) and the run goes on; an unreadable line before the last is an input error naming the file and
the line.

When stdout is not a terminal (a file, a pipe, a CI log) and ``--quiet`` is not given, the command line turns on
``set_progress_lines``: every logged epoch then prints one line with its losses and metrics, every pruning step
one line with its cost and metrics (``progress_line``), and a long loop given ``lines_every`` (the MFIS search) one
line every that many steps in place of its progress bar.
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
from ..utils.errors import MTPruneInputError

log = logging.getLogger("mtprune")
_progress_lines = False


def set_progress_lines(enabled: bool) -> None:
    """Print one line per logged epoch on stdout (for non-interactive output; the CLI decides)."""
    global _progress_lines
    _progress_lines = bool(enabled)


def progress_line(text: str) -> None:
    """Print ``text`` as one line when progress lines are on (stdout not a terminal, no ``--quiet``)."""
    if _progress_lines:
        print(text, flush=True)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def epoch_line(where: str, record: Mapping[str, Any]) -> str:
    """``runs/x: epoch 3: train_loss seg=0.41 depth=0.12 | val seg.miou=31.2 ... | 2.1s``."""
    parts = [f"{where}: epoch {record.get('epoch')}"]
    for key in ("train_loss", "val"):
        flat = dict(_scalars(record[key])) if isinstance(record.get(key), Mapping) else {}
        if flat:
            parts.append(f"{key} " + " ".join(f"{k.replace('/', '.')}={_fmt(v)}" for k, v in flat.items()))
    if isinstance(record.get("time"), int | float):
        parts.append(f"{record['time']:.1f}s")
    return " | ".join(parts)


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
        if _progress_lines:
            print(epoch_line(str(self.path.parent), record), flush=True)
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
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        kept = [ln for i, ln in enumerate(lines) if ln.strip() and _epoch_of(ln, self.path, i, len(lines)) <= epoch]
        if len(kept) != len(lines):
            atomic_write_text(self.path, "".join(ln + "\n" for ln in kept))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _epoch_of(line: str, path: Path, index: int, count: int) -> float:
    """The epoch of one ``metrics.jsonl`` line; an unreadable last line counts as past every epoch (dropped)."""
    try:
        record = json.loads(line)
        epoch = record.get("epoch", 0) if isinstance(record, dict) else None
        if isinstance(epoch, int | float) and not isinstance(epoch, bool):
            return epoch
    except (json.JSONDecodeError, RecursionError):
        pass
    if index == count - 1:
        log.warning("%s: dropped an unreadable last line (a cut write)", path)
        return math.inf
    raise MTPruneInputError(f"{path}: line {index + 1} is not a metrics record (damaged file); repair or delete "
                            "that line, or start the run again with --overwrite")


def progress_enabled(quiet: bool) -> bool:
    """A bar only for an interactive terminal, and never with ``quiet``."""
    return not quiet and sys.stdout.isatty()


@contextmanager
def progress_bar(total: int, description: str, enabled: bool,
                 lines_every: int = 0) -> Iterator[Callable[[str], None]]:
    """Yield ``step(info)``, which advances the bar by one and shows ``info``; a no-op when disabled, except that
    with ``lines_every`` and progress lines on, every ``lines_every``-th step (and the last) prints
    ``description: i/total info``."""
    if not enabled:
        done = [0]

        def line(info: str = "") -> None:
            done[0] += 1
            if lines_every > 0 and (done[0] % lines_every == 0 or done[0] == total):
                progress_line(f"{description}: {done[0]}/{total} {info}".rstrip())

        yield line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total, info="")
        yield lambda info="": bar.update(task, advance=1, info=info)
