"""Run configurations: one frozen dataclass per kind of run.

Every field carries its unit. ``dataclasses.asdict(cfg)`` is what goes to MLflow params and into
checkpoints, and :func:`TrainConfig.from_params` rebuilds the same object from a run's params, so
a run can always be reproduced (or resumed) from the tracking store alone.

ε is always in pixel units (inputs in [0, 1]); the ``eps_255`` views are for humans.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

# Names accepted on the command line; the registries in data.py / models.py hold the rest.
NORMS = ("linf", "l2")
ATTACKS = ("pgd", "fgm")
LOSSES = ("at", "trades", "mart")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("piecewise", "triangular", "constant")


class EpsstarError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits non-zero."""


class ConfigError(EpsstarError, ValueError):
    """A configuration mistake (unknown name, value out of range)."""


def parse_eps(text: str | float | int) -> float:
    """Parse an attack strength written as ``0.0078``, ``2/255`` or ``8/255``.

    Returns ε in pixel units. Rejects negative, NaN and infinite values.
    """
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        try:
            num, _, den = s.partition("/")
            value = float(num) / float(den) if den else float(num)  # "0.1/255" is fine too
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"cannot read eps {text!r}: write it as 0.0078 or 2/255") from None
    if not math.isfinite(value):
        raise ConfigError(f"eps must be finite, got {text!r}")
    if value < 0:
        raise ConfigError(f"eps must be >= 0, got {text!r}")
    return value


