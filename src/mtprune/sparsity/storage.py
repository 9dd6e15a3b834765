"""What unstructured sparsity buys: storage, not time (on dense kernels).

``stored_size`` counts the bytes of the model's tensors stored densely against two sparse encodings of the masked
weights (every other tensor stays dense): a bitmask plus the kept values, and CSR over output rows (values,
column indices, row pointers). ``latency`` times the masked model as it is against a dense copy: dense conv and
linear kernels multiply the zeros too, so expect no speed-up. The ``.mtp`` file itself stores the weights dense
plus the masks bit-packed (dense size + N/8 bytes), so it loads into an ordinary model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..measure import eval_mode, measure_latency
from ..utils.inputs import batch_size, call_model, to_device
from .masks import copy_model, dense_copy_of_state, get_masks, remove_masks

SPEED_NOTE = ("Unstructured sparsity saves storage, not time: dense conv/linear kernels multiply the zeros too. "
              "With the masks baked in (mtprune.sparsity.remove_masks) the model runs at the dense model's speed; "
              "with the masks still attached it is slower, since every forward multiplies each weight by its mask "
              "(see the measured latencies). A speed-up needs sparse kernels (e.g. 2:4 semi-structured sparsity on "
              "recent GPUs, or very high sparsity with CSR kernels: mtprune.sparsity.export.export_csr, measured as "
              "csr_ms) or structured pruning (mtprune.prune).")


def stored_size(model: nn.Module, *, index_bytes: int = 4) -> dict[str, float]:
    """Bytes of every tensor of the model: dense, and with the masked weights in sparse encodings."""
    masks = get_masks(model)
    state = dense_copy_of_state(model)
    masked = {p: state[p] for p in masks}
    other = sum(t.numel() * t.element_size() for k, t in state.items() if k not in masks)
    dense = other + sum(w.numel() * w.element_size() for w in masked.values())
    bitmask, csr, nnz = other, other, 0
    for p, m in masks.items():
        k, size = int(m.sum()), masked[p].element_size()
        nnz += k
        bitmask += math.ceil(m.numel() / 8) + k * size
        rows = m.shape[0] if m.dim() else 1
        csr += k * (size + index_bytes) + (rows + 1) * index_bytes
    numel = sum(m.numel() for m in masks.values())
    best = min(bitmask, csr)
    return {"dense_bytes": dense, "bitmask_bytes": bitmask, "csr_bytes": csr, "best_sparse_bytes": best,
            "compression": dense / best if best else 1.0, "masked_weights": numel, "nonzero_masked": nnz,
            "mtp_file_bytes_estimate": dense + sum(math.ceil(m.numel() / 8) for m in masks.values())}


def latency(model: nn.Module, example_inputs: Tensor | tuple | dict, *, repeats: int = 10,
            warmup: int = 3) -> dict[str, float]:
    """Median forward time in ms of the masked model as it is, of a copy with the masks baked in, and (on CPU) of
    the CSR export (``sparsity.export.export_csr``), the real sparse path."""
    from .export import export_csr

    device = next(model.parameters()).device
    x = to_device(example_inputs, device)
    dense = copy_model(model)
    remove_masks(dense)
    nets = [("masked_ms", model), ("dense_ms", dense)]
    if device.type == "cpu":
        nets.append(("csr_ms", export_csr(model)))
    out = {}
    for key, net in nets:
        with eval_mode(net), torch.inference_mode():
            out[key] = measure_latency(lambda net=net: call_model(net, x), warmup=warmup, repeats=repeats,
                                       device=device)
    out["speedup"] = out["dense_ms"] / out["masked_ms"]
    if "csr_ms" in out:
        out["csr_speedup"] = out["dense_ms"] / out["csr_ms"]
    out.update({"batch_size": batch_size(x), "threads": torch.get_num_threads(), "device": str(device)})
    return out
