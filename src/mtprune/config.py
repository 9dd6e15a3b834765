"""Run configuration: YAML files validated by pydantic; a bad key or value is named with the reason.

Configs are kept apart from code (Vandenhende et al., MTL-PyTorch). ``--set a.b=value`` overrides a key;
the value is parsed as YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .utils.errors import MTPruneInputError

# A config expanded through YAML aliases may hold at most this many values (a "billion laughs" alias bomb of a
# few hundred bytes would otherwise expand to billions when validated).
MAX_YAML_NODES = 100_000


class _YAMLRefused(yaml.YAMLError):
    """A YAML document refused by ``StrictLoader`` (duplicate key, too large once aliases are expanded)."""

    def __init__(self, problem: str, mark: Any = None) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate mapping keys and documents whose alias expansion exceeds
    ``MAX_YAML_NODES`` values."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: SafeLoader refuses it itself
                    continue
                if duplicate:
                    raise _YAMLRefused(f"duplicate key {_printable(str(key))!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the values of the document with every alias expanded (memoised per node, so it is fast)."""
    sizes: dict[int, int] = {}
    entered: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        if not done and id(node) in entered:
            raise _YAMLRefused("an alias refers to a value that contains it (a recursive structure)",
                               node.start_mark)
        entered.add(id(node))
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if done:
            sizes[id(node)] = min(1 + sum(sizes.get(id(c), 0) for c in children), MAX_YAML_NODES + 1)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    if sizes[id(root)] > MAX_YAML_NODES:
        raise _YAMLRefused(f"more than {MAX_YAML_NODES} values once its aliases are expanded (an alias bomb?)",
                           root.start_mark)


