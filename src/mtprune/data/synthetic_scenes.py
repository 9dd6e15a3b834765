"""``synthetic_scenes``: a seeded procedural generator of dense multi-task scenes (no download).

A scene is seen by an orthographic camera (x right, y down, depth z away from the viewer, all in metres).
A back wall (class 0) and a ground plane (class 1) meet at a random horizon; K objects (classes 2..C−1;
rectangles, ellipses, triangles, diamonds, rings, crosses) stand on the ground, smaller when farther. Every
surface is a plane z = a + b·x + c·y, and the nearest surface wins at each pixel, so:

- seg is exact, depth is the winning plane's z (always ≥ 0.4 m, never 0),
- the normal of the plane z = a + b·x + c·y is (b, c, 1)/‖·‖ (x right, y down, z towards the viewer),
- edges are label boundaries plus, with ``depth_edges``, occlusion boundaries between surfaces whose depth
  jumps by more than 5 % (two touching objects of the same class).

RGB = colour × Lambertian shading (normal · random light, plus ambient) × (1 + texture) × a random colour
cast, plus Gaussian noise. Difficulty comes from confusers, so a small CNN trained for minutes does not
saturate: per-instance colour jitter, colours / shapes / textures borrowed from another class with
probability ``color_swap`` / ``shape_swap`` / ``texture_swap``, random lighting, small far objects, noise.

Fresh training scenes (``fresh=True``, the default): the training split never repeats. Epochs 0 and 1 read the
stored scenes; epoch e ≥ 2 renders scene ``index`` anew from (seed, "train", index, e), so a model trained for
many epochs sees ``n_train`` new scenes each epoch and cannot overfit a fixed pool, and extra training (or pruning
as a regulariser) cannot win by undoing overfitting. The trainer announces the epoch through ``set_epoch`` (any
dataset with that method) and resets it to 0 when training ends; the scenes are a pure function of (seed, index,
epoch), so resuming is exact. Rendering costs
~3 ms per 64×80 scene on one core (~320 scenes/s, measured 2026-12-03 on the 2-core machine), i.e. ~1.6 s per
epoch of 512 scenes, against ~9 s of training. The validation split is always the stored one.

Defaults: 512 train + 128 val scenes of 64×80 (4 to 10 objects, 7 classes). At this size a CPU-sized dense
network sees an epoch in seconds to tens of seconds on 2 cores and output stride 8 still leaves an 8×10
map; a small U-Net (0.2 M parameters) trained for 10 minutes on 2 shared cores reached 53 % mIoU and was
still improving, so segmentation is far from saturated. Generating the defaults takes 1–4 s on one core;
the cache takes ~125 MB. The data is written once in the MTAN layout (float32 image HWC, label (H, W),
depth (H, W, 1), normal (H, W, 3), edge (H, W, 1)) to ``$MTPRUNE_CACHE/synthetic_scenes/<hash>`` (default
cache ``~/.cache/mtprune``) through a temporary folder and one atomic rename, and read back by the same
``MTANDataset`` as NYUv2.

Attribute tasks (image-level, for merging methods such as PAM and MFIS; DATA.md leaves them open, so this is
our choice) are derived deterministically from each scene's stored label map at full resolution, counting an
object class as *visible* when it covers at least ``ATTR_MIN_FRACTION`` of the image:

- ``objects`` (multilabel, C − 2): which object classes are visible;
- ``count`` (class, C − 1): how many object classes are visible (0 .. C − 2);
- ``dominant`` (class, C − 1): the object class covering the most pixels (index class − 2), or C − 2 when none
  is visible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..utils.bounds import MAX_IMAGE_PIXELS
from ..utils.errors import MTPruneInputError
from .conventions import check_same_size, dense_to_tensor, image_to_tensor
from .io import read_npy
from .mtan import MTANDataset
from .transforms import JointTransform

GENERATOR_VERSION = 1
SCENE_TASKS = {
    "seg": ("label", "seg"),
    "depth": ("depth", "depth"),
    "normal": ("normal", "normal"),
    "edge": ("edge", "edge"),
}
VIEW_HEIGHT_M = 4.0  # the image spans 4 m vertically
REF_DEPTH_M = 4.0  # an object's pixel size is its metric size at this depth, scaled by REF/depth
MIN_DEPTH_M = 0.4
MAX_SLOPE = 1.7  # |dz/dx|, |dz/dy| of object planes: tilts up to ~60°
EDGE_JUMP = 0.05  # relative depth jump that counts as an occlusion edge
ATTR_MIN_FRACTION = 0.01  # share of the image an object class must cover to count as visible
# attribute task → kind; targets are computed from the label map (``scene_attributes``)
ATTRIBUTE_TASKS = {"objects": "multilabel", "count": "class", "dominant": "class"}
STALE_TMP_S = 3600.0

WALL, GROUND = 0, 1


def _shape_rect(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(x), np.abs(y)) <= 1


def _shape_ellipse(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return x * x + y * y <= 1


def _shape_triangle(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (y <= 1) & (np.abs(x) <= (y + 1) / 2)


def _shape_diamond(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(x) + np.abs(y) <= 1


def _shape_ring(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    r2 = x * x + y * y
    return (r2 <= 1) & (r2 >= 0.3)


def _shape_cross(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    ax, ay = np.abs(x), np.abs(y)
    return ((ax <= 0.35) & (ay <= 1)) | ((ax <= 1) & (ay <= 0.35))


# Masks in an object's local frame, normalised so the shape fits [-1, 1]².
SHAPES: tuple[Callable[[np.ndarray, np.ndarray], np.ndarray], ...] = (
    _shape_rect,
    _shape_ellipse,
    _shape_triangle,
    _shape_diamond,
    _shape_ring,
    _shape_cross,
)


@dataclass(frozen=True)
class SceneParams:
    """Everything that determines the generated data (its hash names the cache folder)."""

    n_train: int = 512
    n_val: int = 128
    height: int = 64
    width: int = 80
    num_classes: int = 7  # wall, ground and num_classes − 2 object classes
    seed: int = 0
    min_objects: int = 4
    max_objects: int = 10
    small_fraction: float = 0.3  # share of objects with a small metric size
    color_jitter: float = 0.12  # std of the per-instance colour offset
    color_swap: float = 0.25  # probability that an object takes another class's colour
    shape_swap: float = 0.35  # ... another class's shape
    texture_swap: float = 0.35  # ... another class's texture
    noise: float = 0.04  # std of the per-pixel Gaussian noise
    depth_edges: bool = True  # add occlusion boundaries to the label boundaries

    def validate(self) -> SceneParams:
        checks = {
            "n_train >= 1 and n_val >= 1": self.n_train >= 1 and self.n_val >= 1,
            "height, width >= 8": self.height >= 8 and self.width >= 8,
            f"height * width <= {MAX_IMAGE_PIXELS} pixels": self.height * self.width <= MAX_IMAGE_PIXELS,
            "num_classes >= 3": self.num_classes >= 3,
            "0 <= min_objects <= max_objects": 0 <= self.min_objects <= self.max_objects,
            "probabilities in [0, 1]": all(
                0.0 <= p <= 1.0 for p in (self.small_fraction, self.color_swap, self.shape_swap, self.texture_swap)
            ),
            "color_jitter, noise >= 0": self.color_jitter >= 0 and self.noise >= 0,
        }
        failed = [k for k, ok in checks.items() if not ok]
        if failed:
            raise MTPruneInputError(f"synthetic_scenes: invalid parameters {self}: need {'; '.join(failed)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        blob = json.dumps({"version": GENERATOR_VERSION, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Palette:
    """Per-class appearance shared by all scenes of one seed: colour, preferred shape, texture."""

    colors: np.ndarray  # [C, 3]
    shapes: np.ndarray  # [C] index into SHAPES (objects only)
    textures: np.ndarray  # [C, 3]: type (0 plain, 1 stripes, 2 checker), frequency (cycles/px), angle


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def make_palette(params: SceneParams) -> Palette:
    rng = np.random.default_rng([params.seed, 0])
    c = params.num_classes
    hue = (np.arange(c) / (c - 2) + rng.uniform(0, 1)) % 1.0
    sat = rng.uniform(0.35, 0.7, c)
    val = rng.uniform(0.55, 0.9, c)
    sat[[WALL, GROUND]] = rng.uniform(0.1, 0.3, 2)  # wall and ground are dull, objects saturated
    colors = _hsv_to_rgb(hue, sat, val)
    shapes = rng.permutation(np.resize(np.arange(len(SHAPES)), c))
    textures = np.stack([np.resize(rng.permutation(3), c), rng.uniform(0.08, 0.3, c), rng.uniform(0, np.pi, c)], axis=1)
    return Palette(colors=colors, shapes=shapes, textures=textures)


@dataclass
class _Surfaces:
    """The planes of one scene, one row per surface."""

    depth: list[np.ndarray]  # [H, W] each, inf where the surface is absent
    classes: list[int]
    slopes: list[tuple[float, float]]  # (b, c) of z = a + b·x + c·y
    colors: list[np.ndarray]
    textures: list[np.ndarray]

    def add(self, depth: np.ndarray, cls: int, slope: tuple[float, float], color: np.ndarray, tex: np.ndarray):
        self.depth.append(depth)
        self.classes.append(cls)
        self.slopes.append(slope)
        self.colors.append(color)
        self.textures.append(tex)


def _appearance(rng: np.random.Generator, params: SceneParams, palette: Palette, cls: int, jitter: float):
    """Colour and texture of one surface: its class's, or (swap) another object class's, jittered."""
    objects = np.arange(2, params.num_classes)
    src = rng.choice(objects) if cls >= 2 and rng.random() < params.color_swap else cls
    color = np.clip(palette.colors[src] + rng.normal(0, jitter, 3), 0.03, 1.0)
    src = rng.choice(objects) if rng.random() < params.texture_swap else cls
    tex = palette.textures[src].copy()
    tex[1] *= rng.uniform(0.8, 1.25)
    tex[2] += rng.normal(0, 0.3)
    return color, np.append(tex, [rng.uniform(0.1, 0.35), rng.uniform(0, 2 * np.pi)])  # + contrast, phase


def render_scene(rng: np.random.Generator, params: SceneParams, palette: Palette) -> dict[str, np.ndarray]:
    """One scene in the MTAN layout: image (H, W, 3), label (H, W), depth (H, W, 1), normal, edge."""
    H, W = params.height, params.width
    m = VIEW_HEIGHT_M / H  # metres per pixel
    X, Y = np.meshgrid(((np.arange(W) + 0.5) - W / 2) * m, ((np.arange(H) + 0.5) - H / 2) * m)
    s = _Surfaces([], [], [], [], [])
    ground, horizon_row = _add_background(rng, params, palette, s, X, Y)
    for _ in range(rng.integers(params.min_objects, params.max_objects + 1)):
        _add_object(rng, params, palette, s, X, Y, ground, horizon_row)
    return _composite(rng, params, s)


def _add_background(rng, params: SceneParams, palette: Palette, s: _Surfaces, X: np.ndarray, Y: np.ndarray):
    """A back wall and a ground plane that meet at a random horizon; returns the ground's depth function
    z(x, y) and the horizon's row."""
    H, m = params.height, VIEW_HEIGHT_M / params.height
    wall_d = rng.uniform(6.0, 10.0)
    wb, wc = rng.uniform(-0.15, 0.15, 2)
    s.add(wall_d + wb * X + wc * Y, WALL, (wb, wc), *_appearance(rng, params, palette, WALL, 0.2))
    y_bottom, y_horizon = H / 2 * m, (rng.uniform(0.2, 0.5) * H - H / 2) * m
    near = rng.uniform(1.5, 3.0)
    gb, gc = rng.uniform(-0.25, 0.25), (near - wall_d) / (y_bottom - y_horizon)

    def ground(xx, yy):
        return near + gb * xx + gc * (yy - y_bottom)

    s.add(ground(X, Y), GROUND, (gb, gc), *_appearance(rng, params, palette, GROUND, 0.2))
    return ground, y_horizon / m + H / 2


