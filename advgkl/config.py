"""Recipes: typed dataclasses, safe YAML loading, dotted command-line overrides, validation at load.

A recipe is a YAML mapping whose sections mirror ``Config``. Every value is checked once here, so
code below this module trusts typed values: an unknown key, a wrong type or an impossible value is a
``UserError`` naming the key and what is allowed, raised before any data is read or compute runs.
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import UserError

METHODS = ("standard", "pgd_at", "trades", "mart", "gkl_at", "gkl_kd")
ADVERSARIAL_METHODS = ("pgd_at", "trades", "mart", "gkl_at")


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
    image_size: int = 32  # imagefolder only


@dataclass
class ModelConfig:
    name: str = "small_cnn"


@dataclass
class MethodConfig:
    name: str = "gkl_at"
    beta: float = 6.0  # weight of the robustness term (TRADES/MART beta, GKL beta on wMSE)
    alpha: float = 1.0  # GKL weight of the soft-label CE
    gamma: float = 1.0  # GKL exponent on the class-prior weights
    prior_temperature: float = 4.0  # T_prior of the class prior
    weights: str = "prior"  # GKL pair weights: class prior (GI) or per-sample softmax of the teacher
    symmetric: bool = True  # GKL wMSE into both branches (True) or teacher only as in KL/DKL (False)
    label_smoothing: float = 0.0  # standard and pgd_at only
    # knowledge distillation (gkl_kd)
    teacher: str = ""  # advgkl checkpoint path, or robustbench:NAME
    kd_loss: str = "gkl"  # gkl | kl (ARD-style)
    kd_temperature: float = 1.0  # T2 of the per-sample teacher weights
    kd_adversarial: bool = False  # distil on adversarial inputs (robust distillation)
    kd_warmup_epochs: float = 0.0  # the KD term's weight ramps linearly from 0 to 1 over these epochs
    ce_weight: float = 1.0


@dataclass
class AttackConfig:
    """The training-time attack (evaluation uses AutoAttack, configured under ``eval``)."""

    norm: str = "Linf"
    eps: float = 0.1
    steps: int = 5
    step_size: float = 0.0  # 0 = method default (eps/2 for gkl_at, 2.5*eps/steps otherwise)
    eps_schedule: str = "constant"  # linear: eps_t = eps * epoch / epochs (GKL-AT recipe)
    random_start: str = "auto"  # auto = normal(0.001) for gkl_at/trades, uniform otherwise
    objective_beta: float = 0.0  # GKL attack objective beta (0 for CIFAR-10, 1 for CIFAR-100)


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


@dataclass
class AWPConfig:
    enabled: bool = False
    gamma: float = 0.005
    warmup_epochs: int = 10


@dataclass
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9996
    start_epoch: int = 0


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
    method: MethodConfig = field(default_factory=MethodConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    awp: AWPConfig = field(default_factory=AWPConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Allowed values of enumerated string fields; the model/dataset names come from their registries.
CHOICES = {
    "data.augment": ("none", "crop_flip", "autoaugment"),
    "method.name": METHODS,
    "method.weights": ("prior", "sample"),
    "method.kd_loss": ("gkl", "kl"),
    "attack.norm": ("Linf", "L2"),
    "attack.eps_schedule": ("constant", "linear"),
    "attack.random_start": ("auto", "uniform", "normal", "none"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("constant", "cosine", "step", "onecycle"),
    "eval.version": ("standard", "plus", "custom", "fast", "none"),
    "logging.wandb": ("offline", "online", "disabled"),
    # no fp16: it needs loss scaling (loss, AWP's proxy, the attack's input gradients); bf16 does not
    "runtime.amp": ("auto", "none", "bf16"),
    "runtime.channels_last": ("auto", "on", "off"),
    "runtime.resume": ("never", "auto"),
}
NON_NEGATIVE = {
    "data.subset", "data.val_size", "data.generated_ratio", "method.beta", "method.alpha",
    "method.gamma", "method.label_smoothing", "method.kd_warmup_epochs", "method.ce_weight",
    "attack.eps", "attack.steps", "attack.step_size", "attack.objective_beta", "optim.lr",
    "optim.momentum", "optim.weight_decay", "optim.grad_clip", "optim.warmup_epochs", "awp.gamma",
    "awp.warmup_epochs", "ema.start_epoch", "eval.n_examples", "eval.eps", "runtime.seed", "runtime.threads",
    "runtime.checkpoint_every_steps",
}
POSITIVE = {
    "data.batch_size", "data.image_size", "method.prior_temperature", "method.kd_temperature",
    "optim.epochs", "eval.batch_size", "eval.val_pgd_steps", "eval.val_every", "eval.honesty_pgd_steps",
    "runtime.checkpoint_every", "runtime.dist_timeout_s",
}
_EXPONENT = re.compile(r"^\s*[-+]?\d+(\.\d*)?[eE][-+]?\d+\s*$")
_FRACTION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def _coerce(key: str, value, typ):
    """Check ``value`` against the field type; accept ints for floats and 'a/b' for floats (8/255)."""
    origin = typing.get_origin(typ)
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
    unknown = sorted(set(raw) - known)
    if unknown:
        where = prefix or "top level"
        raise UserError(f"unknown key {prefix + '.' if prefix else ''}{unknown[0]} in {where}; "
                        f"allowed keys: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value if value is not None else {}, key)
        else:
            kwargs[name] = _coerce(key, value, typ)
    return cls(**kwargs)


def _validate(cfg: Config) -> None:
    from .data import DATASETS
    from .models import list_models

    flat = _flatten(cfg.to_dict())
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            raise UserError(f"{key}: {flat[key]!r} is not one of {', '.join(allowed)}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise UserError(f"{key}: must be >= 0, got {flat[key]}")
    for key in POSITIVE:
        if flat[key] <= 0:
            raise UserError(f"{key}: must be > 0, got {flat[key]}")
    if cfg.data.dataset not in DATASETS:
        raise UserError(f"data.dataset: {cfg.data.dataset!r} is not one of {', '.join(sorted(DATASETS))}")
    if cfg.model.name not in list_models():
        raise UserError(f"model.name: {cfg.model.name!r} is not one of {', '.join(list_models())}")
    if cfg.data.generated_ratio >= 1:
        raise UserError(f"data.generated_ratio: must be in [0, 1), got {cfg.data.generated_ratio}")
    if cfg.data.generated_ratio > 0 and not cfg.data.generated:
        raise UserError("data.generated_ratio > 0 needs data.generated (path to an .npz file)")
    if cfg.method.label_smoothing >= 1:
        raise UserError(f"method.label_smoothing: must be in [0, 1), got {cfg.method.label_smoothing}")
    if cfg.method.label_smoothing > 0 and cfg.method.name not in ("standard", "pgd_at"):
        raise UserError("method.label_smoothing is supported by methods standard and pgd_at only")
    if cfg.method.name == "gkl_kd" and not cfg.method.teacher:
        raise UserError("method.teacher: gkl_kd needs a teacher (checkpoint path or robustbench:NAME)")
    if cfg.method.name in ADVERSARIAL_METHODS or cfg.method.kd_adversarial:
        if cfg.attack.eps <= 0 or cfg.attack.steps <= 0:
            raise UserError(f"method {cfg.method.name} needs attack.eps > 0 and attack.steps > 0")
    if cfg.awp.enabled and cfg.method.name not in ADVERSARIAL_METHODS:
        raise UserError(f"awp.enabled needs an adversarial method ({', '.join(ADVERSARIAL_METHODS)})")
    if not 0 < cfg.ema.decay < 1:
        raise UserError(f"ema.decay: must be in (0, 1), got {cfg.ema.decay}")
    if cfg.optim.warmup_epochs >= cfg.optim.epochs and cfg.optim.warmup_epochs > 0:
        raise UserError("optim.warmup_epochs must be smaller than optim.epochs")
    if cfg.eval.version == "custom" and not cfg.eval.attacks:
        raise UserError("eval.version custom needs eval.attacks (e.g. [apgd-ce, apgd-t])")
    if cfg.data.val_size and cfg.data.subset and cfg.data.val_size >= cfg.data.subset:
        raise UserError("data.val_size must be smaller than data.subset")
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


def _read_yaml(text: str, source: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:  # includes tags like !!python/object that safe_load refuses
        raise UserError(f"{source}: not a valid recipe YAML ({str(e).splitlines()[0]})") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides; values are parsed as YAML scalars/lists (so 0.1, true, [1, 2])."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected dotted.key=value, e.g. optim.lr=0.1")
        key, text = item.split("=", 1)
        value = _read_yaml(text, f"override {key}") if text.strip() else ""
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {key}: {part} is not a section")
        node[parts[-1]] = value
    return raw


def from_dict(raw: dict) -> Config:
    cfg = _build(Config, raw or {}, "")
    _validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a recipe with ``yaml.safe_load``, apply dotted overrides, validate everything."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    raw = _read_yaml(path.read_text(), str(path))
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of sections, got {type(raw).__name__}")
    return from_dict(apply_overrides(raw, list(overrides)))


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
