"""Recipes: typed dataclasses, safe YAML loading, dotted command-line overrides, validation at load.

A recipe is a YAML mapping whose sections mirror ``Config``. Every value is checked once here, so
code below this module trusts typed values: an unknown key, a wrong type or an impossible value is a
``UserError`` naming the key and what is allowed, raised before any data is read or compute runs.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .attacks import AA_VERSIONS, NORMS, TRAINING_ATTACKS
from .data import AUGMENTATIONS, DATASETS, STREAMING_DATASETS, TWO_VIEW_AUGMENTATIONS
from .errors import UserError, did_you_mean
from .logging import WANDB_MODES
from .methods import METHODS, MethodOptions, get_method
from .models import check_options, create_model, enable_activation_checkpointing, list_models, use_ghost_batchnorm


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    root: str = ""  # "" = $ADVGKL_DATA or ~/.cache/advgkl/data
    subset: int = 0  # first-class knob: train on this many samples (0 = all)
    val_size: int = 0  # held out from the training set for checkpoint selection, never the test set
    augment: str = "none"
    batch_size: int = 128
    generated: str = ""  # .npz with `image` and `label` arrays, mixed into every batch
    generated_ratio: float = 0.0
    image_size: int = 32  # imagefolder and imagenet: images are resized / cropped to this side length
    workers: int = 0  # imagenet only: DataLoader worker processes decoding images (0: in the training process)


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    kwargs: typing.Dict[str, typing.Any] = field(default_factory=dict)  # to the model's constructor
    activation_checkpointing: bool = False  # recompute residual blocks' activations in backward (less memory)
    # BatchNorm statistics over shards of this many rows in train mode (0: the whole batch); 32 at batch 128
    # is what 4-GPU DataParallel computed for the released GKL models (docs/fidelity.md, row 9)
    ghost_batch: int = 0


def _default_method() -> MethodOptions:
    return METHODS["gkl_at"].Options(name="gkl_at")


@dataclass
class AttackConfig:
    """The training-time attack (evaluation uses AutoAttack, configured under ``eval``)."""

    name: str = "pgd"  # advgkl.attacks.TRAINING_ATTACKS
    norm: str = "Linf"
    eps: float = 0.1
    steps: int = 5
    step_size: float = 0.0  # 0 = the method's default (advgkl.methods), else the attack's own
    eps_schedule: str = "constant"  # linear: eps_t = eps * epoch / epochs (GKL-AT recipe)
    random_start: str = "auto"  # auto = the method's default (advgkl.methods)


@dataclass
class OptimConfig:
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    epochs: int = 10
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: typing.List[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs
    step_gamma: float = 0.1
    grad_clip: float = 0.0  # clip the global gradient norm to this before each step (0: off)
    accumulate: int = 1  # micro-batches per optimiser step: the batch's activations in k parts (docs/memory.md)


@dataclass
class AWPConfig:
    enabled: bool = False
    gamma: float = 0.005
    warmup_epochs: int = 10


@dataclass
class EMAConfig:
    """every: step = an EMA over optimiser steps; epoch = over the end-of-epoch weights, BatchNorm buffers
    included (the released GKL models' averaging, docs/fidelity.md row 1). Weights before start_epoch
    (0-based) are tracked, not averaged: with every=epoch the average starts from epoch start_epoch's
    end-of-epoch weights and averages in every later epoch, like the official ``swa.py TAU START``."""

    enabled: bool = False
    decay: float = 0.9996
    start_epoch: int = 0
    every: str = "step"


@dataclass
class EvalConfig:
    n_examples: int = 1000  # AutoAttack test points (first N of the test set); 0 = all
    version: str = "standard"
    attacks: typing.List[str] = field(default_factory=list)  # version: custom only
    eps: float = 0.0  # 0 = the training eps
    batch_size: int = 500
    val_pgd_steps: int = 10
    val_every: int = 1
    evaluate_best: bool = False  # also AutoAttack the best-validation checkpoint
    honesty_checks: bool = True  # gradient-masking checks after every evaluation (advgkl.honesty)
    honesty_pgd_steps: int = 20


@dataclass
class LoggingConfig:
    wandb: str = "offline"
    project: str = "advgkl"
    group: str = ""
    tags: typing.List[str] = field(default_factory=list)
    progress: bool = True


@dataclass
class RuntimeConfig:
    device: str = "auto"
    amp: str = "auto"  # auto = bf16 on CUDA, off on CPU
    compile: bool = False
    channels_last: str = "auto"  # auto = on for CUDA and CPU
    seed: int = 0
    deterministic: bool = False
    threads: int = 0  # torch CPU threads, 0 = torch default
    checkpoint_every: int = 1  # epochs
    checkpoint_every_steps: int = 0  # also mid-epoch, for long epochs (0 = off)
    resume: str = "never"
    sync_bn: bool = False  # under torchrun: BatchNorm statistics over the global batch (CUDA only)
    dist_timeout_s: int = 1800  # under torchrun: a collective waiting longer (dead or hung rank) ends the job


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodOptions = field(default_factory=_default_method)  # its fields depend on method.name
    attack: AttackConfig = field(default_factory=AttackConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    awp: AWPConfig = field(default_factory=AWPConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Allowed values of the enumerated string fields that no registry holds.
CHOICES = {
    "attack.eps_schedule": ("constant", "linear"),
    "ema.every": ("step", "epoch"),
    "attack.random_start": ("auto", "uniform", "normal", "none"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("constant", "cosine", "step", "onecycle"),
    # no fp16: it needs loss scaling (loss, AWP's proxy, the attack's input gradients); bf16 does not
    "runtime.amp": ("auto", "none", "bf16"),
    "runtime.channels_last": ("auto", "on", "off"),
    "runtime.resume": ("never", "auto"),
}


def choices() -> dict[str, tuple]:
    """Allowed values of every enumerated string field, read from the registries when called, so that a
    model, method or training attack registered after this import is a valid choice."""
    return {
        "data.dataset": tuple(sorted(DATASETS)),
        "data.augment": AUGMENTATIONS,
        "model.name": tuple(list_models()),
        "method.name": tuple(METHODS),
        "attack.name": tuple(TRAINING_ATTACKS),
        "attack.norm": NORMS,
        "eval.version": (*AA_VERSIONS, "none"),
        "logging.wandb": WANDB_MODES,
        **CHOICES,
    }


NON_NEGATIVE = {  # the method's own options check themselves (advgkl.methods)
    "data.subset", "data.val_size", "data.generated_ratio", "data.workers", "model.ghost_batch",
    "attack.eps", "attack.steps", "attack.step_size", "optim.lr",
    "optim.momentum", "optim.weight_decay", "optim.grad_clip", "optim.warmup_epochs", "awp.gamma",
    "awp.warmup_epochs", "ema.start_epoch", "eval.n_examples", "eval.eps", "runtime.seed", "runtime.threads",
    "runtime.checkpoint_every_steps",
}
POSITIVE = {
    "data.batch_size", "data.image_size",
    "optim.epochs", "optim.accumulate", "eval.batch_size", "eval.val_pgd_steps", "eval.val_every", "eval.honesty_pgd_steps",
    "runtime.checkpoint_every", "runtime.dist_timeout_s",
}
MAX_EPOCHS = 100_000  # a typo guard (1e11 trains forever), far above any published schedule
_EXPONENT = re.compile(r"^\s*[-+]?\d+(\.\d*)?[eE][-+]?\d+\s*$")
_FRACTION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def _coerce(key: str, value, typ):
    """Check ``value`` against the field type; accept ints for floats and 'a/b' for floats (8/255)."""
    origin = typing.get_origin(typ)
    if origin is dict:  # model.kwargs: names to YAML scalars or lists; the model checks the names
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UserError(f"{key}: expected a mapping of option names to values, got {value!r}")
        return dict(value)
    if origin in (list, typing.List):
        (item,) = typing.get_args(typ)
        if not isinstance(value, list):
            raise UserError(f"{key}: expected a list of {item.__name__}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _FRACTION.match(value):
            num, den = map(float, _FRACTION.match(value).groups())
            if den == 0:
                raise UserError(f"{key}: division by zero in {value!r}")
            number = num / den
        elif isinstance(value, str) and _EXPONENT.match(value):  # PyYAML reads 5e-4 (no dot) as a string
            number = float(value)
        if number is not None:
            if not math.isfinite(number):  # NaN passes every range check below: refuse it here
                raise UserError(f"{key}: must be a finite number, got {value!r}")
            return number
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool) and {"on", "off"} <= set(CHOICES.get(key, ())):  # YAML 1.1 reads on/off as bools
            return "on" if value else "off"
    raise UserError(f"{key}: expected {typ.__name__}, got {type(value).__name__} {value!r}")


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"{prefix or 'recipe'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known, key=str)
    if unknown:
        where = f"method {raw.get('name', 'gkl_at')}" if issubclass(cls, MethodOptions) else prefix or "top level"
        raise UserError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; "
                        f"allowed keys: {', '.join(sorted(known))}{did_you_mean(unknown[0], known)}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        typ = hints[name]
        if typ is MethodOptions and isinstance(value, (dict, type(None))):  # options of method.name's class
            value = {"name": "gkl_at", **(value or {})}
            typ = get_method(_coerce(f"{key}.name", value["name"], str)).Options
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value if value is not None else {}, key)
        else:
            kwargs[name] = _coerce(key, value, typ)
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    flat = _flatten(cfg.to_dict())
    for key, allowed in choices().items():
        if flat[key] not in allowed:
            raise UserError(f"{key}: {flat[key]!r} is not one of {', '.join(allowed)}"
                            f"{did_you_mean(flat[key], allowed)}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise UserError(f"{key}: must be >= 0, got {flat[key]}")
    for key in POSITIVE:
        if flat[key] <= 0:
            raise UserError(f"{key}: must be > 0, got {flat[key]}")
    cfg.method.check()
    _validate_relations(cfg)


def _validate_new_recipe(cfg: Config) -> None:
    """Rules for a job about to start, not for a config read back from a checkpoint (``from_saved``): a
    run this code trained and saved before the rule existed must stay loadable and evaluable."""
    if cfg.optim.lr <= 0:
        raise UserError(f"optim.lr: must be > 0, got {cfg.optim.lr}")
    if cfg.optim.epochs > MAX_EPOCHS:
        raise UserError(f"optim.epochs: must be <= {MAX_EPOCHS}, got {cfg.optim.epochs}")
    if cfg.attack.norm == "Linf":  # pixels lie in [0, 1]: a larger L-inf radius allows any image at all
        for key, eps in (("attack.eps", cfg.attack.eps), ("eval.eps", cfg.eval.eps)):
            if eps > 1:
                raise UserError(f"{key}: must be <= 1 with attack.norm Linf (images are in [0, 1]), got {eps}")


def _validate_relations(cfg: Config) -> None:
    """Checks that involve more than one value."""
    check_options(cfg.model.name, cfg.model.kwargs)
    if cfg.model.activation_checkpointing:  # refused now if the model has no residual blocks (meta: no memory)
        with torch.device("meta"):
            enable_activation_checkpointing(create_model(cfg.model.name, **cfg.model.kwargs), cfg.model.name)
    if cfg.model.ghost_batch:
        if cfg.runtime.sync_bn:
            raise UserError("model.ghost_batch and runtime.sync_bn: BatchNorm statistics cannot be both over shards "
                            "and over the global batch; choose one")
        with torch.device("meta"):  # refused now if the model has no BatchNorm
            use_ghost_batchnorm(create_model(cfg.model.name, **cfg.model.kwargs), cfg.model.ghost_batch, cfg.model.name)
    method = get_method(cfg.method.name)
    if method.adversarial(cfg.method) and (cfg.attack.eps <= 0 or cfg.attack.steps <= 0):
        raise UserError(f"method {cfg.method.name} needs attack.eps > 0 and attack.steps > 0")
    if cfg.data.dataset in STREAMING_DATASETS:
        from .streaming import AUGMENTATIONS as STREAMING_AUGMENTATIONS

        if cfg.data.augment not in STREAMING_AUGMENTATIONS:
            raise UserError(f"data.augment: {cfg.data.augment!r} is not available for {cfg.data.dataset}; use one "
                            f"of {', '.join(STREAMING_AUGMENTATIONS)}")
        if cfg.data.generated:
            raise UserError(f"data.generated: mixing in generated images is not available for {cfg.data.dataset}")
        if cfg.eval.n_examples == 0:
            raise UserError(f"eval.n_examples: 0 (all) is not available for {cfg.data.dataset}; choose a number "
                            "(RobustBench's ImageNet board uses 5000)")
    two_view = cfg.data.augment in TWO_VIEW_AUGMENTATIONS
    if method.views == 2 and not two_view:
        raise UserError(f"method {cfg.method.name} trains on two views of each image: set data.augment to "
                        f"{' or '.join(TWO_VIEW_AUGMENTATIONS)}")
    if two_view and method.views != 2:
        two_view_methods = ", ".join(name for name, m in METHODS.items() if m.views == 2)
        raise UserError(f"data.augment {cfg.data.augment} makes two views of each image, which method "
                        f"{cfg.method.name} does not use; two-view methods: {two_view_methods}")
    if two_view and cfg.optim.accumulate > 1:
        raise UserError("optim.accumulate > 1 with a two-view augmentation: micro-batches would split the views "
                        "apart; use model.ghost_batch for per-shard BatchNorm statistics")
    if cfg.awp.enabled and not method.adversarial(cfg.method):
        raise UserError(f"awp.enabled needs an adversarial method; {cfg.method.name} trains on clean inputs")
    if cfg.data.generated_ratio >= 1:
        raise UserError(f"data.generated_ratio: must be in [0, 1), got {cfg.data.generated_ratio}")
    if cfg.data.generated_ratio > 0 and not cfg.data.generated:
        raise UserError("data.generated_ratio > 0 needs data.generated (path to an .npz file)")
    if not 0 < cfg.ema.decay < 1:
        raise UserError(f"ema.decay: must be in (0, 1), got {cfg.ema.decay}")
    if cfg.ema.enabled and cfg.ema.every == "epoch" and cfg.ema.start_epoch < 1:
        raise UserError("ema.start_epoch: must be >= 1 with ema.every=epoch (the average starts from the weights "
                        "after epoch start_epoch; 0 would average in the untrained initial weights)")
    if cfg.optim.warmup_epochs >= cfg.optim.epochs and cfg.optim.warmup_epochs > 0:
        raise UserError("optim.warmup_epochs must be smaller than optim.epochs")
    if cfg.eval.version == "custom" and not cfg.eval.attacks:
        raise UserError("eval.version custom needs eval.attacks (e.g. [apgd-ce, apgd-t])")
    if cfg.data.val_size and cfg.data.subset and cfg.data.val_size >= cfg.data.subset:
        raise UserError("data.val_size must be smaller than data.subset")
    if cfg.data.batch_size % cfg.optim.accumulate:
        raise UserError(f"optim.accumulate={cfg.optim.accumulate} must divide data.batch_size={cfg.data.batch_size} "
                        "into equal micro-batches")
    dev = cfg.runtime.device
    if dev not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", dev):
        raise UserError(f"runtime.device: {dev!r} is not one of auto, cpu, cuda, cuda:N")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load`` (same tags, no Python objects) that refuses a key given twice in one mapping, at
    any depth, instead of keeping the last value silently. Keys written differently but equal once read
    (1 and 0x1, yes and true) are the same key, as they would be in the resulting dict."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        self._refuse_duplicates(node)
        return self.construct_document(node)

    def _refuse_duplicates(self, root) -> None:
        todo, seen_nodes = [(root, "")], set()
        while todo:  # iterative, and each node once: aliases share nodes (and may nest recursively)
            node, path = todo.pop()
            if id(node) in seen_nodes:
                continue
            seen_nodes.add(id(node))
            if isinstance(node, yaml.SequenceNode):
                todo.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
            elif isinstance(node, yaml.MappingNode):
                first_line = {}
                for key_node, value_node in node.value:
                    if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                        todo.append((value_node, path))  # merged keys may be overridden; others fail later
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    dotted = f"{path}.{key}" if path else str(key)
                    if key in first_line:
                        raise _DuplicateKey(dotted, line, first_line[key])
                    first_line[key] = line
                    todo.append((value_node, dotted))


def _read_yaml(text: str, source: str, *, override: str = ""):
    """Parse a recipe file's text (``source``: its path) or an override's value (``override``: its key)."""
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as e:
        if override:
            raise UserError(f"override {override}: duplicate key '{override}.{e.key}'") from None
        where = f"recipe {source} line {e.line}"
        raise UserError(f"{where}: duplicate key '{e.key}' (first on line {e.first})") from None
    except yaml.YAMLError as e:  # includes tags like !!python/object that safe_load refuses
        raise UserError(f"{source}: not a valid recipe YAML ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise UserError(f"{source}: not a valid recipe YAML (nested too deeply)") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides; values are parsed as YAML scalars/lists (so 0.1, true, [1, 2])."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected dotted.key=value, e.g. optim.lr=0.1")
        key, text = item.split("=", 1)
        parts = [part.strip() for part in key.split(".")]
        if not all(parts):  # optim.=1, .lr=1, =1
            raise UserError(f"override {item!r}: expected dotted.key=value, e.g. optim.lr=0.1")
        key = ".".join(parts)
        value = _read_yaml(text, f"override {key}", override=key) if text.strip() else ""
        node = raw
        for depth, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent, or written empty (`optim:` in YAML): a new section
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                where = ".".join(parts[:depth + 1])
                raise UserError(f"override {key}: {where} is {node!r}, not a section")
        node[parts[-1]] = value
    return raw


def from_dict(raw: dict) -> Config:
    """A new job's config: every key and value checked. ``{}`` is the defaults (a recipe *file* may not be
    empty: ``load_config``)."""
    cfg = _build(Config, raw or {}, "")
    _validate_new_recipe(cfg)  # first: optim.lr -1 and 0 get the same message
    _validate(cfg)
    return cfg


def _from_dict(raw: dict) -> Config:
    """A saved config: the same checks without ``_validate_new_recipe``."""
    cfg = _build(Config, raw or {}, "")
    _validate(cfg)
    return cfg


def from_saved(raw: dict) -> Config:
    """The config stored in a checkpoint or results.json, also one written before methods had their own
    option groups (every method then stored every method's fields, and attack.objective_beta)."""
    raw = copy.deepcopy(raw)
    method, attack = raw.get("method") or {}, raw.get("attack") or {}
    objective_beta = attack.pop("objective_beta", None)
    if method.get("name", "gkl_at") in METHODS:
        options = METHODS[method.get("name", "gkl_at")].Options
        fields = {f.name for f in dataclasses.fields(options)}
        if "attack_beta" in fields and objective_beta is not None:
            method.setdefault("attack_beta", objective_beta)
        if "sample_temperature" in fields and "sample_temperature" not in method:
            method["sample_temperature"] = method.get("prior_temperature", 4.0)  # it served both, then
        raw["method"] = {k: v for k, v in method.items() if k in fields}
    return _from_dict(raw)


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a recipe (safe YAML, UTF-8, no key twice, not empty), apply dotted overrides, validate everything."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"recipe {path} is a folder, not a YAML file")
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"recipe {path} cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"recipe {path} is not a YAML text file (byte {e.start} is not UTF-8)") from None
    raw = _read_yaml(text, str(path))
    if raw is None or raw == {}:  # blank, only comments, `---` or `{}`: not a recipe, the defaults by accident
        raise UserError(f"recipe {path} is empty; start from experiments/recipes/fmnist_gkl_demo.yaml")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of sections, got {type(raw).__name__}")
    return from_dict(apply_overrides(raw, list(overrides)))


def config_diff(saved: dict, now: dict, ignore: tuple[str, ...] = (), prefix: str = "") -> list[tuple]:
    """(dotted key, saved value, new value) for each leaf that differs, except keys starting with ``ignore``."""
    diff = []
    for k in sorted(set(saved) | set(now), key=str):
        key = f"{prefix}{k}"
        if isinstance(saved.get(k), dict) and isinstance(now.get(k), dict):
            diff += config_diff(saved[k], now[k], ignore, key + ".")
        elif saved.get(k) != now.get(k) and not key.startswith(ignore):
            diff.append((key, saved.get(k), now.get(k)))
    return diff


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