def _add_object(
    rng, params: SceneParams, palette: Palette, s: _Surfaces, X: np.ndarray, Y: np.ndarray, ground, horizon_row
) -> None:
    """One object standing on the ground below the horizon, smaller when farther, on a tilted plane."""
    H, W, m = params.height, params.width, VIEW_HEIGHT_M / params.height
    cls = int(rng.integers(2, params.num_classes))
    ub, vb = rng.uniform(0, W), rng.uniform(horizon_row + 1, H + 4)  # where it touches the ground
    base = ground((ub - W / 2) * m, (vb - H / 2) * m)
    size = rng.uniform(0.12, 0.3) if rng.random() < params.small_fraction else rng.uniform(0.4, 1.1)
    r = max(size / m * REF_DEPTH_M / base, 1.5)
    aspect = np.exp(rng.uniform(-0.5, 0.5))
    ra, rb = r * np.sqrt(aspect), r / np.sqrt(aspect)
    cu, cv = ub, vb - rb
    theta = rng.uniform(-0.6, 0.6)
    du, dv = (np.arange(W) + 0.5 - cu)[None, :], (np.arange(H) + 0.5 - cv)[:, None]
    lx = (np.cos(theta) * du + np.sin(theta) * dv) / ra
    ly = (-np.sin(theta) * du + np.cos(theta) * dv) / rb
    shape = palette.shapes[cls] if rng.random() >= params.shape_swap else rng.integers(len(SHAPES))
    mask = SHAPES[shape](lx, ly)
    if not mask.any():
        return
    b, c = np.clip(rng.normal(0, 0.7, 2), -MAX_SLOPE, MAX_SLOPE)
    xc, yc = (cu - W / 2) * m, (cv - H / 2) * m
    plane = base - rng.uniform(0.0, 0.3) + b * (X - xc) + c * (Y - yc)
    plane += max(MIN_DEPTH_M - plane[mask].min(), 0.0)
    s.add(np.where(mask, plane, np.inf), cls, (b, c), *_appearance(rng, params, palette, cls, params.color_jitter))


