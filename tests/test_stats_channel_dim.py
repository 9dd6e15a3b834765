"""Gate statistics never assume where the channel dimension is (issue 14).

Taylor-FO on gates (Molchanov et al., CVPR 2019) sums a · ∂L/∂a over every dimension of the gate's output but its
channel dimension. For Linear layers on tokens ([B, T, C]) that is the last one; when T >= C, summing over
dimension 1 would score token positions instead of channels. Each test compares the engine against a hand
reference (forward hooks, one backward of the summed loss) that sums over all dimensions but the channel one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtprune.pruning.criteria.taylor import Taylor
from mtprune.pruning.graph import PruningGraph
from mtprune.pruning.stats import StatisticsEngine, channel_dim, gate_params
from mtprune.utils.errors import MTPruneInputError


class TokenNet(nn.Module):
    """Linear layers on tokens [B, T, C], a LayerNorm (affine or not), and two task heads."""

    def __init__(self, affine: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.fc2 = nn.Linear(4, 5)
        self.norm = nn.LayerNorm(5, elementwise_affine=affine)
        self.heads = nn.ModuleDict({"tok": nn.Linear(5, 2), "cls": nn.Linear(5, 1)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.norm(self.fc2(F.gelu(self.fc1(x))))
        return {"tok": self.heads["tok"](f), "cls": self.heads["cls"](f.mean(1))}


class ConvNet(nn.Module):
    """Channels-first convs: a BatchNorm without affine parameters and a transposed conv as gates."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.up = nn.ConvTranspose2d(4, 5, 2, stride=2)
        self.heads = nn.ModuleDict({"a": nn.Conv2d(5, 2, 1), "b": nn.Conv2d(5, 1, 1)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = F.relu(self.up(F.relu(self.bn(self.conv(x)))))
        return {k: h(f) for k, h in self.heads.items()}


LOSSES = {"tok": F.mse_loss, "cls": F.mse_loss, "a": F.mse_loss, "b": F.mse_loss}


def hand_taylor(model: nn.Module, x: Tensor, targets: dict[str, Tensor], gates: dict[str, int]) -> dict[str, Tensor]:
    """(Σ a · ∂L/∂a)² per channel, summed over every dimension but ``gates[name]`` (the channel dimension)."""
    acts: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(module, args, out):
            out.retain_grad()
            acts[name] = out
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in gates]
    try:
        out = model(x)
        sum(LOSSES[t](out[t], targets[t]) for t in targets).backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return {n: (acts[n] * acts[n].grad).detach().movedim(d, 0).flatten(1).sum(1).pow(2) for n, d in gates.items()}


def engine_taylor(model: nn.Module, x: Tensor, targets: dict[str, Tensor]) -> dict[str, Tensor]:
    graph = PruningGraph(model, x[:1], min_channels=1)
    engine = StatisticsEngine(model, graph, {t: LOSSES[t] for t in targets}, [Taylor()])
    engine.run([(x, targets)])
    scores = Taylor().finalize(engine.averaged(Taylor()))
    return {graph.groups[k].gates[0]: v for k, v in scores.items()}


@pytest.mark.parametrize("tokens", [4, 5, 9])  # T < C, T == C and T > C for the two groups (4 and 5 channels)
@pytest.mark.parametrize("affine", [True, False])
def test_linear_on_tokens_scores_channels_not_tokens(tokens: int, affine: bool) -> None:
    torch.manual_seed(0)
    model = TokenNet(affine).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, tokens, 3, generator=gen)
    targets = {"tok": torch.randn(3, tokens, 2, generator=gen), "cls": torch.randn(3, 1, generator=gen)}
    got = engine_taylor(model, x, targets)
    assert sorted(got) == ["fc1", "norm"]  # fc2's gate is the LayerNorm after it
    assert (gate_params(model.norm) is None) == (not affine)  # without affine parameters: the activation path
    hand = hand_taylor(model, x, targets, {"fc1": 2, "norm": 2})
    for gate, ref in hand.items():
        assert got[gate].shape == ref.shape == ({"fc1": 4, "norm": 5}[gate],)
        torch.testing.assert_close(got[gate], ref, rtol=1e-4, atol=1e-10)
        wrong = hand_taylor(model, x, targets, {gate: 1})[gate]  # summed over the token dimension instead
        assert wrong.shape != ref.shape or not torch.allclose(wrong, ref, rtol=1e-2)


def test_conv_gates_without_affine_parameters_use_dimension_one() -> None:
    torch.manual_seed(0)
    model = ConvNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.3, 0.3)
        model.bn.running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 4, generator=gen)
    targets = {"a": torch.randn(2, 2, 8, 8, generator=gen), "b": torch.randn(2, 1, 8, 8, generator=gen)}
    got = engine_taylor(model, x, targets)
    assert sorted(got) == ["bn", "up"]
    assert gate_params(model.bn) is None and gate_params(model.up) is None
    for gate, ref in hand_taylor(model, x, targets, {"bn": 1, "up": 1}).items():
        torch.testing.assert_close(got[gate], ref, rtol=1e-4, atol=1e-10)


def test_a_module_called_twice_is_scored_over_both_calls() -> None:
    """The parameter form sums every call of a shared gate (a hook on the activation would see only the last)."""

    class Twice(TokenNet):
        def forward(self, x: Tensor) -> dict[str, Tensor]:
            h = F.gelu(self.fc1(x)) + F.gelu(self.fc1(x.flip(1)))
            f = self.norm(self.fc2(h))
            return {"tok": self.heads["tok"](f), "cls": self.heads["cls"](f.mean(1))}

    torch.manual_seed(0)
    model = Twice().eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 3, generator=gen)
    targets = {"tok": torch.randn(2, 6, 2, generator=gen), "cls": torch.randn(2, 1, generator=gen)}
    outs: list[Tensor] = []

    def keep(module: nn.Module, args: tuple, out: Tensor) -> None:
        out.retain_grad()
        outs.append(out)

    handle = model.fc1.register_forward_hook(keep)
    try:
        out = model(x)
        sum(LOSSES[t](out[t], targets[t]) for t in targets).backward()
    finally:
        handle.remove()
    model.zero_grad(set_to_none=True)
    ref = sum((o * o.grad).detach().flatten(0, 1).sum(0) for o in outs).pow(2)
    torch.testing.assert_close(engine_taylor(model, x, targets)["fc1"], ref, rtol=1e-4, atol=1e-10)


def test_channel_dim_is_taken_from_the_module_and_checked() -> None:
    assert channel_dim(nn.Linear(3, 4), torch.zeros(2, 9, 4)) == 2
    assert channel_dim(nn.LayerNorm(4, elementwise_affine=False), torch.zeros(2, 4, 4, 4)) == 3
    assert channel_dim(nn.BatchNorm2d(4, affine=False), torch.zeros(2, 4, 9, 9)) == 1
    with pytest.raises(MTPruneInputError, match="not in dimension 3"):  # a channels-first LayerNorm2d-like output
        channel_dim(nn.LayerNorm(4, elementwise_affine=False), torch.zeros(2, 4, 7, 7))
