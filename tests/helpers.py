"""Tiny shared fixtures for the tests: a zoo model, NYUv2-like batches, a tiny run config."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

import mtprune

TINY_RUN = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "data": {"name": "synthetic_scenes", "augment": True,
             "kwargs": {"n_train": 12, "n_val": 6, "height": 32, "width": 40}},
    "tasks": {"preset": "synthetic_scenes", "names": ["seg", "depth"]},
    "model": {"name": "deeplab_resnet18", "width": 0.125, "head": "conv"},
    "train": {"epochs": 2, "batch_size": 6, "lr": 0.002, "eval_batch_size": 6},
}


def tiny_run(**sections) -> dict:
    """A copy of ``TINY_RUN`` with whole sections replaced or added."""
    return {**copy.deepcopy(TINY_RUN), **copy.deepcopy(sections)}


def zoo_model(seed: int = 0) -> nn.Module:
    """Deeplab-ResNet-18 at 1/8 width with three conv heads of 16 hidden channels (seg 5, depth, normal)."""
    torch.manual_seed(seed)
    return mtprune.build_model("deeplab_resnet18", {"seg": 5, "depth": 1, "normal": 3}, width=0.125, head="conv",
                               head_kwargs={"hidden": 16, "width": 1.0})


def nyu_batches(n: int = 2, seed: int = 1) -> list[tuple[Tensor, dict[str, Tensor]]]:
    """``n`` batches of 2 random 32×40 images with seg (5 classes), depth and unit normal targets."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        normal = torch.randn(2, 3, 32, 40, generator=gen)
        out.append((torch.randn(2, 3, 32, 40, generator=gen), {
            "seg": torch.randint(0, 5, (2, 32, 40), generator=gen),
            "depth": torch.rand(2, 1, 32, 40, generator=gen) + 0.1,
            "normal": normal / normal.norm(dim=1, keepdim=True),
        }))
    return out