def _composite(rng: np.random.Generator, params: SceneParams, s: _Surfaces) -> dict[str, np.ndarray]:
    """Nearest surface wins; targets and the shaded, textured, noisy RGB image."""
    H, W = params.height, params.width
    stack = np.stack(s.depth)
    idx = stack.argmin(axis=0)
    depth = np.take_along_axis(stack, idx[None], axis=0)[0]
    label = np.asarray(s.classes)[idx]
    slopes = np.asarray(s.slopes)
    normals = np.concatenate([slopes, np.ones((len(slopes), 1))], axis=1)
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    normal = normals[idx]

    light = np.array([rng.uniform(-1, 1), rng.uniform(-1, 0.3), rng.uniform(0.3, 1.0)])
    light /= np.linalg.norm(light)
    ambient = rng.uniform(0.2, 0.4)
    shade = ambient + (1 - ambient) * np.clip(normal @ light, 0.0, None)

    kind, freq, angle, contrast, phase = np.asarray(s.textures)[idx].transpose(2, 0, 1)
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    a1 = 2 * np.pi * freq * (u * np.cos(angle) + v * np.sin(angle)) + phase
    a2 = 2 * np.pi * freq * (-u * np.sin(angle) + v * np.cos(angle))
    texture = np.select([kind == 1, kind == 2], [np.sin(a1), np.sign(np.sin(a1) * np.sin(a2))], 0.0)

    cast = rng.uniform(0.8, 1.2) * rng.normal(1.0, 0.06, 3)
    rgb = np.asarray(s.colors)[idx] * (shade * (1 + contrast * texture))[..., None] * cast
    rgb += rng.normal(0.0, params.noise, rgb.shape)
    return {
        "image": np.clip(rgb, 0.0, 1.0).astype(np.float32),
        "label": label.astype(np.float32),
        "depth": depth.astype(np.float32)[..., None],
        "normal": normal.astype(np.float32),
        "edge": _edges(label, idx, depth if params.depth_edges else None)[..., None],
    }