def _check_choice(name: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


@dataclass(frozen=True)
class TrainConfig:
    """One training run: clean (eps = 0), adversarial from scratch, or fine-tuning (init set)."""

    # --- data ---
    dataset: str = "digits"  # registry name in epsstar.data
    data_dir: str = "data"  # where torchvision datasets live (ignored for digits)
    n_train: int = 0  # training-set size; 0 = the whole training split
    val_fraction: float = 0.0  # > 0: early-stop on a seeded held-out split of train, not on test
    augment: bool = True  # crop+flip for CIFAR/SVHN (no effect on digits/MNIST)
    # --- model ---
    arch: str = "mlp"  # registry name in epsstar.models
    width: int = 64  # MLP/CNN hidden width h, WideResNet widen factor k (unused by PreActResNet18)
    # --- attack (pixel units) ---
    norm: str = "linf"  # linf | l2 (l2: norm of the whole image)
    attack: str = "pgd"  # pgd | fgm (fgm = FGSM under linf)
    eps: float = 0.0  # attack radius, pixel units; 0 = clean training
    steps: int = 10  # PGD iterations (fgm: always 1)
    step_size: float = 0.0  # pixel units; 0 = 2.5*eps/steps (see attacks.default_step_size)
    # --- objective and optimisation ---
    loss: str = "at"  # at (Madry) | trades | mart
    beta: float = 6.0  # TRADES / MART regularisation weight
    optimizer: str = "sgd"  # sgd | adam
    # base (peak) learning rate. 0.02 suits the digits default: at 0.1 the clean model's test
    # loss bottoms out before the lr drop while adversarial runs' does not, and the early-stopped
    # training losses jump between the two regimes (a noisy, non-monotone loss-vs-eps curve).
    # The paper's CIFAR-10 setting uses 0.1.
    lr: float = 0.02
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    schedule: str = "piecewise"  # piecewise: /10 at 50% and 75% | triangular | constant
    batch_size: int = 128
    epochs: int = 30
    seed: int = 0
    init: str = "scratch"  # scratch | path to a checkpoint | runs:/<run_id> of a run to fine-tune
    # --- not part of the identity of a run (excluded from config_hash) ---
    device: str = field(default="auto", metadata={"identity": False})  # auto | cpu | cuda[:i]
    loader_workers: int = field(default=0, metadata={"identity": False})  # DataLoader processes

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        if not math.isfinite(self.eps) or self.eps < 0:
            raise ConfigError(f"eps must be a finite number >= 0, got {self.eps}")
        _check_choice("norm", self.norm, NORMS)
        _check_choice("attack", self.attack, ATTACKS)
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        for name in ("epochs", "batch_size", "steps", "width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_train < 0:
            raise ConfigError(f"n_train must be >= 0 (0 = all), got {self.n_train}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("lr", "step_size", "beta", "weight_decay", "momentum"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {v}")
        if self.lr == 0:
            raise ConfigError("lr must be > 0")

    # ------------------------------------------------------------------ views
    @property
    def eps_255(self) -> float:
        return self.eps * 255.0

    @property
    def role(self) -> str:
        """epsstar.role tag: clean | scratch | finetune."""
        if self.init != "scratch":
            return "finetune"
        return "clean" if self.eps == 0 else "scratch"

    @property
    def effective_steps(self) -> int:
        return 1 if self.attack == "fgm" else self.steps

    def identity(self) -> dict[str, Any]:
        """The fields that define what a run computes (device etc. excluded).

        A clean run (ε = 0, from scratch) ignores every attack and objective field (every
        objective is cross-entropy at ε = 0), so one clean run serves searches over any norm,
        attack or loss.
        """
        ident = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.metadata.get("identity", True) and f.name != "data_dir"
        }
        if self.role == "clean":
            for name in _ATTACK_FIELDS:
                ident.pop(name)
        return ident

    def config_hash(self) -> str:
        """Stable hash of :meth:`identity`: two runs with the same hash compute the same thing."""
        return _hash(self.identity())

    def family_hash(self) -> str:
        """Hash of everything but ε: the runs of one ε* search share it."""
        ident = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.metadata.get("identity", True) and f.name not in ("data_dir", "eps")}
        return _hash(ident)

    def to_params(self) -> dict[str, Any]:
        """MLflow params: every field plus the derived names of the tracking contract."""
        params = dataclasses.asdict(self)
        params["eps_255"] = round(self.eps_255, 6)
        return params

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TrainConfig:
        """Rebuild from MLflow params (all strings) or a JSON dict; unknown keys are ignored."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in params:
                continue
            raw = params[f.name]
            kwargs[f.name] = _coerce(raw, type(getattr(cls(), f.name)))
        return cls(**kwargs)


_ATTACK_FIELDS = ("norm", "attack", "steps", "step_size", "loss", "beta")


def _hash(values: dict[str, Any]) -> str:
    blob = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _coerce(raw: Any, typ: type) -> Any:
    if not isinstance(raw, str):
        return typ(raw)
    if typ is bool:
        return raw.strip().lower() in ("1", "true", "yes")
    if typ is float:
        return parse_eps(raw) if "/" in raw else float(raw)
    return typ(raw)


@dataclass(frozen=True)
class SearchConfig:
    """The ε* search (``find_epsstar``): which ε range to search and when to stop."""

    eps_low: float = 0.1 / 255  # smallest ε the sampler may propose, pixel units (> 0: log scale)
    eps_high: float = 64 / 255  # largest ε the sampler may propose, pixel units
    rtol: float = 0.05  # stop once (upper - lower) / upper <= rtol
    max_trials: int = 12  # adversarial runs at most (the budget)
    study_name: str = ""  # "" = derived from the configuration
    storage: str = ""  # Optuna storage URL; "" = SQLite file next to the MLflow store
    clean_guess: bool = True  # attack the clean model first for a free lower guess of ε*
    workers: int = 1  # local worker processes (> 1 needs a server storage, not SQLite)

    def __post_init__(self) -> None:
        for name in ("eps_low", "eps_high", "rtol"):
            v = getattr(self, name)
            if not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {v}")
        if self.eps_low >= self.eps_high:
            raise ConfigError(f"eps_low ({self.eps_low:g}) must be < eps_high ({self.eps_high:g})")
        if self.max_trials < 1 or self.workers < 1:
            raise ConfigError("max_trials and workers must be >= 1")
