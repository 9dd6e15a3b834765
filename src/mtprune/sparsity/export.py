"""A real sparse path for masked models on CPU: CSR weights with ``torch.sparse.mm``.

``export_csr(model)`` replaces each masked ``nn.Linear`` by a CSR matrix product and each masked ``nn.Conv2d``
(``groups == 1``) by im2col (``F.unfold``) followed by a CSR product. The function computed is the masked
model's; only the kernels change. Whether it is faster depends on the sparsity and the shapes: at moderate
sparsity the im2col copy and the sparse kernel usually lose to a dense convolution, which the storage report
measures rather than assumes.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .masks import copy_model, effective_weight, is_masked, remove_masks


def _csr(weight: Tensor) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we test what we use
        warnings.simplefilter("ignore", UserWarning)
        return weight.detach().to_sparse_csr()


class CSRLinear(nn.Module):
    """``y = x Wᵀ + b`` with W stored as a CSR matrix."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight_csr", _csr(weight))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.sparse.mm(self.weight_csr, flat.t()).t()
        out = out if self.bias is None else out + self.bias
        return out.reshape(*x.shape[:-1], -1)


class CSRConv2d(nn.Module):
    """A convolution as im2col plus a CSR matrix product (``groups == 1``)."""

    def __init__(self, conv: nn.Conv2d, weight: Tensor) -> None:
        super().__init__()
        self.out_channels, self.kernel_size = conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.register_buffer("weight_csr", _csr(weight.reshape(conv.out_channels, -1)))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        flat = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [C*k*k, N*L]
        out = torch.sparse.mm(self.weight_csr, flat).reshape(self.out_channels, n, oh, ow).transpose(0, 1)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


def export_csr(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose masked linear and (ungrouped) conv layers run on CSR kernels."""
    swaps = {}
    for name, module in model.named_modules():
        if not is_masked(module):
            continue
        weight = effective_weight(module)
        if isinstance(module, nn.Linear):
            swaps[name] = CSRLinear(weight, module.bias)
        elif isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
            swaps[name] = CSRConv2d(module, weight)
    out = copy_model(model)
    remove_masks(out)
    for name, new in swaps.items():
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, new)
    return out.eval()