def yaml_load(text: str) -> Any:
    """Parse YAML text with ``StrictLoader`` (no Python tags, no duplicate keys, bounded alias expansion)."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except RecursionError:
        raise _YAMLRefused("nested too deeply") from None


class _Strict(BaseModel):
    # unknown keys are errors; so are NaN and infinite numbers (an ``lr: .inf`` would only fail hours later)
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class DataConfig(_Strict):
    name: str = "synthetic_scenes"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    augment: bool = True
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TasksConfig(_Strict):
    preset: str = "synthetic_scenes"
    names: list[str] | None = None  # a subset of the preset's tasks
    kwargs: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(_Strict):
    name: str = "deeplab_resnet18"
    width: float = Field(1.0, gt=0, le=8)
    head: str | None = None
    head_kwargs: dict[str, Any] = Field(default_factory=dict)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TrainSection(_Strict):
    epochs: int = Field(10, ge=0)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["none", "step", "cosine"] = "cosine"
    step_size: int = Field(30, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    weighting: Literal["equal", "fixed", "uncertainty", "dwa"] = "equal"
    weights: dict[str, float] | None = None  # for "fixed"
    dwa_temperature: float = Field(2.0, gt=0)
    amp: bool = True  # CUDA only
    grad_clip: float | None = Field(None, gt=0)
    num_workers: int = Field(0, ge=0)
    eval_batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _fixed_needs_weights(self) -> TrainSection:
        if self.weighting == "fixed" and not self.weights:
            raise ValueError("weighting 'fixed' needs 'weights' (task name -> weight)")
        return self


class PAGCPSection(_Strict):
    """PAGCP settings (Ye et al. 2023; ``mtprune.pruning.pagcp.PAGCPSettings``), used with ``allocator: pagcp``."""

    theta0: float | None = Field(None, gt=0)  # None: half the uniform per-layer allowance
    budget: float = Field(1.1, gt=1)  # Π(1 + θ_i) per round: the factor each task's loss may grow by
    probe_ratio: float = Field(0.3, gt=0, lt=1)
    ratios: list[float] | None = None  # trial ratios; default 0.05 … 0.95 in 19 steps
    top_p: float = Field(0.5, gt=0, le=1)
    ranking: Literal["worst_task", "total_loss"] = "worst_task"  # top-P; "total_loss": the authors' code
    rounds: int = Field(5, ge=1)
    held_out_batches: int = Field(4, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> PAGCPSection:
        if self.theta0 is not None and self.theta0 >= self.budget - 1:
            raise ValueError(f"theta0 must be below budget - 1 = {self.budget - 1:g}")
        r = self.ratios
        if r is not None and (not r or any(not 0 < x < 1 for x in r) or r != sorted(set(r))):
            raise ValueError("ratios must be increasing values in (0, 1)")
        return self


class PruneSection(_Strict):
    """How to compress: criterion, exactly one target, allocation, schedule, fine-tuning."""

    start: str | None = None  # a run directory (its best checkpoint) or a .mtp file; default: train it first
    criterion: str = "task_taylor"  # best multi-task criterion of the criteria benchmark (benchmarks/README.md)
    criterion_kwargs: dict[str, Any] = Field(default_factory=dict)
    target_macs: float | None = Field(None, gt=0, lt=1)
    target_params: float | None = Field(None, gt=0, lt=1)
    target_latency: float | None = Field(None, gt=0, lt=1)  # fraction of the dense latency (docs/latency.md)
    target_latency_ms: float | None = Field(None, gt=0)  # milliseconds on the device of `latency`
    latency: dict[str, Any] = Field(default_factory=dict)  # LatencySetting fields: device, threads, batch, dtype, …
    channel_ratio: float | None = Field(None, gt=0, lt=1)
    schedule: Literal["one_shot", "iterative", "interleaved"] = "iterative"
    steps: int = Field(3, ge=1)
    allocator: Literal["global", "layer", "pagcp"] = "global"
    pagcp: PAGCPSection = Field(default_factory=PAGCPSection)
    min_channels: int = Field(5, ge=1)
    round_to: int | dict[str, int] | Literal["auto", "measured"] = 1  # or per kind, or the device's blocking
    part_ratios: dict[str, float] = Field(default_factory=dict)
    # latency: near-ties by latency per MAC; left out of dumps at its default, so that the fingerprints of entries
    # (configs dumped whole) made before it existed stay valid
    rank_by: Literal["importance", "latency"] = Field("importance", exclude_if=lambda v: v == "importance")
    stats_batches: int | None = Field(None, ge=1)  # None: the criterion's stable_samples / stats_batch_size
    stats_batch_size: int = Field(8, ge=1)
    finetune: TrainSection = Field(default_factory=lambda: TrainSection(epochs=2, lr=5e-4))
    # interleaved schedule (Garg et al. 2023)
    interval: int = Field(500, ge=1)
    filters_per_step: int = Field(100, ge=0)  # 0: the control (no removal, same training)
    # a parameter budget per step instead (fraction of the starting parameters): criteria meet at equal parameter
    # counts; left out of dumps when unset (entry fingerprints, as rank_by)
    params_per_step: float | None = Field(None, gt=0, lt=1, exclude_if=lambda v: v is None)
    max_steps: int = Field(10, ge=1)
    retrain_from_scratch: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> PruneSection:
        given = [k for k in ("target_macs", "target_params", "target_latency", "target_latency_ms", "channel_ratio")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of target_macs, target_params, target_latency, target_latency_ms, "
                             f"channel_ratio (got {given or 'none'})")
        if isinstance(self.round_to, int) and self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")
        if self.rank_by == "latency" and (given[0] != "target_macs" or self.allocator != "global"
                                          or self.schedule == "interleaved"):
            raise ValueError("rank_by 'latency' needs target_macs, allocator 'global' and schedule 'one_shot' or "
                             "'iterative'")
        if given[0].startswith("target_latency") and self.schedule == "interleaved":
            raise ValueError("a latency target needs schedule 'one_shot' or 'iterative' (not 'interleaved')")
        if self.schedule != "one_shot" and self.channel_ratio is not None:
            raise ValueError(f"schedule {self.schedule!r} needs target_macs or target_params")
        if self.allocator == "pagcp" and (given[0] not in ("target_macs", "target_latency", "target_latency_ms")
                                          or self.schedule == "interleaved"):
            raise ValueError("allocator 'pagcp' needs target_macs, target_latency or target_latency_ms and runs its "
                             "own rounds (not 'interleaved')")
        return self


# --------------------------------------------------------------------------- sparsify (mtprune.sparsity)
SPARSIFY_METHODS = Literal["disparse_static", "disparse_pretrained", "disparse_dynamic", "snip", "random",
                           "magnitude", "imp", "rigl"]


class DynamicSection(_Strict):
    """Dynamic sparse training (DiSparse dynamic, RigL): mask updates every ``delta_t`` iterations until ``t_end``."""

    delta_t: int = Field(50, ge=1)
    t_end: int | None = Field(None, ge=1)  # None: 75 % of the training iterations
    alpha: float = Field(0.5, gt=0, le=1)  # drop fraction at the start, cosine-decayed to 0 at t_end
    erk_power: float = Field(1.0, gt=0, le=2)  # ERK ratio to this power: 1 as RigL; the released DiSparse code 0.9
    # DiSparse regrowth: "rank_union" exactly n per layer; "per_task_union" each task's top-n, united (released code)
    regrowth: Literal["rank_union", "per_task_union"] = "rank_union"


class SparsifySection(_Strict):
    """Unstructured sparsification (``mtprune sparsify``): method, overall target sparsity, scores, training."""

    start: str | None = None  # a run directory (its best checkpoint) or a .mtp file: the dense model
    method: SPARSIFY_METHODS = "disparse_static"
    sparsity: float = Field(0.9, gt=0, lt=1)  # overall, over every conv/linear weight (heads included)
    score: Literal["snip", "pretrained", "magnitude"] | None = None  # None: the method's own
    score_init: Literal["model", "xavier_normal"] = "model"  # disparse_static: "xavier_normal" as the released code
    batches: int = Field(50, ge=1)  # batches of statistics for the scores
    batch_size: int = Field(8, ge=1)  # of the statistics batches
    tolerance: float = Field(0.001, gt=0, lt=0.05)  # of the overall sparsity (DiSparse's keep-ratio search)
    rounds: int = Field(3, ge=1)  # imp
    round_steps: int = Field(200, ge=1)  # imp: training iterations per round
    rewind: bool | int = False  # imp: True rewinds survivors to initialisation (LTH), an int to that iteration
    dynamic: DynamicSection = Field(default_factory=DynamicSection)
    train: TrainSection | None = None  # the sparse network's (re)training or fine-tuning; None: the run's train

    @model_validator(mode="after")
    def _rewind(self) -> SparsifySection:
        if not isinstance(self.rewind, bool) and self.rewind < 0:
            raise ValueError("rewind must be true/false or an iteration ≥ 0")
        if self.score_init != "model" and self.method != "disparse_static":
            raise ValueError(f"score_init {self.score_init!r} applies to disparse_static only")
        return self


class RunConfig(_Strict):
    name: str = "run"
    seed: int = Field(0, ge=0, lt=2**32)
    device: str = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    prune: PruneSection | None = None
    sparsify: SparsifySection | None = None


def _printable(text: str) -> str:
    """``text`` with control characters escaped, so that an error stays on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = _printable(".".join(str(p) if str(p) else '""' for p in first["loc"])) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
    return f"{source}: config key '{key}': {_printable(msg)}{more}"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings; values are parsed as YAML (``lr=1e-3``, ``names=[seg,depth]``)."""
    if not isinstance(raw, dict):
        raise MTPruneInputError(f"the config's top level must be a mapping, got {type(raw).__name__}")
    for item in overrides:
        if "=" not in item:
            raise MTPruneInputError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MTPruneInputError(f"--set {item!r}: '{part}' is not a section")
        try:
            node[parts[-1]] = yaml_load(value)
        except yaml.YAMLError as err:
            problem = _printable(str(getattr(err, "problem", None) or type(err).__name__))
            raise MTPruneInputError(f"--set {item!r}: the value is not valid YAML ({problem})") from None
    return raw


def parse_config(raw: Any, source: str = "config", schema: type[BaseModel] = RunConfig) -> BaseModel:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MTPruneInputError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    try:
        cfg = schema.model_validate(raw)
    except ValidationError as err:
        raise MTPruneInputError(_format_error(err, source)) from None
    if isinstance(cfg, RunConfig):
        check_run_config(cfg, source)
    return cfg


def _kwargs_error(where: str, fn: Any, kwargs: dict[str, Any], err: Exception) -> str:
    import inspect

    try:
        accepted = [n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY
                    or p.kind is p.POSITIONAL_OR_KEYWORD]
    except (TypeError, ValueError):
        accepted = []
    unknown = sorted(set(kwargs) - set(accepted)) if accepted or not kwargs else []
    if isinstance(err, TypeError) and unknown:
        return f"config key '{where}.{unknown[0]}': unknown key (accepted: {', '.join(accepted) or 'none'})"
    return f"config key '{where}': {_printable((str(err).splitlines() or [type(err).__name__])[0])}"


def check_run_config(cfg: RunConfig, source: str = "config") -> None:
    """What the schema cannot see, checked before any work starts: the device, the task preset's keyword
    arguments, the pruning criterion and its arguments, and the parts that ``prune.part_ratios`` names."""
    from .utils.runtime import check_device

    try:
        check_device(cfg.device)
    except MTPruneInputError as err:
        raise MTPruneInputError(f"{source}: config key 'device': {err}") from None
    from .tasks.presets import PRESETS, preset

    tasks = None
    if cfg.tasks.preset in PRESETS:
        try:
            tasks = preset(cfg.tasks.preset, **cfg.tasks.kwargs)
        except (TypeError, ValueError) as err:
            msg = _kwargs_error("tasks.kwargs", PRESETS[cfg.tasks.preset], cfg.tasks.kwargs, err)
            raise MTPruneInputError(f"{source}: {msg}") from None
    p = cfg.prune
    if p is None:
        return
    from .pruning.criteria import CRITERIA, get_criterion

    if p.criterion not in CRITERIA:
        raise MTPruneInputError(f"{source}: config key 'prune.criterion': unknown criterion {p.criterion!r}; "
                                f"known: {', '.join(CRITERIA)}")
    try:
        get_criterion(p.criterion, seed=cfg.seed, **p.criterion_kwargs)
    except (TypeError, ValueError) as err:
        msg = _kwargs_error("prune.criterion_kwargs", CRITERIA[p.criterion], p.criterion_kwargs, err)
        raise MTPruneInputError(f"{source}: {msg}") from None
    bad = {k: v for k, v in p.part_ratios.items() if not 0 <= v < 1}
    if bad:
        raise MTPruneInputError(f"{source}: config key 'prune.part_ratios': fractions must be in [0, 1), got {bad}")
    if tasks is not None:
        parts = {"backbone", *(cfg.tasks.names or tasks)}
        unknown = sorted(set(p.part_ratios) - parts)
        if unknown:
            raise MTPruneInputError(f"{source}: config key 'prune.part_ratios.{unknown[0]}': not a part of the "
                                    f"model (parts: {', '.join(sorted(parts))})")
    if p.part_ratios and p.allocator == "pagcp":
        raise MTPruneInputError(f"{source}: config key 'prune.part_ratios': allocator 'pagcp' allocates per "
                                "layer itself; part_ratios do not apply")


def load_config(path: str | Path, overrides: list[str] | None = None, schema: type[BaseModel] = RunConfig):
    """Read, override and validate a YAML config file."""
    path = Path(path)
    if not path.is_file():
        raise MTPruneInputError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise MTPruneInputError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise MTPruneInputError(f"{path}: cannot read the config ({err.strerror or err})") from None
    try:
        raw = yaml_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = _printable(str(getattr(err, "problem", None) or err))
        if isinstance(err, _YAMLRefused):
            raise MTPruneInputError(f"{path}: refused YAML{at}: {problem}") from None
        raise MTPruneInputError(f"{path}: not valid YAML{at} ({err.__class__.__name__}: {problem})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise MTPruneInputError(f"{path}: the top level must be a mapping, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, str(path), schema)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
