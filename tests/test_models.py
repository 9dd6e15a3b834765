"""Tests for mtprune.models: the zoo, the registry, MultiTaskModel and the output validator."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torchvision
from torch import nn

from mtprune.models import (
    MultiTaskModel,
    build_head,
    build_model,
    check_multitask_output,
    find_predictors,
    list_heads,
    list_models,
    register_model,
    validate_model,
)
from mtprune.models import registry as registry_module
from mtprune.utils.errors import MTPruneInputError

TASKS = {"seg": 13, "depth": 1, "normal": 3}
DENSE = ["deeplab_resnet18", "deeplab_resnet34", "deeplab_resnet50", "vgg16", "mobilenetv2"]
SMALL_HEAD = {"aspp_v2": {"hidden": 64}, "small_aspp": {"hidden": 64}, "deeplabv3_aspp": {"channels": 32}}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def small(name: str, tasks=TASKS, **kwargs) -> MultiTaskModel:
    """A CPU-sized zoo model: width 0.25 and narrow heads."""
    head = kwargs.pop("head", None) or registry_module._BACKBONES[name.partition(":")[0]].default_head
    return build_model(name, tasks, width=0.25, head=head, head_kwargs=SMALL_HEAD.get(head, {}), **kwargs)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- the zoo: keys, shapes, backward -------------------------------------------------------------------------


@pytest.mark.parametrize("name", DENSE)
def test_dense_zoo_forward_backward(name):
    model = small(name)
    out = model(torch.rand(2, 3, 64, 80))
    assert list(out) == list(TASKS)
    for task, channels in TASKS.items():
        assert out[task].shape == (2, channels, 8, 10), task  # 1/8 resolution, no upsampling in the heads
    sum(o.square().mean() for o in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize(
    ("name", "kwargs", "shape"),
    [
        ("lenet5", {"in_channels": 1}, (1, 28, 28)),
        ("lenet5", {}, (3, 28, 28)),
        ("lenet5", {"input_size": 32}, (3, 32, 32)),
        ("vgg16_cls", {}, (3, 64, 64)),
        ("vgg16_cls", {"pool": "flatten", "input_size": 64}, (3, 64, 64)),
    ],
)
def test_classification_zoo_forward_backward(name, kwargs, shape):
    tasks = {"attr_a": 20, "attr_b": 20}
    model = build_model(name, tasks, **({"width": 0.25} if name == "vgg16_cls" else {}), **kwargs)
    assert all(type(h).__name__ == "LinearHead" for h in model.heads.values())  # default head: linear
    out = model(torch.rand(2, *shape))
    assert {k: tuple(v.shape) for k, v in out.items()} == {"attr_a": (2, 20), "attr_b": (2, 20)}
    sum(o.sum() for o in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lenet_is_the_paper_chain():
    backbone = build_model("lenet5", {"a": 10}, in_channels=1).backbone
    kinds = [type(m).__name__ for m in backbone]
    assert kinds == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten"] + [
        "Linear",
        "ReLU",
        "Linear",
        "ReLU",
    ]
    assert (backbone.conv1.out_channels, backbone.conv2.out_channels) == (6, 16)
    assert (backbone.fc1.in_features, backbone.fc1.out_features, backbone.out_channels) == (256, 120, 84)
    with pytest.raises(MTPruneInputError, match="input_size"):
        backbone(torch.rand(1, 1, 32, 32))


def test_vgg16_is_a_plain_chain_without_batchnorm():
    for name in ("vgg16", "vgg16_cls"):
        backbone = build_model(name, {"a": 2}, width=0.25).backbone
        assert isinstance(backbone, nn.Sequential)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
        assert sum(isinstance(m, nn.Conv2d) for m in backbone) == 13


@pytest.mark.parametrize("head", list_heads())
def test_every_head_on_a_dense_backbone(head):
    kwargs = SMALL_HEAD.get(head, {})
    model = build_model("deeplab_resnet18", {"seg": 5, "depth": 1}, width=0.25, head=head, head_kwargs=kwargs)
    out = model(torch.rand(2, 3, 64, 80))
    expected_hw = () if head == "linear" else (8, 10)
    assert out["seg"].shape == (2, 5, *expected_hw)
    assert out["depth"].shape == (2, 1, *expected_hw)


# --- MultiTaskModel ------------------------------------------------------------------------------------------


def _count_calls(model: MultiTaskModel) -> dict[str, int]:
    calls = {"backbone": 0, **{t: 0 for t in model.task_names}}

    def hook(name):
        def fn(*_):
            calls[name] += 1

        return fn

    model.backbone.register_forward_hook(hook("backbone"))
    for task, head in model.heads.items():
        head.register_forward_hook(hook(task))
    return calls


def test_tasks_subset_runs_only_those_heads():
    model = small("deeplab_resnet18")
    calls = _count_calls(model)
    out = model(torch.rand(2, 3, 64, 80), tasks=["normal", "seg"])
    assert list(out) == ["normal", "seg"]
    assert calls == {"backbone": 1, "seg": 1, "depth": 0, "normal": 1}
    out = model(torch.rand(2, 3, 64, 80), tasks="depth")
    assert list(out) == ["depth"]
    assert calls == {"backbone": 2, "seg": 1, "depth": 1, "normal": 1}
    assert model.task_names == ("seg", "depth", "normal")


def test_forward_refuses_unknown_task():
    model = small("deeplab_resnet18")
    with pytest.raises(MTPruneInputError, match="unknown task.*'edges'"):
        model(torch.rand(1, 3, 32, 32), tasks=["seg", "edges"])


def test_multitask_model_refuses_heads_not_matching_tasks():
    heads = {"seg": nn.Conv2d(4, 3, 1), "extra": nn.Conv2d(4, 1, 1)}
    with pytest.raises(MTPruneInputError) as err:
        MultiTaskModel(nn.Identity(), heads, tasks=["seg", "depth"])
    assert "missing ['depth']" in str(err.value) and "unexpected ['extra']" in str(err.value)
    model = MultiTaskModel(nn.Identity(), heads, tasks=["extra", "seg"])  # order does not matter
    assert set(model.task_names) == {"seg", "extra"}
    with pytest.raises(MTPruneInputError, match="nn.Module"):
        MultiTaskModel(nn.Identity(), {"seg": lambda x: x})
    with pytest.raises(MTPruneInputError, match="task name"):
        MultiTaskModel(nn.Identity(), {"a.b": nn.Identity()})


def test_multitask_model_accepts_user_modules():
    model = MultiTaskModel(nn.Conv2d(3, 4, 3), nn.ModuleDict({"x": nn.Conv2d(4, 2, 1)}), tasks=("x",))
    assert model(torch.rand(1, 3, 8, 8))["x"].shape == (1, 2, 6, 6)


# --- output stride, dilation and width -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deeplab_resnet18", "deeplab_resnet34", "deeplab_resnet50"])
def test_deeplab_resnets_are_dilated_to_output_stride_8(name):
    backbone = build_model(name, {"seg": 2}, width=0.125).backbone
    assert backbone(torch.rand(1, 3, 64, 80)).shape[-2:] == (8, 10)
    assert backbone(torch.rand(1, 3, 65, 81)).shape[-2:] == (9, 11)  # ceil(H / 8)
    for layer, dilation in (("layer3", 2), ("layer4", 4)):
        convs = [m for m in getattr(backbone, layer).modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
        assert all(c.stride == (1, 1) and c.dilation == (dilation, dilation) for c in convs)
    assert backbone.layer2[0].conv1.stride == (2, 2) or backbone.layer2[0].conv2.stride == (2, 2)
    os16 = build_model(name, {"seg": 2}, width=0.125, output_stride=16).backbone
    assert os16(torch.rand(1, 3, 64, 80)).shape[-2:] == (4, 5)
    with pytest.raises(MTPruneInputError, match="output_stride"):
        build_model(name, {"seg": 2}, width=0.125, output_stride=12)


def test_vgg16_dense_layout_is_largefov():
    backbone = build_model("vgg16", {"seg": 2}, width=0.125).backbone
    strides = [backbone.get_submodule(f"pool{b}").stride for b in range(1, 6)]
    assert strides == [2, 2, 2, 1, 1]
    assert backbone.conv5_1.dilation == (2, 2) and backbone.conv4_3.dilation == (1, 1)


def test_mobilenetv2_is_dilated():
    backbone = build_model("mobilenetv2", {"seg": 2}, width=0.25).backbone
    depthwise = [m for m in backbone.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert max(m.dilation[0] for m in depthwise) == 4
    assert sum(m.stride == (2, 2) for m in backbone.modules() if isinstance(m, nn.Conv2d)) == 3


@pytest.mark.parametrize(
    ("name", "full", "first"),
    [
        ("deeplab_resnet34", 512, ("conv1", 64)),
        ("deeplab_resnet50", 2048, ("conv1", 64)),
        ("vgg16", 512, ("conv1_1", 64)),
        ("mobilenetv2", 320, ("features.0.0", 32)),
        ("lenet5", 84, ("conv1", 6)),
        ("vgg16_cls", 4096, ("fc6", 4096)),
    ],
)
def test_width_scales_channels(name, full, first):
    layer, channels = first
    for width in (1.0, 0.5, 0.25):
        with torch.device("meta"):
            model = build_model(name, {"t": 3}, width=width)
        assert model.backbone.out_channels == round(full * width)
        module = model.backbone.get_submodule(layer)
        assert getattr(module, "out_channels", getattr(module, "out_features", None)) == round(channels * width)


def test_width_scales_heads():
    with torch.device("meta"):
        model = build_model("deeplab_resnet18", {"t": 3}, width=0.25)
        override = build_model("deeplab_resnet18", {"t": 3}, width=0.25, head_kwargs={"width": 1.0, "hidden": 96})
    assert model.heads["t"].branches[0].conv.out_channels == 256
    assert override.heads["t"].branches[0].conv.out_channels == 96


# --- parameter counts at width 1 (real architectures) ---------------------------------------------------------


def _tv_backbone_params(factory, drop) -> int:
    with torch.device("meta"):
        net = factory()
    return n_params(net) - n_params(drop(net))


@pytest.mark.parametrize(
    ("name", "expected", "tv"),
    [
        ("deeplab_resnet34", 21_284_672, (torchvision.models.resnet34, lambda m: m.fc)),
        ("deeplab_resnet50", 23_508_032, (torchvision.models.resnet50, lambda m: m.fc)),
        ("vgg16", 14_714_688, (torchvision.models.vgg16, lambda m: m.classifier)),
        (
            "mobilenetv2",
            1_811_712,
            (torchvision.models.mobilenet_v2, lambda m: nn.ModuleList([m.classifier, m.features[-1]])),
        ),
    ],
)
def test_backbone_parameter_counts_match_the_papers(name, expected, tv):
    with torch.device("meta"):
        backbone = build_model(name, {"t": 1}).backbone
    assert n_params(backbone) == expected == _tv_backbone_params(*tv)


def test_garg_vgg16_small_aspp_has_84_13m_parameters():
    with torch.device("meta"):
        model = build_model("vgg16", {"seg": 40, "normal": 3, "depth": 1}, head="small_aspp")
    assert n_params(model) == 84_125_680  # Garg et al. 2023: 84.13M


def test_disparse_resnet34_aspp_parameter_count():
    with torch.device("meta"):
        model = build_model("deeplab_resnet34", {"seg": 40, "normal": 3})
    head = model.heads["seg"]
    assert [b.conv.dilation[0] for b in head.branches] == [6, 12, 18, 24]
    per_branch = (512 * 9 + 1) * 1024 + (1024 + 1) * 1024
    assert n_params(model) == 21_284_672 + 2 * 4 * per_branch + 4 * 1025 * (40 + 3)


# --- heads' predictors ---------------------------------------------------------------------------------------


def test_predictors_are_the_final_layers():
    model = small("deeplab_resnet18", tasks={"seg": 7, "depth": 1})
    predictors = model.predictors()
    assert set(predictors) == {"seg", "depth"}
    assert len(predictors["seg"]) == 4 and all(p.out_channels == 7 for p in predictors["seg"])
    assert all(p is b.out for p, b in zip(predictors["seg"], model.heads["seg"].branches, strict=True))
    for head in list_heads():
        predictor = build_head(head, 16, 5, **SMALL_HEAD.get(head, {})).predictor
        assert len(predictor) == (4 if head in ("aspp_v2", "small_aspp") else 1), head
        for layer in predictor:
            assert isinstance(layer, nn.Conv2d | nn.Linear)
            assert getattr(layer, "out_channels", getattr(layer, "out_features", None)) == 5


def test_find_predictors_falls_back_to_the_last_layer():
    head = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1))
    assert find_predictors(head) == [head[2]]
    with pytest.raises(MTPruneInputError, match="no Conv2d or Linear"):
        find_predictors(nn.ReLU())


# --- registry and mtprune_spec -------------------------------------------------------------------------------


def _arch(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("deeplab_resnet34", {"width": 0.25, "head_kwargs": {"hidden": 48, "dilations": (1, 3)}, "in_channels": 1}),
        ("deeplab_resnet50", {"width": 0.125, "output_stride": 16}),
        ("vgg16", {"width": 0.25, "head": "conv"}),
        ("mobilenetv2", {"width": 0.5, "head_kwargs": {"channels": 24, "rates": [6, 12, 18]}}),
        ("lenet5", {"input_size": [32, 36], "in_channels": 1}),
        ("vgg16_cls", {"width": 0.125, "pool": "flatten", "input_size": 64, "head_kwargs": {"hidden": 32}}),
    ],
)
def test_spec_round_trip_rebuilds_the_same_architecture(name, kwargs):
    model = build_model(name, TASKS, **kwargs)
    spec = model.mtprune_spec
    assert spec["builder"] == name
    for key, value in kwargs.items():  # every argument is recorded, JSON-style (tuples become lists)
        assert spec["kwargs"][key] == json.loads(json.dumps(value)), key
    restored_spec = json.loads(json.dumps(spec))  # what a saved model carries
    assert restored_spec == spec
    rebuilt = build_model(restored_spec["builder"], **restored_spec["kwargs"])
    assert _arch(rebuilt) == _arch(model)
    assert rebuilt.mtprune_spec == spec
    assert spec["kwargs"]["head"] in list_heads()  # the default head is recorded by name


def test_spec_must_be_json_serialisable():
    with pytest.raises(MTPruneInputError, match="JSON"):
        build_model("vgg16", {"seg": 2}, width=0.125, head_kwargs={"hidden": object()})


def test_unknown_names_list_the_available_ones():
    with pytest.raises(MTPruneInputError) as err:
        build_model("resnet9000", TASKS)
    assert "deeplab_resnet34" in str(err.value) and "vgg16" in str(err.value)
    with pytest.raises(MTPruneInputError) as err:
        build_model("vgg16", TASKS, head="fancy")
    assert "small_aspp" in str(err.value)
    with pytest.raises(MTPruneInputError, match="unexpected keyword"):
        build_model("vgg16", TASKS, width=0.125, colour="blue")


def test_bad_tasks_and_width_are_input_errors():
    for tasks in ({}, {"seg": 0}, {"seg": 2.5}, ["seg"]):
        with pytest.raises(MTPruneInputError):
            build_model("lenet5", tasks)
    for width in (0, -1.0, float("nan"), "1"):
        with pytest.raises(MTPruneInputError, match="width"):
            build_model("lenet5", {"a": 2}, width=width)


def test_list_models_names_the_zoo():
    names = list_models()
    for name in DENSE + ["lenet5", "vgg16_cls", "timm:<name>"]:
        assert name in names
    assert {"aspp_v2", "small_aspp", "deeplabv3_aspp", "conv", "linear"} <= set(list_heads())


def test_register_model_adds_a_builder(monkeypatch):
    monkeypatch.setattr(registry_module, "_MODELS", dict(registry_module._MODELS))

    @register_model("test_tiny")
    def tiny(tasks, *, width=1.0, head=None, head_kwargs=None, depth=1):
        body = nn.Sequential(*[nn.Conv2d(3, 3, 1) for _ in range(depth)])
        return MultiTaskModel(body, {t: nn.Conv2d(3, c, 1) for t, c in tasks.items()})

    model = build_model("test_tiny", {"a": 2}, depth=3)
    assert model.mtprune_spec == {
        "builder": "test_tiny",
        "kwargs": {"tasks": {"a": 2}, "width": 1.0, "head": None, "head_kwargs": {}, "depth": 3},
    }
    assert len(model.backbone) == 3
    with pytest.raises(ValueError, match="already registered"):
        register_model("vgg16")(tiny)


# --- the output validator ------------------------------------------------------------------------------------


class _UserModel(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        outputs = {
            "dict": {"a": y[:, :2], "b": y[:, 2:]},
            "tensor": y,
            "list": [y, y],
            "tuple": (y,),
            "bad_value": {"a": [y]},
        }
        return outputs[self.kind]


def test_validator_accepts_a_user_dict_model():
    model = _UserModel("dict").train()
    before = model.bn.running_mean.clone()
    out = validate_model(model, torch.rand(2, 3, 8, 8), expected_tasks=["b", "a"])
    assert set(out) == {"a", "b"} and out["a"].shape == (2, 2, 8, 8)
    assert model.training and torch.equal(model.bn.running_mean, before)  # no side effects


@pytest.mark.parametrize(("kind", "described"), [("tensor", "Tensor"), ("list", "list"), ("tuple", "tuple")])
def test_validator_refuses_non_dict_outputs(kind, described):
    with pytest.raises(MTPruneInputError, match=f"model must return a dict of task outputs, got {described}"):
        validate_model(_UserModel(kind), torch.rand(2, 3, 8, 8))


def test_validator_names_key_and_value_problems():
    y = torch.zeros(1)
    with pytest.raises(MTPruneInputError, match=r"missing \['c'\].*unexpected \['b'\]"):
        check_multitask_output({"a": y, "b": y}, expected_tasks=["a", "c"])
    with pytest.raises(MTPruneInputError, match="got list of 1 items for task 'a'"):
        validate_model(_UserModel("bad_value"), torch.rand(1, 3, 4, 4))
    with pytest.raises(MTPruneInputError, match="keyed by task name"):
        check_multitask_output({0: y})
    assert check_multitask_output({"a": y}, ["a"]) == {"a": y}


def test_zoo_models_pass_the_validator():
    model = small("vgg16")
    assert set(validate_model(model, torch.rand(1, 3, 32, 40), expected_tasks=TASKS)) == set(TASKS)


# --- timm (optional extra) -----------------------------------------------------------------------------------


def test_timm_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(MTPruneInputError, match=r"pip install mtprune\[timm\]"):
        build_model("timm:resnet18", TASKS)


def test_timm_backbone():
    pytest.importorskip("timm")
    model = build_model("timm:mobilenetv3_small_050", TASKS)
    assert all(type(h).__name__ == "ConvHead" for h in model.heads.values())
    out = model(torch.rand(2, 3, 64, 80))
    assert {k: v.shape[1] for k, v in out.items()} == TASKS
    assert out["seg"].shape[-2:] == (2, 3)  # timm's last feature map, 1/32
    assert model.heads["seg"].conv.in_channels == model.backbone.out_channels
    rebuilt = build_model(model.mtprune_spec["builder"], **model.mtprune_spec["kwargs"])
    assert _arch(rebuilt) == _arch(model)
    with pytest.raises(MTPruneInputError, match="unknown timm model"):
        build_model("timm:no_such_net", TASKS)
    with pytest.raises(MTPruneInputError, match="width"):
        build_model("timm:mobilenetv3_small_050", TASKS, width=0.5)
    with pytest.raises(MTPruneInputError, match="pretrained"):
        build_model("timm:mobilenetv3_small_050", TASKS, pretrained=True)
    with pytest.raises(MTPruneInputError, match="unknown"):
        build_model("timm", TASKS)
