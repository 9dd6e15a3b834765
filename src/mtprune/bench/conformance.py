"""Suite ``conformance``: every criterion on every model of the conformance list (issue 14).

For each torchvision/timm model of ``models/zoo_wrap.py`` (wrapped with two task heads, tiny input):

1. **Does Torch-Pruning prune it?** ``MetaPruner`` with ``GroupMagnitudeImportance`` at a 30 % channel ratio
   (``pruning.graph.torch_pruning_magnitude``; for timm attention its own ViT recipe, ``num_heads`` per ``qkv``),
   both heads' output layers ignored; it prunes the model when the pruned forward runs with finite outputs of
   unchanged shapes and fewer parameters (Fang et al., DepGraph, CVPR 2023). At ``--scale cpu`` it runs in a
   child process under a memory limit and a timeout (Torch-Pruning's index maps through window attention grew
   past 16 GB in the issue's measurements); a killed child counts as "does not prune".
2. **Does mtprune prune it, with every registered criterion?** ``mtprune.prune`` to ``target_macs=0.5``
   (``min_channels=2``; gradient criteria get ``BATCHES`` batches of 2 with random targets), then: the forward
   runs with finite outputs of unchanged shapes, ``save`` to ``.mtp`` and ``load(base=)`` give outputs equal
   within 1e-5, and ``profile`` reports both tasks. Each (model, criterion) ends as ``ok`` (MACs kept, counted
   by ``profile``), ``refused`` (the one ``MTPruneInputError`` line, and whether the model was left unchanged)
   or ``error`` (the stage and the exception's first line).

Every entry is resumable (``--resume``). Results: ``benchmarks/results/conformance/results.{json,md}``. The
seconds recorded are wall-clock on whatever load the machine had: not timing figures.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..models.zoo_wrap import TIMM, TORCHVISION, TORCHVISION_REFUSED, ZooCase, build, synthetic_data
from ..utils.atomic import atomic_write_json, atomic_write_text
from ..utils.errors import MTPruneInputError
from .common import Entries, fingerprint, machine, results_dir

TARGET = 0.5  # target_macs of every mtprune entry
TP_RATIO = 0.3  # Torch-Pruning's channel ratio (about half the MACs on these models)
BATCHES = 2  # batches of synthetic targets for the gradient criteria
MIN_CHANNELS = 2
ATOL = 1e-5  # save/load round trip
TP_MEMORY_GB, TP_TIMEOUT_S = 8, 900  # the child process that runs Torch-Pruning (isolated scales)
SCHEMA = 1  # bump when an entry's meaning changes: stored entries are then recomputed
SMALL_MODELS = ("torchvision/resnet18", "torchvision/vit (2 layers, width 32, 4 heads)",
                "torchvision/shufflenet_v2_x0_5")
SETTINGS = {  # scale -> models (None: all), criteria (None: every registered one), run Torch-Pruning in a child
    "small": {"models": SMALL_MODELS, "criteria": ("l1", "task_taylor"), "isolate": False},
    "cpu": {"models": None, "criteria": None, "isolate": True},
    "gpu": {"models": None, "criteria": None, "isolate": True},
}


def all_models() -> dict[str, ZooCase]:
    """``source/name`` -> case, over the torchvision (pruned and refused) and timm lists, without duplicates."""
    out: dict[str, ZooCase] = {}
    for name, case in {**TORCHVISION, **TORCHVISION_REFUSED, **TIMM}.items():
        key = f"{case.source}/{name.removeprefix('tv_')}"
        out.setdefault(key, case)
    return out


def _line(err: BaseException) -> str:
    if isinstance(err, MemoryError):
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        return "MemoryError: out of memory" + (f" (limit {limit / 2**30:.0f} GB)" if limit > 0 else "")
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"[:300]


class _Failed(Exception):
    """A check after pruning failed: ``stage`` names it."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def _stage(stage: str, fn):
    try:
        return fn()
    except _Failed:
        raise
    except Exception as err:  # noqa: BLE001 - every failure is recorded, with its stage
        raise _Failed(stage, _line(err)) from err


def _outputs_ok(model: torch.nn.Module, x: torch.Tensor, shapes: dict) -> dict:
    with torch.no_grad():
        out = model(x)
    got = {k: tuple(v.shape) for k, v in out.items()}
    if got != shapes:
        raise _Failed("forward", f"output shapes changed: {got} instead of {shapes}")
    if not all(torch.isfinite(v).all() for v in out.values()):
        raise _Failed("forward", "non-finite outputs")
    return out


