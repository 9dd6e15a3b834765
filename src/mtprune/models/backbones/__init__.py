"""The backbone zoo; importing this package registers every backbone (see ``mtprune.models.registry``)."""

from . import lenet, mobilenet, resnet, timm_adapter, vgg

__all__ = ["lenet", "mobilenet", "resnet", "timm_adapter", "vgg"]
