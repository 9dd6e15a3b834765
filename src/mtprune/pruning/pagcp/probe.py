"""PAGCP's masked loss probe (Ye et al. 2023): each task's held-out loss with channels zeroed by forward hooks.

No surgery and no weight change: the planned channels are zeroed at the output of their groups' gates. What
trials cache (so that a trial is cheap):

- the held-out batches: drawn once, moved to the device once, reused by every trial of every round;
- upstream activations: the reference forward of each probed group records the outputs of the outermost module
  calls that finish before the first of the group's gates starts; in the trials those calls return a copy of
  the recorded output instead of recomputing (their inputs cannot depend on the masked channels). Recorded and
  replayed outputs are copies, so in-place operations downstream cannot corrupt the cache.

Masking after the gate (the producer's norm, else the producer) equals removal when the activation maps 0 to 0
(ReLU family) and the channel is not read before its gate; otherwise (e.g. GroupNorm statistics) the trial
approximates the removal.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ...engine.batch import unpack_batch
from ...utils.errors import MTPruneInputError
from ...utils.runtime import eval_mode
from ..graph import ChannelGroup
from ..stats import channel_dim

Losses = dict[str, float]


def _gate_channels(groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]]) -> dict[str, list[int]]:
    zero: dict[str, set[int]] = {}
    for gi, idxs in plan.items():
        g, drop = groups[gi], set(idxs)
        for gate in g.gates:
            zero.setdefault(gate, set()).update(g.out_maps[gate].locals_of(drop))
    return {n: sorted(c) for n, c in zero.items() if c}


@contextmanager
def masked(model: nn.Module, groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]]) -> Iterator[None]:
    """Zero the planned channels at the output of their groups' gates (forward hooks; weights untouched)."""
    modules = dict(model.named_modules())
    handles = []

    def hook_for(idx: list[int]):
        cache: dict[torch.device, Tensor] = {}

        def hook(module: nn.Module, args: Any, out: Any) -> Any:
            if not isinstance(out, Tensor):
                return out
            index = cache.get(out.device)
            if index is None:
                index = cache[out.device] = torch.tensor(idx, device=out.device)
            return out.index_fill(channel_dim(module, out), index, 0)  # the gate's own channel dimension

        return hook

    try:
        for name, idx in _gate_channels(groups, plan).items():
            handles.append(modules[name].register_forward_hook(hook_for(idx)))
        yield
    finally:
        for h in handles:
            h.remove()


def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(_copy(v) for v in value))
    if isinstance(value, list | tuple):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


Store = dict[str, dict[int, Any]]  # module name → {call index within one forward: recorded output}


