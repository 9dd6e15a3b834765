"""Joint transforms over ``(image, targets, kinds)`` that keep the geometry consistent across tasks.

The augmentation follows MTAN (Liu et al., CVPR 2019): a random scale-crop with scales (1, 1.2, 1.5) whose
depth is divided by the scale, and a horizontal flip that negates the normals' x component. ``RandomCrop``
is the fixed-size crop of AdaShare (Sun et al., NeurIPS 2020; 321×321 on NYUv2).

Each random transform splits into ``sample(...)`` (draws the parameters) and ``apply(...)`` (deterministic),
so a caller or a test can inject exact parameters. Randomness comes from the ``generator`` given at
construction; with ``None`` the global torch RNG is used, which DataLoader seeds differently per worker
(a generator is copied into every worker, so pass one only for single-process loading or tests).
Images are resized bilinearly, dense targets with nearest neighbour (``nearest-exact``, aligned with the
bilinear grid) so that labels are never blended and invalid pixels never mix with valid ones.
Classification and multi-label targets pass through untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ..utils.errors import MTPruneInputError
from .conventions import DENSE_KINDS, FILL

Targets = dict[str, Tensor]
Sample = tuple[Tensor, Targets]


class JointTransform(Protocol):
    def __call__(self, image: Tensor, targets: Targets, kinds: dict[str, str]) -> Sample: ...


def as_size(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if int(h) <= 0 or int(w) <= 0:
        raise MTPruneInputError(f"size must be positive, got {size!r}")
    return int(h), int(w)


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] (inclusive)."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def _map_dense(targets: Targets, kinds: dict[str, str], fn) -> Targets:
    return {n: (fn(t, kinds[n]) if kinds[n] in DENSE_KINDS else t) for n, t in targets.items()}


def resize_dense(t: Tensor, size: tuple[int, int], kind: str) -> Tensor:
    """Resize ``[C, H, W]`` (or ``[H, W]`` for seg): bilinear for ``kind == "image"``, else nearest."""
    if tuple(t.shape[-2:]) == size:
        return t
    x = t[None] if t.dim() == 3 else t[None, None]
    if kind == "image":
        antialias = size[0] < t.shape[-2] or size[1] < t.shape[-1]
        out = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    else:
        out = F.interpolate(x.float(), size=size, mode="nearest-exact").to(t.dtype)
    return out[0] if t.dim() == 3 else out[0, 0]


def resize(image: Tensor, targets: Targets, kinds: dict[str, str], size: tuple[int, int]) -> Sample:
    image = resize_dense(image, size, "image")
    return image, _map_dense(targets, kinds, lambda t, k: resize_dense(t, size, k))


def crop(image: Tensor, targets: Targets, kinds: dict[str, str], top: int, left: int, h: int, w: int) -> Sample:
    """Crop the window ``[top:top+h, left:left+w]`` out of the image and every dense target."""
    return image[..., top : top + h, left : left + w], _map_dense(
        targets, kinds, lambda t, k: t[..., top : top + h, left : left + w]
    )


def hflip(image: Tensor, targets: Targets, kinds: dict[str, str]) -> Sample:
    """Mirror left-right; the x component of surface normals changes sign."""

    def flip(t: Tensor, kind: str) -> Tensor:
        t = t.flip(-1)
        if kind == "normal":
            t = t.clone()
            t[0] = -t[0]
        return t

    return image.flip(-1), _map_dense(targets, kinds, flip)


def pad_to(image: Tensor, targets: Targets, kinds: dict[str, str], size: tuple[int, int]) -> Sample:
    """Pad bottom/right up to at least ``size``: the image with 0, targets with their invalid value."""
    ph, pw = max(size[0] - image.shape[-2], 0), max(size[1] - image.shape[-1], 0)
    if ph == 0 and pw == 0:
        return image, targets
    image = F.pad(image, (0, pw, 0, ph), value=0.0)
    return image, _map_dense(targets, kinds, lambda t, k: F.pad(t, (0, pw, 0, ph), value=FILL[k]))


class Compose:
    """Apply joint transforms in order."""

    def __init__(self, transforms: Sequence[JointTransform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Tensor, targets: Targets, kinds: dict[str, str]) -> Sample:
        for t in self.transforms:
            image, targets = t(image, targets, kinds)
        return image, targets

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Resize:
    """Deterministic resize to ``size`` = (H, W) or an int for a square."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = as_size(size)

    def __call__(self, image: Tensor, targets: Targets, kinds: dict[str, str]) -> Sample:
        return resize(image, targets, kinds, self.size)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class RandomScaleCrop:
    """MTAN's scale augmentation: crop an (H/s)×(W/s) window at a random place, resize it back to H×W.

    Zooming in by ``s`` brings the scene ``s`` times closer, so depth is divided by ``s`` (as in MTAN).
    Set ``inverse_depth=True`` for targets that store inverse depth (Cityscapes), which are then multiplied
    instead; MTAN and LibMTL divide for both.
    """

    def __init__(
        self,
        scales: Sequence[float] = (1.0, 1.2, 1.5),
        generator: torch.Generator | None = None,
        inverse_depth: bool = False,
    ) -> None:
        if not scales or any(s < 1.0 for s in scales):
            raise MTPruneInputError(f"scales must be a non-empty list of values >= 1, got {scales!r}")
        self.scales = tuple(float(s) for s in scales)
        self.generator = generator
        self.inverse_depth = inverse_depth

    def sample(self, height: int, width: int) -> tuple[float, int, int]:
        """Draw ``(scale, top, left)``."""
        scale = self.scales[_randint(0, len(self.scales) - 1, self.generator)]
        h, w = int(height / scale), int(width / scale)
        return scale, _randint(0, height - h, self.generator), _randint(0, width - w, self.generator)

    def apply(
        self, image: Tensor, targets: Targets, kinds: dict[str, str], scale: float, top: int, left: int
    ) -> Sample:
        height, width = image.shape[-2:]
        h, w = int(height / scale), int(width / scale)
        image, targets = crop(image, targets, kinds, top, left, h, w)
        image, targets = resize(image, targets, kinds, (height, width))
        factor = scale if self.inverse_depth else 1.0 / scale
        return image, {n: (t * factor if kinds[n] == "depth" else t) for n, t in targets.items()}

    def __call__(self, image: Tensor, targets: Targets, kinds: dict[str, str]) -> Sample:
        return self.apply(image, targets, kinds, *self.sample(*image.shape[-2:]))

    def __repr__(self) -> str:
        return f"RandomScaleCrop(scales={self.scales})"


