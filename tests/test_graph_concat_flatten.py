"""Channel concatenations flattened into a Linear (PAM's merged network, issue 16): ``cat([E_t, C], dim=1) →
flatten → Linear`` couples each conv channel with one contiguous block of h*w features at its concat offset.
Torch-Pruning 1.6.1 alone sets no concat offsets there (it reads the Linear's h*w-fold width as the concat's), so
channel i of every branch was coupled with channel i of the others; the graph must map each branch on its own."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtprune.pruning.graph import PruningGraph
from mtprune.utils.errors import MTPruneInputError


class _Branches(nn.Module):
    """Two tasks: a shared conv ``c`` and one exclusive conv per task, each task's Linear reading ``[E_t, C]``."""

    def __init__(self, ea: int = 3, c: int = 4, eb: int = 2) -> None:
        super().__init__()
        self.ea, self.c, self.eb = (nn.Conv2d(1, n, 3) for n in (ea, c, eb))
        self.fc = nn.Linear(c * 4, 5)  # the shared trunk reads C alone
        self.fa, self.fb = nn.Linear((ea + c) * 4, 6), nn.Linear((eb + c) * 4, 6)
        self.heads = nn.ModuleDict({"a": nn.Linear(11, 2), "b": nn.Linear(11, 2)})
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        ea, c, eb = (self.pool(conv(x).relu()) for conv in (self.ea, self.c, self.eb))  # 6x6 -> 4x4 -> 2x2
        hc = self.fc(c.flatten(1)).relu()
        ha = self.fa(torch.cat([ea, c], 1).flatten(1)).relu()
        hb = self.fb(torch.cat([eb, c], 1).flatten(1)).relu()
        return {"a": self.heads["a"](torch.cat([ha, hc], 1)), "b": self.heads["b"](torch.cat([hb, hc], 1))}


def _model() -> _Branches:
    torch.manual_seed(0)
    return _Branches().eval()


def _x(n: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(n))


def test_each_branch_is_its_own_group_with_its_flattened_block() -> None:
    graph = PruningGraph(_model(), _x())
    groups = {g.root: g for g in graph.groups}
    assert not graph.skipped
    assert {"ea", "c", "eb"} <= set(groups)
    assert [groups[n].producers for n in ("ea", "c", "eb")] == [["ea"], ["c"], ["eb"]]
    assert groups["c"].consumers == ["fc", "fa", "fb"]
    # channel j of c is features [4 (3 + j), 4 (3 + j) + 4) of fa (after ea's 3 channels), [4 j, 4 j + 4) of fc
    fa = groups["c"].in_maps["fa"]
    assert fa.locals_of({1}) == [16, 17, 18, 19]
    assert groups["c"].in_maps["fc"].locals_of({1}) == [4, 5, 6, 7]
    assert groups["c"].in_maps["fb"].locals_of({0}) == [8, 9, 10, 11]
    assert groups["ea"].in_maps["fa"].locals_of({2}) == [8, 9, 10, 11]


def test_pruned_model_equals_the_original_with_those_channels_zeroed() -> None:
    model = _model()
    reference = copy.deepcopy(model)
    graph = PruningGraph(model, _x())
    removed = {"ea": [0], "c": [1, 3], "eb": [1]}  # one plan over all three branches, then a second step
    graph.prune({g.index: removed[g.root] for g in graph.groups if g.root in removed})
    graph.prune({g.index: [0] for g in graph.groups if g.root == "c"})  # c's old channel 0
    removed["c"].append(0)
    with torch.no_grad():
        for name, channels in removed.items():  # a zero conv channel is a zero feature block after relu + pool
            conv = getattr(reference, name)
            conv.weight[channels] = 0
            conv.bias[channels] = 0
        got, want = model(_x(8)), reference(_x(8))
    assert (model.fa.in_features, model.fc.in_features, model.fb.in_features) == (12, 4, 8)
    for t in ("a", "b"):
        assert got[t].shape == (8, 2)
        torch.testing.assert_close(got[t], want[t])


class _ChannelsLast(nn.Module):
    """A concat permuted to channels-last before the flatten: channel i is not one contiguous block."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(8 * 16, 5)
        self.heads = nn.ModuleDict({"t": nn.Linear(5, 2)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = torch.cat([self.a(x), self.b(x)], 1).permute(0, 2, 3, 1).flatten(1)
        return {"t": self.heads["t"](self.fc(y).relu())}


def test_a_concat_flattened_channels_last_is_still_refused_and_left_unchanged() -> None:
    torch.manual_seed(0)
    model = _ChannelsLast().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = PruningGraph(model, _x())
    conv = next(g for g in graph.groups if g.root == "a")
    with pytest.raises(MTPruneInputError, match="breaks the model"):
        graph.prune({conv.index: [0]})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
