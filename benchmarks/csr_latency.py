"""Latency of masked models: as masked, with the masks baked in (dense), and the CSR export.

Run from the repository root: `.venv/bin/python benchmarks/csr_latency.py` (random masks, input 1×3×64×80,
batch 1, 1 thread, CPU). Writes benchmarks/results/sparse_export/csr_latency.json.
"""

import json
from pathlib import Path

import torch

import mtprune
from mtprune.sparsity.masks import apply_masks, maskable_params
from mtprune.sparsity.storage import latency

MODELS = {
    "deeplab_resnet18 w0.125 conv heads (disparse2022 model)": ("deeplab_resnet18", {"width": 0.125, "head": "conv"}),
    "deeplab_resnet34 w0.25 aspp_v2 hidden 128 (demo model)": (
        "deeplab_resnet34", {"width": 0.25, "head": "aspp_v2", "head_kwargs": {"hidden": 128}}),
}

torch.set_num_threads(1)
torch.manual_seed(0)
results = {}
for label, (arch, kw) in MODELS.items():
    for sparsity in (0.9, 0.98):
        model = mtprune.build_model(arch, {"seg": 7, "normal": 3}, **kw).eval()
        apply_masks(model, {p: torch.rand(s) > sparsity for p, s in maskable_params(model).items()})
        results[f"{label} @ {sparsity}"] = latency(model, torch.rand(1, 3, 64, 80), repeats=10)
text = json.dumps({"setting": "random masks, input 1x3x64x80, batch 1, 1 thread, CPU", "results": results}, indent=1)
print(text)
out = Path("benchmarks/results/sparse_export/csr_latency.json")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(text + "\n")
