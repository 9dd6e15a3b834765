"""Metrics against hand-computed values, ignore/invalid pixels, whole-split accumulation, Δm."""

import math

import pytest
import torch

from mtprune.tasks import (
    ClassificationTask,
    DepthTask,
    EdgeTask,
    MultiLabelTask,
    NormalTask,
    SegmentationTask,
    delta_m,
    preset,
)
from mtprune.utils.errors import MTPruneInputError


def onehot_logits(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float() * 10


def test_segmentation_confusion_with_ignore():
    gt = torch.tensor([[[0, 0, 1, -1]]])  # one ignore pixel
    pred = torch.tensor([[[0, 1, 1, 2]]])  # the ignored pixel predicts class 2: must not count
    meter = SegmentationTask("seg", 3).new_meter()
    meter.update(onehot_logits(pred, 3), gt)
    out = meter.compute()
    # class 0: tp 1, fp 0, fn 1 -> 1/2 ; class 1: tp 1, fp 1, fn 0 -> 1/2 ; class 2 absent in gt and pred
    assert out["miou"] == pytest.approx(50.0)
    assert out["pixel_acc"] == pytest.approx(100 * 2 / 3)


def test_segmentation_accumulates_over_split_not_batch_average():
    task = SegmentationTask("seg", 2)
    meter = task.new_meter()
    meter.update(onehot_logits(torch.tensor([[[0, 0, 0, 0]]]), 2), torch.tensor([[[0, 0, 0, 0]]]))
    meter.update(onehot_logits(torch.tensor([[[0, 1]]]), 2), torch.tensor([[[1, 1]]]))
    # pooled: 5 of 6 correct; a mean of batch accuracies would give (100 + 50) / 2 = 75
    assert meter.compute()["pixel_acc"] == pytest.approx(100 * 5 / 6)


def test_segmentation_loss_ignores_and_rejects_out_of_range():
    task = SegmentationTask("seg", 3)
    logits = torch.randn(1, 3, 2, 2)
    gt = torch.tensor([[[0, -1], [-1, -1]]])
    expected = torch.nn.functional.cross_entropy(logits[:, :, 0, 0], gt[:, 0, 0])
    assert task.loss(logits, gt).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(MTPruneInputError, match="out of range"):
        task.loss(logits, torch.tensor([[[0, 5], [1, 1]]]))


def test_depth_metrics_skip_invalid_pixels():
    gt = torch.tensor([[[[2.0, 4.0, 0.0]]]])
    pred = torch.tensor([[[[3.0, 2.0, 100.0]]]])
    meter = DepthTask().new_meter()
    meter.update(pred, gt)
    out = meter.compute()
    assert out["abs_err"] == pytest.approx((1 + 2) / 2)
    assert out["rel_err"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert DepthTask().loss(pred, gt).item() == pytest.approx(1.5)


def test_normal_angles_skip_invalid_and_median_is_exact_to_a_bin():
    angles = [0.0, 10.0, 20.0, 40.0]
    gt = torch.zeros(1, 3, 1, 5)
    pred = torch.zeros(1, 3, 1, 5)
    for i, a in enumerate(angles):
        gt[0, :, 0, i] = torch.tensor([0.0, 0.0, 1.0])
        r = math.radians(a)
        pred[0, :, 0, i] = torch.tensor([math.sin(r), 0.0, math.cos(r)]) * 3  # unnormalised on purpose
    pred[0, :, 0, 4] = torch.tensor([1.0, 0.0, 0.0])  # gt is all-zero there: invalid
    meter = NormalTask().new_meter()
    meter.update(pred, gt)
    out = meter.compute()
    assert out["mean"] == pytest.approx(17.5, abs=1e-3)
    assert out["median"] == pytest.approx(10.0, abs=0.011)  # lower median; bins of 0.01 degree
    assert out["within_11.25"] == pytest.approx(50.0)
    assert out["within_22.5"] == pytest.approx(75.0)
    assert out["within_30"] == pytest.approx(75.0)


def test_dense_predictions_are_upsampled_to_the_target():
    gt = torch.full((1, 1, 8, 8), 2.0)
    pred = torch.full((1, 1, 2, 2), 3.0)
    meter = DepthTask().new_meter()
    meter.update(pred, gt)
    assert meter.compute()["abs_err"] == pytest.approx(1.0)


def test_edge_f1_and_ignore():
    gt = torch.tensor([[[[1.0, 1.0, 0.0, 0.0, -1.0]]]])
    pred = torch.tensor([[[[5.0, -5.0, 5.0, -5.0, 5.0]]]])
    meter = EdgeTask().new_meter()
    meter.update(pred, gt)
    assert meter.compute()["f1"] == pytest.approx(50.0)  # precision 1/2, recall 1/2


def test_classification_and_multilabel_accuracy():
    meter = ClassificationTask("c", 3).new_meter()
    meter.update(torch.eye(3)[[0, 1, 2, 0]] * 5, torch.tensor([0, 1, 1, -1]))
    assert meter.compute()["acc"] == pytest.approx(100 * 2 / 3)
    ml = MultiLabelTask("a", 2).new_meter()
    ml.update(torch.tensor([[1.0, -1.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert ml.compute()["acc"] == pytest.approx(75.0)


def test_meter_state_is_a_sum_that_merges():
    task = DepthTask()
    a, b, whole = task.new_meter(), task.new_meter(), task.new_meter()
    x1, y1 = torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 3) + 0.1
    x2, y2 = torch.rand(3, 1, 3, 3), torch.rand(3, 1, 3, 3) + 0.1
    a.update(x1, y1)
    b.update(x2, y2)
    whole.update(torch.cat([x1, x2]), torch.cat([y1, y2]))
    a.load_state(a.state() + b.state())
    assert a.compute() == pytest.approx(whole.compute())


def test_delta_m_signs():
    tasks = preset("nyuv2")
    ref = {
        "seg": {"miou": 40.0, "pixel_acc": 60.0},
        "depth": {"abs_err": 0.5, "rel_err": 0.2},
        "normal": {"mean": 20.0, "median": 15.0, "within_11.25": 30.0, "within_22.5": 60.0, "within_30": 70.0},
    }
    assert delta_m(ref, ref, tasks) == pytest.approx(0.0)
    better = {k: dict(v) for k, v in ref.items()}
    better["seg"]["miou"] = 44.0  # +10% on one of two seg metrics -> +5% for seg -> +5/3 overall
    assert delta_m(better, ref, tasks) == pytest.approx(5 / 3)
    worse = {k: dict(v) for k, v in ref.items()}
    worse["depth"]["abs_err"] = 0.6  # error up 20% -> -10% for depth -> -10/3 overall
    assert delta_m(worse, ref, tasks) == pytest.approx(-10 / 3)
    from mtprune.tasks.delta_m import delta_m_or_none

    assert delta_m_or_none(worse, ref, tasks) == pytest.approx(-10 / 3)
    zero = {k: dict(v) for k, v in ref.items()}
    zero["seg"]["miou"] = 0.0  # Δm undefined against a reference metric of 0
    assert delta_m_or_none(worse, zero, tasks) is None and delta_m_or_none(worse, None, tasks) is None


def test_presets():
    assert set(preset("nyuv2")) == {"seg", "depth", "normal"}
    assert preset("nyuv2_40")["seg"].out_channels == 40
    assert set(preset("cityscapes")) == {"seg", "depth"}
    assert [t.out_channels for t in preset("celeba").values()] == [20, 20]
    assert set(preset("synthetic_scenes")) == {"seg", "depth", "normal", "edge"}
    assert set(preset("multidigits")) == {"left", "right"}
    with pytest.raises(MTPruneInputError, match="unknown task preset"):
        preset("imagenet")
