"""``mtprune.profile`` with many tasks: per-task = shared + exclusive without enumerating subsets, subsets only on
request, and a shared module run once per task counted with only the calls a subset needs."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import mtprune
from mtprune.utils.errors import MTPruneInputError

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
TRUNK = 8 * 8 * 8 * 27  # Conv2d(3, 8, 3, padding=1) on 8x8
BRANCH = 8 * 8 * 4 * 8  # Conv2d(8, 4, 1)


class ManyHeads(nn.Module):
    """A trunk, two branches (one for the even, one for the odd tasks) and one linear head per task."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.trunk = nn.Conv2d(3, 8, 3, padding=1)
        self.even, self.odd = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)
        self.heads = nn.ModuleDict({f"t{i}": nn.Linear(4, i % 3 + 1) for i in range(tasks)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = torch.relu(self.trunk(x))
        g = {0: self.even(f).mean(dim=(2, 3)), 1: self.odd(f).mean(dim=(2, 3))}
        return {name: head(g[i % 2]) for i, (name, head) in enumerate(self.heads.items())}


def head_macs(i: int) -> int:
    return 4 * (i % 3 + 1)


def test_forty_tasks_per_task_shared_and_exclusive() -> None:
    """40 tasks: per-task = the shared calls it needs + its exclusive ones, by hand; subsets are not enumerated
    unless asked; a list of subsets gives just those."""
    torch.manual_seed(0)
    n = 40
    info = mtprune.profile(ManyHeads(n), X, latency=False)
    assert info.macs == TRUNK + 2 * BRANCH + sum(head_macs(i) for i in range(n))
    assert info.macs_shared == TRUNK + 2 * BRANCH  # the trunk and each branch serve more than one task
    for i in range(n):
        assert info.macs_exclusive[f"t{i}"] == head_macs(i)
        assert info.macs_per_task[f"t{i}"] == TRUNK + BRANCH + head_macs(i)
    assert len(info.macs_per_subset) == n + 1  # each task alone and all together, not 2^40 - 1
    assert info.macs_per_subset["+".join(f"t{i}" for i in range(n))] == info.macs
    asked = mtprune.profile(ManyHeads(n), X, latency=False, subsets=["t0+t2", ("t3", "t0"), "t5"])
    assert asked.macs_per_subset == {"t0+t2": TRUNK + BRANCH + head_macs(0) + head_macs(2),
                                     "t0+t3": TRUNK + 2 * BRANCH + head_macs(0) + head_macs(3),
                                     "t5": TRUNK + BRANCH + head_macs(5)}


def test_subsets_on_request_and_bad_subsets() -> None:
    """subsets=True lists all 2^T - 1 subsets (each = union of the calls its tasks need); unknown names and
    too many tasks for subsets=True are refused."""
    torch.manual_seed(0)
    info = mtprune.profile(ManyHeads(6), X, latency=False, subsets=True)
    assert len(info.macs_per_subset) == 63
    assert info.macs_per_subset["t0+t1"] == TRUNK + 2 * BRANCH + head_macs(0) + head_macs(1)
    assert len(mtprune.profile(ManyHeads(6), X, latency=False).macs_per_subset) == 7  # default: above 5 tasks
    assert len(mtprune.profile(ManyHeads(3), X, latency=False).macs_per_subset) == 7  # all of them up to 5
    with pytest.raises(MTPruneInputError, match="unknown task"):
        mtprune.profile(ManyHeads(3), X, latency=False, subsets=["t0+nope"])
    with pytest.raises(MTPruneInputError, match="subsets=True"):
        mtprune.profile(ManyHeads(21), X, latency=False, subsets=True)


class PerTaskRuns(nn.Module):
    """A shared conv run once per task on a task-conditioned input (e.g. task tokens), then a task head."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.shared = nn.Conv2d(3, 8, 3, padding=1)
        self.bias = nn.Parameter(torch.randn(tasks, 3, 1, 1))
        self.heads = nn.ModuleList(nn.Conv2d(8, 1, 1) for _ in range(tasks))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {f"t{i}": head(self.shared(x + self.bias[i])) for i, head in enumerate(self.heads)}


def test_a_shared_module_run_once_per_task_counts_only_the_calls_a_subset_needs() -> None:
    """The shared conv's MACs are counted once per task of the subset, not with all of its calls."""
    torch.manual_seed(0)
    one = TRUNK + 8 * 8 * 8  # one shared call + one head
    info = mtprune.profile(PerTaskRuns(5), X, latency=False, subsets=["t1", "t0+t3", "t0+t1+t2+t3+t4"])
    assert info.macs_per_subset == {"t1": one, "t0+t3": 2 * one, "t0+t1+t2+t3+t4": 5 * one}
    assert info.macs_shared == 0 and info.macs_exclusive["t2"] == one == info.macs_per_task["t2"]


def test_forty_tasks_through_a_multitask_model_with_the_cli(tmp_path, capsys) -> None:
    """A 40-head zoo model: the CLI prints per-task costs and, with --tasks, that subset's cost; an unknown task
    in --tasks exits 2 naming it."""
    from mtprune.cli import main

    torch.manual_seed(0)
    model = mtprune.build_model("vgg16", {f"a{i}": 1 for i in range(40)}, width=0.0625, head="conv",
                                head_kwargs={"hidden": 4})
    path = mtprune.save(model, tmp_path / "m.mtp", example_inputs=torch.zeros(1, 3, 16, 16))
    out = tmp_path / "p.json"
    assert main(["--quiet", "profile", str(path), "--tasks", "a3,a7", "--json", str(out)]) == 0
    import json

    got = json.loads(out.read_text())
    info = mtprune.profile(model, torch.zeros(1, 3, 16, 16), latency=False, subsets=["a3+a7"])
    assert got["macs_per_subset"] == {"a3+a7": info.macs_per_subset["a3+a7"]}
    assert len(got["macs_per_task"]) == 40 and got["macs_shared"] == info.macs_per_part["backbone"]
    capsys.readouterr()
    assert main(["--quiet", "profile", str(path), "--tasks", "a3,b9"]) == 2
    assert "unknown task(s) ['b9']" in capsys.readouterr().err


class InPlace(nn.Module):
    """The trunk's output is read by task ``a``, then modified in place (``relu_``) and read by task ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Linear(8, 2), nn.Conv2d(8, 1, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.trunk(x)
        a = self.a(f.mean(dim=(2, 3)))
        f.relu_()
        return {"a": a, "b": self.b(f)}


def test_a_layer_whose_output_is_modified_in_place_is_still_shared() -> None:
    """Both tasks need the trunk even though ``b`` sees it only after an in-place ReLU."""
    torch.manual_seed(0)
    info = mtprune.profile(InPlace(), X, latency=False)
    assert info.macs_shared == TRUNK
    assert info.macs_exclusive == {"a": 16, "b": 8 * 8 * 8}