class RandomHorizontalFlip:
    """Flip the image and every dense target with probability ``p``; normals' x is negated."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = float(p)
        self.generator = generator

    def sample(self) -> bool:
        return bool(torch.rand(1, generator=self.generator).item() < self.p)

    def apply(self, image: Tensor, targets: Targets, kinds: dict[str, str], flip: bool) -> Sample:
        return hflip(image, targets, kinds) if flip else (image, targets)

    def __call__(self, image: Tensor, targets: Targets, kinds: dict[str, str]) -> Sample:
        return self.apply(image, targets, kinds, self.sample())

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomCrop:
    """A ``size`` crop at a random place (AdaShare: 321×321); smaller samples are padded first with 0 for
    the image and the invalid value for each target."""

    def __init__(self, size: int | Sequence[int], generator: torch.Generator | None = None) -> None:
        self.size = as_size(size)
        self.generator = generator

    def sample(self, height: int, width: int) -> tuple[int, int]:
        """Draw ``(top, left)`` for a sample of the given (padded) size."""
        return (
            _randint(0, max(height - self.size[0], 0), self.generator),
            _randint(0, max(width - self.size[1], 0), self.generator),
        )

    def apply(self, image: Tensor, targets: Targets, kinds: dict[str, str], top: int, left: int) -> Sample:
        image, targets = pad_to(image, targets, kinds, self.size)
        return crop(image, targets, kinds, top, left, *self.size)

    def __call__(self, image: Tensor, targets: Targets, kinds: dict[str, str]) -> Sample:
        h, w = image.shape[-2:]
        return self.apply(image, targets, kinds, *self.sample(max(h, self.size[0]), max(w, self.size[1])))

    def __repr__(self) -> str:
        return f"RandomCrop({self.size})"
