"""Any timm model (Wightman, "PyTorch Image Models") as a backbone: ``build_model("timm:<name>", tasks)``.

The model is created with ``features_only=True, out_indices=(-1,), pretrained=False`` (mtprune never downloads
weights) and the backbone returns its last feature map. Extra keyword arguments go to ``timm.create_model``
(e.g. ``output_stride=8`` for the models that support it). timm is an optional extra:
``pip install mtprune[timm]``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from mtprune.utils.errors import MTPruneInputError

from ..layers import check_positive_int
from ..registry import register_backbone


def _import_timm() -> ModuleType:
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise MTPruneInputError("timm backbones need timm: pip install mtprune[timm]") from None


class TimmBackbone(nn.Module):
    """A timm feature extractor returning its last (lowest-resolution) feature map."""

    def __init__(self, model_name: str, in_channels: int = 3, **timm_kwargs: Any) -> None:
        super().__init__()
        timm = _import_timm()
        if timm_kwargs.get("pretrained"):
            raise MTPruneInputError("timm backbones are built without pretrained weights (mtprune never downloads)")
        timm_kwargs.pop("pretrained", None)
        if not isinstance(model_name, str) or not timm.is_model(model_name):
            raise MTPruneInputError(f"unknown timm model {model_name!r}; see timm.list_models()")
        try:
            self.body = timm.create_model(
                model_name,
                pretrained=False,
                features_only=True,
                out_indices=(-1,),
                in_chans=check_positive_int("in_channels", in_channels),
                **timm_kwargs,
            )
        except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
            raise MTPruneInputError(f"timm could not build {model_name!r} as a feature extractor: {exc}") from None
        self.out_channels = int(self.body.feature_info.channels()[-1])
        self.reduction = int(self.body.feature_info.reduction()[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)[-1]


@register_backbone("timm", default_head="conv", family=True)
def timm_backbone(width: float = 1.0, *, model_name: str, in_channels: int = 3, **timm_kwargs: Any) -> TimmBackbone:
    """timm model ``model_name`` (reached as ``timm:<model_name>``); ``width`` must stay 1.0."""
    if width != 1.0:
        raise MTPruneInputError(
            "timm backbones take no width multiplier; choose a smaller timm model instead (e.g. a *_050 variant)"
        )
    return TimmBackbone(model_name, in_channels, **timm_kwargs)
