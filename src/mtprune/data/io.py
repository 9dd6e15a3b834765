"""File readers that turn every failure into an ``MTPruneInputError`` naming the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..utils.bounds import check_npy_header
from ..utils.errors import MTPruneInputError

_LABEL_MODES = ("1", "L", "P", "I", "I;16")


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise MTPruneInputError(f"missing {what}: {path} is not a folder")
    return path


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise MTPruneInputError(f"missing file: {path}")
    return path


def read_npy(path: Path) -> np.ndarray:
    """``np.load`` without pickles."""
    require_file(path)
    check_npy_header(path)  # a header claiming more data than the file holds is refused before allocating
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise MTPruneInputError(f"corrupt .npy file {path}: {e}") from e


def _open_image(path: Path) -> Image.Image:
    require_file(path)
    try:
        im = Image.open(path)
        im.load()
        return im
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise MTPruneInputError(f"corrupt or unreadable image {path}: {e}") from e


def read_rgb(path: Path) -> Image.Image:
    """An image file converted to RGB (PIL image, so callers may resize before converting)."""
    with _open_image(path) as im:
        return im.convert("RGB")


def read_label_png(path: Path) -> np.ndarray:
    """A single-channel label image as its raw stored values (palette indices are not remapped)."""
    with _open_image(path) as im:
        if im.mode not in _LABEL_MODES:
            raise MTPruneInputError(f"{path}: expected a single-channel label PNG, got mode {im.mode!r}")
        return np.asarray(im)


def read_json(path: Path) -> Any:
    require_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MTPruneInputError(f"corrupt JSON file {path}: {e}") from e


def read_lines(path: Path) -> list[str]:
    require_file(path)
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MTPruneInputError(f"unreadable text file {path}: {e}") from e
