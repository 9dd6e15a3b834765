"""Training and evaluating a model with several inputs: the dataset yields ``((rgb, depth), targets)`` or
``({"image": rgb, "depth": depth}, targets)`` and the Trainer, ``evaluate`` and ``SparseTrainer`` call the model
with ``utils.inputs.call_model`` (positional or keyword inputs), the batch size being the first tensor's."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset

from mtprune.engine.batch import collate
from mtprune.engine.evaluate import evaluate
from mtprune.engine.trainer import TrainConfig, Trainer
from mtprune.sparsity.training import SparseLoop, SparseTrainConfig
from mtprune.tasks import preset
from mtprune.utils.errors import MTPruneInputError
from test_multi_input import RGBD, H, RGBDKeywords, W


class RGBDData(Dataset):
    """``n`` seeded samples; ``keywords`` gives ``{"image": rgb, "depth": depth}`` instead of ``(rgb, depth)``."""

    def __init__(self, n: int, seed: int, keywords: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rgb, self.depth = torch.randn(n, 3, H, W, generator=g), torch.rand(n, 1, H, W, generator=g)
        self.seg = torch.randint(0, 5, (n, H, W), generator=g)
        normal = torch.randn(n, 3, H, W, generator=g)
        self.normal = normal / normal.norm(dim=1, keepdim=True)
        self.keywords = keywords

    def __len__(self) -> int:
        return len(self.rgb)

    def __getitem__(self, i: int):
        x = {"image": self.rgb[i], "depth": self.depth[i]} if self.keywords else (self.rgb[i], self.depth[i])
        return x, {"seg": self.seg[i], "normal": self.normal[i]}


def tasks():
    return {t: k for t, k in preset("nyuv2", num_classes=5).items() if t in ("seg", "normal")}


@pytest.mark.parametrize("keywords", [False, True])
def test_trainer_trains_and_evaluates_a_two_input_model(tmp_path, keywords):
    torch.manual_seed(0)
    model = RGBDKeywords() if keywords else RGBD()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = RGBDData(6, 1, keywords), RGBDData(4, 2, keywords)
    cfg = TrainConfig(epochs=1, batch_size=4, device="cpu", quiet=True, tensorboard=False, lr=0.01)
    summary = Trainer(model, tasks(), train, val, tmp_path, cfg).fit()
    assert summary.epochs_run == 1 and summary.last_checkpoint.is_file()
    for t in ("seg", "normal"):
        assert all(torch.isfinite(torch.tensor(v)) for v in summary.final_metrics[t].values())
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert "rgb.0.weight" in changed and "depth.0.weight" in changed and "seg_head.2.weight" in changed
    metrics = evaluate(model, val, tasks(), device="cpu", batch_size=3, with_loss=True)  # batches of 3 and 1
    whole = evaluate(model, val, tasks(), device="cpu", batch_size=4, with_loss=True)  # one batch of 4
    assert set(metrics) == {"seg", "normal"}
    for t, values in whole.items():  # sample-weighted means: the batch size (first tensor's dim 0) is counted right
        assert torch.isfinite(torch.tensor(values["loss"]))
        assert metrics[t]["loss"] == pytest.approx(values["loss"], rel=1e-5)


def test_a_model_refusing_the_inputs_is_one_input_error_naming_them(tmp_path):
    """The data's keywords (rgb, depth) are not the model's (image, depth): refused before training, naming them."""
    data = RGBDData(4, 1, keywords=True)
    bad = [({"rgb": x["image"], "depth": x["depth"]}, y) for x, y in (data[i] for i in range(len(data)))]
    cfg = TrainConfig(epochs=1, batch_size=2, device="cpu", quiet=True, tensorboard=False)
    with pytest.raises(MTPruneInputError, match="cannot run on the training images.*kwargs.*rgb"):
        Trainer(RGBDKeywords(), tasks(), bad, bad, tmp_path, cfg).fit()
    assert not (tmp_path / "checkpoints").exists()


def test_sparse_training_steps_a_two_input_model():
    torch.manual_seed(0)
    model, data = RGBD(), RGBDData(4, 1)
    batches = [collate([data[i] for i in range(j, j + 2)]) for j in (0, 2)]
    before = model.fuse[0].weight.detach().clone()
    loop = SparseLoop(model, batches, tasks(), SparseTrainConfig(steps=2, lr=0.01))
    loop.run()
    assert len(loop.history) == 2 and all(torch.isfinite(torch.tensor(v)) for h in loop.history for v in h.values())
    assert not torch.equal(before, model.fuse[0].weight)