def _edges(label: np.ndarray, instance: np.ndarray, depth: np.ndarray | None) -> np.ndarray:
    """1 on both sides of every label boundary (4-neighbourhood) and, when ``depth`` is given, of every
    boundary between two surfaces whose depth jumps by more than ``EDGE_JUMP``."""
    edge = np.zeros(label.shape, dtype=bool)
    for axis in (0, 1):
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(1, None), slice(None, -1)
        a, b = tuple(a), tuple(b)
        diff = label[a] != label[b]
        if depth is not None:
            jump = np.abs(depth[a] - depth[b]) > EDGE_JUMP * np.minimum(depth[a], depth[b])
            diff |= (instance[a] != instance[b]) & jump
        edge[a] |= diff
        edge[b] |= diff
    return edge.astype(np.float32)


def scene_attributes(label: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """The attribute targets of one scene from its label map ``(H, W)`` (see the module docstring)."""
    label = np.asarray(label)
    if label.ndim == 3 and label.shape[2] == 1:
        label = label[:, :, 0]
    objects = num_classes - 2
    cls = label.astype(np.int64).ravel()
    area = np.bincount(cls[(cls >= 2) & (cls < num_classes)] - 2, minlength=objects)[:objects]
    visible = area >= ATTR_MIN_FRACTION * label.size
    dominant = int(np.argmax(np.where(visible, area, -1))) if visible.any() else objects
    return {
        "objects": visible.astype(np.float32),
        "count": np.asarray(int(visible.sum()), dtype=np.int64),
        "dominant": np.asarray(dominant, dtype=np.int64),
    }


def scene_rng(params: SceneParams, split: str, index: int, epoch: int = 0) -> np.random.Generator:
    """Scene ``index`` of ``split`` depends only on (seed, split, index), not on the split sizes; epochs 0 and 1
    are the stored scenes, epoch e ≥ 2 a fresh scene drawn from (seed, split, index, e)."""
    key = [params.seed, 1 + ("train", "val").index(split), index]
    return np.random.default_rng(key + [epoch] if epoch >= 2 else key)


def write_split(folder: Path, params: SceneParams, palette: Palette, split: str, n: int) -> None:
    dirs = {k: folder / split / k for k in ("image", "label", "depth", "normal", "edge")}
    for d in dirs.values():
        d.mkdir(parents=True)
    for i in range(n):
        for key, arr in render_scene(scene_rng(params, split, i), params, palette).items():
            np.save(dirs[key] / f"{i}.npy", arr)


def cache_dir() -> Path:
    return Path(os.environ.get("MTPRUNE_CACHE", "~/.cache/mtprune")).expanduser()


def default_root(params: SceneParams) -> Path:
    return cache_dir() / "synthetic_scenes" / params.digest()


def generate(root: str | Path, params: SceneParams) -> Path:
    """Write the dataset to ``root`` atomically: into a temporary sibling folder, then one rename.

    If another process finished first, its copy is kept and ours is discarded.
    """
    root = Path(root).expanduser()
    params.validate()
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise MTPruneInputError(f"cannot generate synthetic_scenes into {root}: it exists and is not empty")
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root.parent)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-synthetic-", dir=root.parent))
    try:
        palette = make_palette(params)
        write_split(tmp, params, palette, "train", params.n_train)
        write_split(tmp, params, palette, "val", params.n_val)
        meta = {"generator_version": GENERATOR_VERSION, "params": params.to_dict()}
        (tmp / "params.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is ordinary data
        try:
            os.rename(tmp, root)  # replaces an empty folder; fails if another writer won
        except OSError:
            if not (root / "params.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _remove_stale_tmp(parent: Path) -> None:
    """Best effort: drop temporary folders left by generations killed more than an hour ago."""
    now = time.time()
    for p in parent.glob(".tmp-synthetic-*"):
        try:
            if now - p.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def stored_params(root: Path) -> dict[str, Any] | None:
    path = root / "params.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["params"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MTPruneInputError(f"corrupt synthetic_scenes metadata {path}: {e}") from e


def load_synthetic_scenes(
    root: str | Path | None = None,
    split: str = "train",
    *,
    tasks: Sequence[str] | None = None,
    size: int | Sequence[int] | None = None,
    transform: JointTransform | None = None,
    fresh: bool = True,
    **params: Any,
) -> SyntheticScenes:
    """The synthetic scenes (generated on first use, cached); ``params`` are ``SceneParams`` fields; ``fresh``:
    the training split renders new scenes every epoch ≥ 2 (see the module docstring), ``False`` keeps the pool.

    With ``root``, the data lives exactly there: read if present (explicit ``params`` must then match
    the stored ones), generated there otherwise. Tasks: seg, depth, normal, edge, and the attribute tasks
    objects, count, dominant (not part of the default selection; name them in ``tasks``).
    """
    fields = {f.name for f in dataclasses.fields(SceneParams)}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise MTPruneInputError(f"synthetic_scenes: unknown parameter(s) {unknown}; known: {sorted(fields)}")
    wanted = SceneParams(**params).validate()
    root = default_root(wanted) if root is None else Path(root).expanduser()
    stored = stored_params(root)
    if stored is None and not (root / split).is_dir():
        generate(root, wanted)
        stored = wanted.to_dict()
    if stored is not None:
        clash = {k: (v, stored.get(k)) for k, v in params.items() if stored.get(k) != v}
        if clash:
            raise MTPruneInputError(
                f"synthetic_scenes at {root} was generated with other parameters "
                f"(asked, stored): {clash}; omit root to use the cache, or pass another root"
            )
    return SyntheticScenes(root, split, params=stored, tasks=tasks, size=size, transform=transform, fresh=fresh)


class SyntheticScenes(MTANDataset):
    """The generated scenes, read by the MTAN-layout reader; ``params`` are the generation parameters
    (``None`` for a folder that was not made by ``generate``). ``tasks=None`` selects the dense tasks; the
    attribute tasks (``ATTRIBUTE_TASKS``) are read from the label map when named. With ``fresh`` (and known
    ``params``) the training split renders new scenes from epoch 2 on (``set_epoch``)."""

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        params: dict[str, Any] | None = None,
        tasks: Sequence[str] | None = None,
        size: int | Sequence[int] | None = None,
        transform: JointTransform | None = None,
        fresh: bool = False,
    ) -> None:
        self.params = params
        num_classes = (params or {}).get("num_classes", SceneParams.num_classes)
        table = {**SCENE_TASKS, **{t: ("label", kind) for t, kind in ATTRIBUTE_TASKS.items()}}
        counts = {"seg": num_classes, "objects": num_classes - 2, "count": num_classes - 1,
                  "dominant": num_classes - 1}
        super().__init__(root, split, table, tasks=list(SCENE_TASKS) if tasks is None else tasks,
                         num_classes=counts, size=size, transform=transform)
        self.scene_classes = num_classes
        self.fresh = bool(fresh and params is not None and split == "train")
        self.epoch = 0
        self._scene: tuple[SceneParams, Palette] | None = None

    def set_epoch(self, epoch: int) -> None:
        """The training epoch (1-based; 0 = none): from epoch 2 on, a fresh dataset renders new scenes."""
        self.epoch = int(epoch)

    def _arrays(self, index: int) -> dict[str, tuple[np.ndarray, Path | str]]:
        """The raw arrays of item ``index`` at the current epoch, each with where it came from (its file, or
        the rendered scene), so that an error names the right source: rendered (fresh, epoch ≥ 2) or stored."""
        if self.fresh and self.epoch >= 2:
            if self._scene is None:
                known = {f.name for f in dataclasses.fields(SceneParams)}
                scene = SceneParams(**{k: v for k, v in (self.params or {}).items() if k in known})
                self._scene = (scene, make_palette(scene))
            scene, palette = self._scene
            source = f"{self.root / self.split} scene {index} rendered for epoch {self.epoch}"
            return {k: (v, source) for k, v in
                    render_scene(scene_rng(scene, self.split, index, self.epoch), scene, palette).items()}
        name = f"{index}.npy"
        folders = {"image": self.image_dir, **{SCENE_TASKS[t][0]: d for t, d in self.task_dirs.items()
                                               if t in SCENE_TASKS}}
        if any(t in ATTRIBUTE_TASKS for t in self.kinds):
            folders["label"] = self.task_dirs[next(t for t in self.kinds if t in ATTRIBUTE_TASKS)]
        return {key: (read_npy(d / name), d / name) for key, d in folders.items()}

    def load_item(self, index: int) -> tuple[Tensor, dict[str, Tensor]]:
        arrays = self._arrays(index)
        image = image_to_tensor(*arrays["image"])
        targets = {t: dense_to_tensor(arrays[SCENE_TASKS[t][0]][0], self.kinds[t], arrays[SCENE_TASKS[t][0]][1])
                   for t in self.kinds if t not in ATTRIBUTE_TASKS}
        check_same_size(image, targets, self.kinds, f"{self.root / self.split} item {index} (epoch {self.epoch})")
        attrs = [t for t in self.kinds if t in ATTRIBUTE_TASKS]
        if attrs:
            label = dense_to_tensor(arrays["label"][0], "seg", arrays["label"][1]).numpy()
            values = scene_attributes(label, self.scene_classes)
            targets.update({t: torch.from_numpy(values[t]) for t in attrs})
        return image, targets