class UpstreamCache:
    """Record, in one forward, the outputs of the outermost module calls that finish before any of a set of
    modules starts; replay them in later forwards instead of recomputing.

    A call that ends before the first probed gate starts cannot depend on the gate's mask, so its output is the
    same in every trial of that gate. Calls are keyed by (module, call index), so a module called several times
    in a forward (a shared ReLU) is replayed only for the calls that were recorded.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = {n: m for n, m in model.named_modules() if n}

    @contextmanager
    def recording(self, stop_at: set[str]) -> Iterator[Store]:
        store: Store = {}
        counts: dict[str, int] = {}
        open_calls: list[tuple[str, int]] = []
        frames: list[list[tuple[str, int, Any]]] = [[]]  # per open call: its completed child calls
        hit = [False]

        def pre(name: str):
            def hook(module: nn.Module, args: Any) -> None:
                if hit[0]:
                    return
                if name in stop_at:
                    hit[0] = True
                    for frame in frames:
                        for n, i, out in frame:
                            store.setdefault(n, {})[i] = out
                    return
                idx = counts.get(name, 0)
                counts[name] = idx + 1
                open_calls.append((name, idx))
                frames.append([])

            return hook

        def post(name: str):
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                if hit[0] or not open_calls or open_calls[-1][0] != name:
                    return
                _, idx = open_calls.pop()
                frames.pop()  # the children are subsumed by this call
                frames[-1].append((name, idx, _copy(out)))

            return hook

        handles = []
        try:
            for name, module in self.modules.items():
                handles.append(module.register_forward_pre_hook(pre(name), prepend=True))
                handles.append(module.register_forward_hook(post(name), prepend=True))
            yield store
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replaying(self, store: Store) -> Iterator[None]:
        patched: list[tuple[nn.Module, Any]] = []

        def replay(outs: dict[int, Any], forward: Callable) -> Callable:
            calls = [0]

            def fn(*args: Any, **kwargs: Any) -> Any:
                i = calls[0]
                calls[0] += 1
                return _copy(outs[i]) if i in outs else forward(*args, **kwargs)

            return fn

        try:
            for name, outs in store.items():
                module = self.modules[name]
                own = module.__dict__.get("forward")
                module.forward = replay(outs, own if own is not None else module.forward)
                patched.append((module, own))
            yield
        finally:
            for module, own in patched:
                if own is None:
                    del module.forward
                else:
                    module.forward = own


# ---------------------------------------------------------------- losses on the held-out set
class LossProbe:
    """Each task's mean loss on fixed held-out batches under channel masks (eval mode, no_grad; every module's
    ``training`` flag is restored afterwards, so BatchNorm statistics never move).

    The batches are taken once (the first ``held_out_batches`` of ``data``) and kept on the model's device.
    """

    def __init__(self, model: nn.Module, data: Iterable, losses: Mapping[str, Callable], batches: int,
                 cache: bool = True) -> None:
        self.model = model
        self.losses = {t: getattr(fn, "loss", fn) for t, fn in losses.items()}
        device = next(model.parameters()).device
        self.batches: list[tuple[Tensor, dict[str, Tensor]]] = []
        for i, batch in enumerate(data):
            if i >= batches:
                break
            self.batches.append(unpack_batch(batch, list(self.losses), device))
        if not self.batches:
            raise MTPruneInputError("pagcp: the held-out data is empty")
        self.cache = UpstreamCache(model) if cache else None
        self.forwards = 0

    def refresh(self) -> None:
        """Re-read the model's modules (after physical pruning or fine-tuning)."""
        if self.cache is not None:
            self.cache = UpstreamCache(self.model)

    def _run(self, images: Tensor, targets: Mapping[str, Tensor], sums: dict[str, float]) -> None:
        out = self.model(images)
        if not isinstance(out, Mapping):
            raise MTPruneInputError(f"the model must return dict[str, Tensor], got {type(out).__name__}")
        missing = sorted(set(self.losses) - set(out))
        if missing:
            raise MTPruneInputError(f"losses given for tasks the model does not output: {missing}")
        n = images.shape[0]
        for t, fn in self.losses.items():
            value = float(fn(out[t].float(), targets[t]))
            sums[t] += (value if math.isfinite(value) else math.inf) * n
        self.forwards += 1

    def losses_under(self, groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]],
                     stores: list[Store] | None = None) -> Losses:
        """Mean task losses with ``plan`` masked; ``stores`` (from :meth:`reference`) replays upstream calls."""
        sums = dict.fromkeys(self.losses, 0.0)
        count = 0
        with torch.no_grad(), eval_mode(self.model), masked(self.model, groups, plan):
            for b, (images, targets) in enumerate(self.batches):
                if stores is not None and self.cache is not None and stores[b]:
                    with self.cache.replaying(stores[b]):
                        self._run(images, targets, sums)
                else:
                    self._run(images, targets, sums)
                count += images.shape[0]
        return {t: s / count for t, s in sums.items()}

    def reference(self, groups: Sequence[ChannelGroup], plan: Mapping[int, Iterable[int]],
                  stop_at: set[str]) -> tuple[Losses, list[Store] | None]:
        """Losses with ``plan`` masked, recording (when caching) what finishes before ``stop_at`` starts."""
        if self.cache is None:
            return self.losses_under(groups, plan), None
        sums = dict.fromkeys(self.losses, 0.0)
        count, stores = 0, []
        with torch.no_grad(), eval_mode(self.model), masked(self.model, groups, plan):
            for images, targets in self.batches:
                with self.cache.recording(stop_at) as store:
                    self._run(images, targets, sums)
                stores.append(store)
                count += images.shape[0]
        return {t: s / count for t, s in sums.items()}, stores


def check_reference(losses: Losses) -> None:
    bad = {t: v for t, v in losses.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise MTPruneInputError(f"pagcp constrains loss ratios: every task's held-out loss must be finite and > 0, "
                                f"got {bad}")

