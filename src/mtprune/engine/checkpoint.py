"""Training checkpoints: atomic writes, ``weights_only`` loading, RNG states as plain tensors.

A checkpoint is a dict of tensors and plain containers (its keys are listed in ``trainer.py``), so that
``torch.load(path, weights_only=True)`` reads it: nothing is unpickled.
"""

from __future__ import annotations

import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.atomic import atomic_save
from ..utils.errors import MTPruneInputError

FORMAT = "mtprune-train-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file, fsync, rename)."""
    atomic_save(path, lambda tmp: torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a file of another kind is refused."""
    try:
        with warnings.catch_warnings():  # e.g. "unsupported pickle protocol": the error below says it all
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # any failure to read means a bad or missing file; nothing was unpickled
        raise MTPruneInputError(f"cannot read checkpoint {path}: {_describe_load_error(err)}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise MTPruneInputError(f"{path} is not an mtprune training checkpoint")
    if payload.get("version") != VERSION:
        raise MTPruneInputError(f"{path}: checkpoint version {payload.get('version')} is not {VERSION}")
    return payload


def load_model_state(model: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the ``model`` weights of the checkpoint at ``path`` into ``model``; returns the checkpoint.

    A file that is not a checkpoint, or whose weights do not fit ``model``, is an input error naming the file.
    """
    payload = load_checkpoint(path)
    from ..utils.statedict import check_state_fits

    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        check_state_fits(model, payload["model"], f"{path}: the checkpoint's model weights")
    try:
        model.load_state_dict(payload["model"])
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise MTPruneInputError(f"{path}: the checkpoint's model weights do not fit the model "
                                f"({type(err).__name__}: {one_line(err)})") from err
    return payload


def _describe_load_error(err: BaseException) -> str:
    """One line on why ``torch.load(..., weights_only=True)`` failed."""
    if isinstance(err, pickle.UnpicklingError):
        _, _, detail = str(err).partition("WeightsUnpickler error:")
        detail = next((ln.strip() for ln in detail.splitlines() if ln.strip()), "").split(". ")[0].rstrip(".")
        if detail.startswith("Unsupported global"):
            return (f"refused: it holds objects other than tensors and plain containers ({detail}); "
                    "nothing in it was run")
        return f"not a weights-only PyTorch checkpoint, or corrupted ({detail or 'unreadable pickle'})"
    if isinstance(err, OSError):
        return f"{type(err).__name__}: {err.strerror or err}"
    return f"truncated or corrupted ({one_line(err, 1).split('. ')[0].rstrip('.')})"


def one_line(err: BaseException, lines: int = 2, limit: int = 300) -> str:
    """The first ``lines`` non-empty lines of an error message on one line (torch's errors span many lines:
    ``load_state_dict`` puts the mismatching key on the second)."""
    parts = [ln.strip() for ln in str(err).splitlines() if ln.strip()][:lines]
    text = " ".join(parts) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's generators (and ``device``'s when it is a GPU), as tensors
    and numbers."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None,
    }


def restore_rng(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)