# ---------------------------------------------------------------- Torch-Pruning on its own
def _tp_torchvision_vit(model: torch.nn.Module, x: torch.Tensor, vit: torch.nn.Module) -> None:
    """Torch-Pruning's recipe for torchvision's ``VisionTransformer`` (its ``tests/test_torchvision_models.py``):
    widths rounded to the number of heads, ``class_token`` and ``pos_embedding`` pruned along the embedding,
    the attention output projections ignored, and ``hidden_dim`` read back from ``conv_proj`` afterwards."""
    import torch_pruning as tp

    ignored = [model.heads.a, model.heads.b]
    ignored += [m.out_proj for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=TP_RATIO,
        ignored_layers=ignored, round_to=vit.encoder.layers[0].num_heads,
        unwrapped_parameters=[(vit.class_token, 2), (vit.encoder.pos_embedding, 2)],
        forward_fn=lambda m, inputs: m(inputs))
    pruner.step()
    vit.hidden_dim = vit.conv_proj.out_channels


def _tp_prune(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Torch-Pruning as its user would run it: ``MetaPruner`` with magnitude importance, both heads ignored; timm
    attention by its ViT recipe (``pruning.graph.torch_pruning_magnitude``), torchvision ViT by its own."""
    from torchvision.models import VisionTransformer

    from ..pruning.graph import torch_pruning_magnitude

    vit = next((m for m in model.modules() if isinstance(m, VisionTransformer)), None)
    if vit is not None:
        _tp_torchvision_vit(model, x, vit)
    else:
        torch_pruning_magnitude(model, x, TP_RATIO, ["heads.a", "heads.b"], heads=True)


def tp_check(key: str) -> dict:
    """Whether Torch-Pruning's MetaPruner (magnitude importance, 30 % of channels) prunes ``key``'s model."""
    from ..pruning.prune import count

    model, x = build(all_models()[key])
    with torch.no_grad():
        shapes = {k: tuple(v.shape) for k, v in model(x).items()}
    params0 = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    try:
        _stage("prune", lambda: _tp_prune(model, x[:1]))
        _stage("forward", lambda: _outputs_ok(model, x, shapes))
        params1 = sum(p.numel() for p in model.parameters())
        if params1 >= params0:
            raise _Failed("prune", "no parameter was removed")
    except _Failed as err:
        return {"prunes": False, "stage": err.stage, "message": str(err)}
    seconds = time.perf_counter() - start
    try:
        macs0 = count(build(all_models()[key])[0], x[:1])[1]
        macs_kept = count(model, x[:1])[1] / macs0
    except Exception:  # noqa: BLE001 - MACs are informative only
        macs_kept = None
    return {"prunes": True, "params_kept": params1 / params0, "macs_kept": macs_kept, "seconds": seconds}


def _limit_memory() -> None:
    limit = TP_MEMORY_GB << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def tp_check_isolated(key: str, threads: int) -> dict:
    """``tp_check`` in a child process with ``TP_MEMORY_GB`` of address space and ``TP_TIMEOUT_S`` seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    try:
        done = subprocess.run([sys.executable, "-m", __name__, key], capture_output=True, text=True, env=env,
                              timeout=TP_TIMEOUT_S, preexec_fn=_limit_memory, check=False)
    except subprocess.TimeoutExpired:
        return {"prunes": False, "stage": "prune", "message": f"did not finish in {TP_TIMEOUT_S} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    if "MemoryError" in done.stderr or "std::bad_alloc" in done.stderr or done.returncode in (-9, 137):
        tail = f"ran out of its {TP_MEMORY_GB} GB memory limit ({tail})"
    return {"prunes": False, "stage": "prune", "message": tail[:300]}


# ---------------------------------------------------------------- mtprune with one criterion
def prune_check(key: str, criterion: str) -> dict:
    """Prune ``key``'s model with ``criterion`` to ``TARGET`` MACs, run it, round-trip it through ``.mtp`` and
    profile it. Returns the outcome (``ok`` / ``refused`` / ``error``) and what was measured."""
    from ..io import load, save
    from ..measure import profile
    from ..pruning.prune import prune

    case = all_models()[key]
    model, x = build(case)
    with torch.no_grad():
        shapes = {k: tuple(v.shape) for k, v in model(x).items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data, losses = synthetic_data(model, x, batches=BATCHES)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = prune(model, x[:1], criterion, target_macs=TARGET, data=data, losses=losses, batches=BATCHES,
                           min_channels=MIN_CHANNELS)
        except MTPruneInputError as err:
            state = model.state_dict()
            unchanged = state.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in state.items())
            return {"outcome": "refused", "message": str(err), "one_line": "\n" not in str(err),
                    "unchanged": unchanged, "seconds": time.perf_counter() - start}
        except Exception as err:  # noqa: BLE001
            return {"outcome": "error", "stage": "prune", "message": _line(err),
                    "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    notes = sorted({str(w.message).splitlines()[0] for w in caught})
    try:
        out = _stage("forward", lambda: _outputs_ok(model, x, shapes))
        with tempfile.TemporaryDirectory() as tmp:
            path = _stage("save", lambda: save(model, Path(tmp) / "m.mtp", example_inputs=x[:1]))
            loaded = _stage("load", lambda: load(path, base=build(case)[0]).eval())
        again = _stage("load", lambda: _outputs_ok(loaded, x, shapes))
        diff = max(float((again[k] - out[k]).abs().max()) for k in out)
        if not diff <= ATOL:
            raise _Failed("load", f"outputs differ by {diff:.3g} after save/load (tolerance {ATOL})")
        prof = _stage("profile", lambda: profile(loaded, x[:1], latency=False))
        dense = _stage("profile", lambda: profile(build(case)[0], x[:1], latency=False))
        if not {"a", "b"} <= set(prof.macs_per_subset):
            raise _Failed("profile", f"tasks missing from the profile: {sorted(prof.macs_per_subset)}")
    except _Failed as err:
        return {"outcome": "error", "stage": err.stage, "message": str(err), "seconds": seconds, "notes": notes}
    return {"outcome": "ok", "macs_kept": prof.macs / dense.macs, "params_kept": prof.params / dense.params,
            "report_macs_kept": report.macs_after / report.macs_before, "load_max_diff": diff,
            "seconds": seconds, "notes": notes}


# ---------------------------------------------------------------- the suite
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "torchvision", "timm", "torch-pruning"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def run(scale: str = "small", out=None, threads: int | None = 1, resume: bool = False, **_) -> dict:
    from ..pruning.criteria import CRITERIA

    if scale not in SETTINGS:
        raise MTPruneInputError(f"bench conformance: unknown scale {scale!r}; known: {', '.join(SETTINGS)}")
    s = SETTINGS[scale]
    if threads:
        torch.set_num_threads(threads)
    folder = results_dir("conformance", out)
    entries = Entries(folder, resume=resume)
    models = all_models()
    keys = list(s["models"] or models)
    criteria = list(s["criteria"] or CRITERIA)
    versions = _versions()
    tp, grid = {}, {}
    for key in keys:
        fp = fingerprint(SCHEMA, key, TP_RATIO, versions)
        run_tp = (lambda k=key: tp_check_isolated(k, threads or 1)) if s["isolate"] else (lambda k=key: tp_check(k))
        tp[key] = entries.get(f"tp-{key}", run_tp, fp)
        print(f"conformance: {key}: Torch-Pruning {'prunes' if tp[key]['prunes'] else 'does not prune'}",
              flush=True)
        for crit in criteria:
            fp = fingerprint(SCHEMA, key, crit, TARGET, BATCHES, MIN_CHANNELS, versions)
            grid[(key, crit)] = entries.get(f"{key}-{crit}", lambda k=key, c=crit: prune_check(k, c), fp)
            print(f"conformance: {key} {crit}: {grid[(key, crit)]['outcome']}", flush=True)
    command = f"OMP_NUM_THREADS={threads or 1} mtprune bench conformance --scale {scale} --threads {threads or 1}"
    result = {
        "suite": "conformance", "scale": scale, "machine": machine(), "versions": versions, "command": command,
        "settings": {"target_macs": TARGET, "tp_ratio": TP_RATIO, "batches": BATCHES, "min_channels": MIN_CHANNELS,
                     "atol": ATOL, "criteria": criteria},
        "models": {k: {"torch_pruning": tp[k], "criteria": {c: grid[(k, c)] for c in criteria}} for k in keys},
        "summary": summary(tp, grid, keys, criteria),
    }
    atomic_write_json(folder / "results.json", result)
    atomic_write_text(folder / "results.md", markdown(result))
    return result


def _clean(r: dict) -> bool:
    """Pruned, or refused in one line with the model unchanged."""
    return r["outcome"] == "ok" or (r["outcome"] == "refused" and r["one_line"] and r["unchanged"])


def summary(tp: dict, grid: dict, keys: list[str], criteria: list[str]) -> dict:
    """Counts: models Torch-Pruning prunes, and of those the ones every criterion prunes here."""
    tp_prunes = [k for k in keys if tp[k]["prunes"]]
    all_ok = [k for k in keys if all(grid[(k, c)]["outcome"] == "ok" for c in criteria)]
    return {
        "models": len(keys), "criteria": len(criteria),
        "tp_prunes": len(tp_prunes),
        "tp_prunes_and_every_criterion_ok": len([k for k in tp_prunes if k in all_ok]),
        "tp_prunes_not_every_criterion_ok": [k for k in tp_prunes if k not in all_ok],
        "tp_prunes_no_failure": len([k for k in tp_prunes if all(_clean(grid[(k, c)]) for c in criteria)]),
        "only_mtprune_prunes": [k for k in all_ok if k not in tp_prunes],
        "errors": [f"{k} {c}" for (k, c), r in grid.items() if r["outcome"] == "error"],
        "refusals_not_one_line_or_changed": [f"{k} {c}" for (k, c), r in grid.items()
                                             if r["outcome"] == "refused" and not (r["one_line"] and r["unchanged"])],
    }


def _cell(r: dict, notes: dict[str, str]) -> str:
    if r["outcome"] == "ok":
        missed = any("was not reached" in n for n in r.get("notes", ()))
        return f"✓ {r['macs_kept']:.2f}" + ("*" if missed else "")
    text = r["message"] if r["outcome"] == "refused" else f"{r['stage']}: {r['message']}"
    prefix = "R" if r["outcome"] == "refused" else "E"
    ids = [k for k, v in notes.items() if v == text and k.startswith(prefix)]
    if not ids:
        ids = [f"{prefix}{sum(k.startswith(prefix) for k in notes) + 1}"]
        notes[ids[0]] = text
    return f"refused ({ids[0]})" if prefix == "R" else f"✗ ({ids[0]})"


def markdown(result: dict) -> str:
    """The model × criterion table, the refusal and error lines it refers to, and the counts."""
    criteria = result["settings"]["criteria"]
    sm = result["summary"]
    notes: dict[str, str] = {}
    lines = [
        "# Conformance: every criterion on every model of the conformance list", "",
        f"Made by `{result['command']} --resume` ({result['machine']['date']}; "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ").", "",
        f"Each model is wrapped with two task heads (`mtprune.models.zoo_wrap`) at tiny input and pruned to "
        f"`target_macs={result['settings']['target_macs']}` (`min_channels={result['settings']['min_channels']}`, "
        f"{result['settings']['batches']} batches of random targets for gradient criteria); ✓ means the forward "
        f"runs with the heads' output shapes unchanged, `save`/`load(base=)` reproduces the outputs within "
        f"{result['settings']['atol']:g} and `profile` works, and the number is the MACs kept (counted by "
        f"`profile`). *TP* is Torch-Pruning's own `MetaPruner` (magnitude importance, "
        f"{result['settings']['tp_ratio']:.0%} of channels, its ViT recipe for timm attention): ✓ when its pruned "
        "model runs with unchanged output shapes. Refusals (R) are one `MTPruneInputError` line with the model "
        "unchanged; errors (✗, E) are failures. `*`: `prune` warned that the target was not reached "
        "(`min_channels`, whole attention heads and protected layers limit the removal on these tiny models).", "",
        f"**{sm['tp_prunes_and_every_criterion_ok']} of {sm['tp_prunes']} models TP prunes are pruned here with "
        f"every criterion** ({sm['criteria']} criteria; {sm['models']} models in all); with every criterion "
        f"{sm['tp_prunes_no_failure']} of {sm['tp_prunes']} are pruned or refused in one line with the model "
        "unchanged (no error).", "",
    ]
    if sm["tp_prunes_not_every_criterion_ok"]:
        lines += ["TP prunes, but not every criterion here: "
                  + ", ".join(f"`{k}`" for k in sm["tp_prunes_not_every_criterion_ok"]) + ".", ""]
    if sm["only_mtprune_prunes"]:
        lines += ["Pruned here with every criterion, but not by TP: "
                  + ", ".join(f"`{k}`" for k in sm["only_mtprune_prunes"]) + ".", ""]
    lines += ["| model | TP | " + " | ".join(criteria) + " |", "|---|---|" + "---|" * len(criteria)]
    tp_notes: dict[str, str] = {}
    for key, row in result["models"].items():
        tp = row["torch_pruning"]
        if tp["prunes"]:
            tp_cell = "✓"
        else:
            text = f"{tp['stage']}: {tp['message']}"
            tid = next((k for k, v in tp_notes.items() if v == text), f"T{len(tp_notes) + 1}")
            tp_notes[tid] = text
            tp_cell = f"✗ ({tid})"
        cells = [_cell(row["criteria"][c], notes) for c in criteria]
        lines.append(f"| `{key}` | {tp_cell} | " + " | ".join(cells) + " |")
    for title, group in (("Refusals", "R"), ("Errors", "E")):
        items = [(k, v) for k, v in notes.items() if k.startswith(group)]
        if items:
            lines += ["", f"**{title}**", ""] + [f"- {k}: {v}" for k, v in items]
    if tp_notes:
        lines += ["", "**Why TP does not prune**", ""] + [f"- {k}: {v}" for k, v in tp_notes.items()]
    lines += ["", "Seconds per entry are in `results.json` (wall-clock on a loaded machine: not timing figures).", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # the isolated Torch-Pruning check: python -m mtprune.bench.conformance MODEL_KEY
    print(json.dumps(tp_check(sys.argv[1])))
