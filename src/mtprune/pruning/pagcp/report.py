"""PAGCP's record of a run (Ye et al., TPAMI 2023): per round what was probed, kept and what it cost; the
Markdown section of a run report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .allocation import LayerProbe
from .probe import Losses


@dataclass
class RoundRecord:
    """One PAGCP round: what was probed, kept, and what it cost."""

    round: int
    theta0: float
    lam: float
    budget: float
    reference_loss: Losses  # the round's start, on the held-out set
    layers: list[LayerProbe]
    removed: dict[str, int]  # group root → channels removed in this round
    ratios: dict[str, float]  # group root → fraction of its channels removed in this round
    loss_ratio: Losses  # per task: the pruned selection (masked) against the round's start
    dropped: list[str]  # selected groups dropped by the budget check
    fitted: bool  # the selection was cut to land on target_macs
    macs_before: int
    macs_after: int
    macs_estimated: int  # MacsModel's estimate of macs_after
    params_before: int
    params_after: int
    forwards: int
    seconds: float
    latency_before_ms: float | None = None  # with a latency target: predicted at the round's start (ms)
    latency_after_ms: float | None = None  # and once its plan is applied

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = [{k: v for k, v in asdict(r).items() if k not in ("index", "order_of_removal")}
                         for r in self.layers]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoundRecord:
        """The inverse of :meth:`to_dict` (the layers lose their round-local ``index``/``order_of_removal``)."""
        return cls(**{**d, "layers": [LayerProbe(**layer) for layer in d["layers"]]})


@dataclass
class PAGCPReport:
    criterion: str
    settings: dict[str, Any]
    target_macs: float | None
    macs_before: int
    params_before: int
    macs_after: int = 0
    params_after: int = 0
    reached: bool | None = None
    rounds: list[RoundRecord] = field(default_factory=list)
    seconds: float = 0.0
    # with a latency target: {"target": {name: value}, "dense_ms", "goal_ms", "predicted_ms", "predicted_ratio"}
    latency: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "rounds"}
        out["rounds"] = [r.to_dict() for r in self.rounds]
        out["macs_ratio"] = self.macs_after / self.macs_before if self.macs_before else None
        out["params_ratio"] = self.params_after / self.params_before if self.params_before else None
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PAGCPReport:
        """The inverse of :meth:`to_dict`."""
        kw = {k: v for k, v in d.items() if k not in ("rounds", "macs_ratio", "params_ratio")}
        return cls(**kw, rounds=[RoundRecord.from_dict(r) for r in d["rounds"]])



def pagcp_markdown(report: Mapping[str, Any]) -> str:
    """A report section: per round, MACs and each task's loss ratio; per group, the ratio removed per round."""
    rounds = report.get("rounds", [])
    if not rounds:
        return "PAGCP ran no round."
    tasks = list(rounds[0]["reference_loss"])
    head = ["round", "λ", "MMACs after", "groups pruned", *(f"loss ratio {t}" for t in tasks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds:
        lines.append("| " + " | ".join([str(r["round"] + 1), f"{r['lam']:.4g}", f"{r['macs_after'] / 1e6:.2f}",
                                        str(len(r["removed"])), *(f"{r['loss_ratio'][t]:.4f}" for t in tasks)]) + " |")
    roots = sorted({root for r in rounds for root in r["ratios"]})
    table = ["| group | " + " | ".join(f"round {r['round'] + 1}" for r in rounds) + " |",
             "|---|" + "---|" * len(rounds)]
    for root in roots:
        table.append(f"| {root} | " + " | ".join(f"{r['ratios'][root]:.2f}" if root in r["ratios"] else "–"
                                                 for r in rounds) + " |")
    reached = report.get("reached")
    latency = report.get("latency")
    goal = report["target_macs"] if latency is None else ", ".join(f"{k}={v}" for k, v in latency["target"].items())
    target = "" if reached is None else f" (target {goal}: {'' if reached else 'NOT '}reached)"
    if latency is not None:
        target += f"; predicted latency {latency['dense_ms']:.4g} → {latency['predicted_ms']:.4g} ms"
    note = (f"Criterion {report['criterion']}; per-round loss budget {report['settings']['budget']} "
            f"(Π(1+θ_i), Ye et al. 2023), top-P {report['settings']['top_p']} ranked by "
            f"{report['settings'].get('ranking', 'worst_task')}; MMACs {report['macs_before'] / 1e6:.2f} → "
            f"{report['macs_after'] / 1e6:.2f}{target}. Loss ratios are on the held-out probe set, against each "
            "round's start.")
    return note + "\n\n" + "\n".join(lines) + "\n\nFraction of each group's channels removed per round:\n\n" + \
        "\n".join(table)
