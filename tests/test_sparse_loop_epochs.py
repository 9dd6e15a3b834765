"""The sparse training loops (dynamic sparse training, IMP rounds) tell a procedural dataset the epoch of every
pass, as the trainer does: on ``synthetic_scenes`` every method of a sparsity benchmark then trains on the same
fresh scenes, not the dynamic ones on the stored pool alone."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtprune.sparsity.training import SparseLoop, SparseTrainConfig, cycle


class EpochData(Dataset):
    """Four samples whose values are the epoch they were served in; records every ``set_epoch``."""

    def __init__(self) -> None:
        self.epoch, self.told = 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.told.append(epoch)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        return torch.full((1, 2, 2), float(self.epoch)), {"y": torch.zeros(1, 2, 2)}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)

    def forward(self, x):
        return {"y": self.conv(x)}


def loader(data: Dataset) -> DataLoader:
    return DataLoader(data, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))


def test_each_pass_reads_the_next_epoch_counted_from_the_step():
    data = EpochData()
    seen = [float(images.mean()) for (images, _), _ in zip(cycle(loader(data)), range(5), strict=False)]
    assert seen == [1, 1, 2, 2, 3]  # two batches a pass: epochs 1, 2, 3 as the trainer counts them
    data.told.clear()
    next(cycle(loader(data), step=4))  # a loop resumed after 4 steps starts the third epoch
    assert data.told == [3]


def test_sparse_loop_trains_on_a_new_epoch_every_pass_and_after_a_checkpoint():
    torch.manual_seed(0)
    data = EpochData()
    served = []
    loop = SparseLoop(Net(), loader(data), {"y": lambda p, t: (p - t).pow(2).mean()},
                      SparseTrainConfig(steps=4, lr=0.01))
    loop.run(hook=lambda step, images, targets: served.append(float(images.mean())))
    loop.new_pass()  # as after a checkpoint (every epoch): the next pass is the next epoch
    loop.run(steps=2, hook=lambda step, images, targets: served.append(float(images.mean())))
    assert served == [1, 1, 2, 2, 3, 3]
