"""Run directories: made by mtprune (a marker file), used by one process at a time (a lock), resumed only with
the settings they were started with.

- ``--overwrite`` deletes a directory only when it holds the marker ``.mtprune-run`` that mtprune writes into
  every run directory it creates; anything else (a project folder, ``--out .``) is refused with nothing deleted.
  ``--resume`` into an existing folder without the marker is refused the same way, with nothing written.
- A lock file ``.mtprune-lock`` is held with ``fcntl.flock`` while a command runs. The kernel releases it when
  the process ends, however it ends, so a lock left by a killed run is never stale.
- On ``--resume`` the new config is compared with the run's ``config.yaml`` before anything is written; a changed
  setting outside ``RESUME_SAFE`` is refused, naming it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from .atomic import remove_stale_temporaries
from .errors import MTPruneInputError

MARKER = ".mtprune-run"
LOCK = ".mtprune-lock"
# Settings that may change on --resume: they do not change what the finished run computes (or, for the epoch
# counts, they are how a run is extended). Top-level keys by name; the others by their last component.
RESUME_SAFE_TOP = frozenset({"name", "device"})
RESUME_SAFE_LEAVES = frozenset({"epochs", "num_workers"})

_held: dict[str, int] = {}  # resolved run directory -> file descriptor of its held lock


def _is_run_dir(path: Path) -> bool:
    return (path / MARKER).is_file()


def lock_run_dir(path: Path) -> None:
    """Hold the run directory's lock for the rest of this process (or until ``release_locks``); refuse when
    another process holds it."""
    import fcntl

    key = str(path.resolve())
    if key in _held:
        return
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        os.close(fd)
        raise MTPruneInputError(f"run directory {path} is in use by another mtprune process (pid {owner}); "
                                "wait for it to finish or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = fd


def release_locks() -> None:
    """Release every run-directory lock this process holds (the CLI calls it when a command ends)."""
    while _held:
        _, fd = _held.popitem()
        os.close(fd)  # closing the descriptor drops the flock


def _clear(path: Path) -> None:
    """Delete everything in ``path`` except its lock file (which this process holds)."""
    for child in path.iterdir():
        if child.name == LOCK:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; non-mapping values are leaves."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _safe_on_resume(key: str) -> bool:
    return key in RESUME_SAFE_TOP or key.rsplit(".", 1)[-1] in RESUME_SAFE_LEAVES


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys whose values differ between two config dicts and that may not change on resume, as
    ``"key (old -> new)"``."""
    a, b = flatten(old), flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<unset>") != b.get(key, "<unset>") and not _safe_on_resume(key):
            out.append(f"{key} ({a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r})")
    return out


def check_resume_config(path: Path, new: Any) -> None:
    """Refuse resuming the run in ``path`` with a config (a pydantic config or a plain dict) whose result-changing
    settings differ from the stored ``config.yaml`` (nothing is written). The stored config is read through the
    same schema, so a key added to the schema since the run started compares as its default. A run killed before
    it wrote its config resumes with any config."""
    stored = path / "config.yaml"
    if not stored.is_file():
        return
    try:
        old = yaml.safe_load(stored.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise MTPruneInputError(f"{stored}: cannot read the run's config to check --resume "
                                f"({type(err).__name__})") from None
    if not isinstance(old, dict):
        raise MTPruneInputError(f"{stored}: damaged (not a mapping); cannot check --resume")
    if hasattr(new, "model_dump"):
        with contextlib.suppress(ValueError):  # a stored config this schema refuses: compare the raw keys
            old = type(new).model_validate(old).model_dump(mode="json")
        new = new.model_dump(mode="json")
    changed = changed_settings(old, new)
    if changed:
        raise MTPruneInputError(
            f"--resume {path}: settings changed since the run started: {', '.join(changed)}; only "
            f"{', '.join(sorted(RESUME_SAFE_TOP))} and *.{', *.'.join(sorted(RESUME_SAFE_LEAVES))} may change "
            "(use another --out for a new run)")


def prepare_run_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False,
                    config: Any = None) -> Path:
    """A run directory for one command, locked for this process (under torchrun, by rank 0).

    A path that is a file is refused. An existing non-empty directory is refused unless it holds mtprune's run
    marker and ``resume`` or ``overwrite`` is given. With ``resume`` and ``config`` (the new
    config: pydantic, or a plain dict), changed settings are refused before anything is written
    (``check_resume_config``); resuming removes the temporary files that writes killed mid-way left behind.
    """
    path = Path(path)
    if int(os.environ.get("RANK", "0") or 0) != 0:  # torchrun: rank 0 checks, clears and locks; the others use it
        path.mkdir(parents=True, exist_ok=True)
        return path
    if path.exists() and not path.is_dir():
        raise MTPruneInputError(f"--out {path}: exists and is not a directory")
    existing = path.is_dir() and any(c.name != LOCK for c in path.iterdir())
    if existing and resume and not _is_run_dir(path):
        raise MTPruneInputError(f"--resume {path}: refused, it is not a run directory made by mtprune "
                                f"(no {MARKER} file); nothing was written")
    if existing and not resume:
        if not overwrite:
            raise MTPruneInputError(f"run directory {path} already exists; pass --resume to continue it "
                                    "or --overwrite to replace it")
        if not _is_run_dir(path):
            raise MTPruneInputError(f"--overwrite {path}: refused, it is not a run directory made by mtprune "
                                    f"(no {MARKER} file); nothing was deleted")
    path.mkdir(parents=True, exist_ok=True)
    lock_run_dir(path)
    if resume and existing and config is not None:
        check_resume_config(path, config)
    if existing and overwrite and not resume:
        _clear(path)
    if resume:
        remove_stale_temporaries(path)
    marker = path / MARKER
    if not marker.is_file():
        marker.write_text("a run directory made by mtprune; --overwrite may replace it\n", encoding="utf-8")
    return path
