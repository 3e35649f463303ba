"""epsstar: find the critical attack strength ε* at which adversarial training stops behaving
like clean training (Xing, Song, Cheng, NeurIPS 2022)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Public names, imported lazily so `import epsstar` stays light (no torch or MLflow import).
_LAZY = {
    "TrainConfig": "epsstar.config",
    "parse_eps": "epsstar.config",
    "BisectionSampler": "epsstar.sampler",
    "estimate_from_study": "epsstar.sampler",
    "interpolate_epsstar": "epsstar.estimate",
    "extrapolate_epsstar": "epsstar.estimate",
    "Estimate": "epsstar.estimate",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'epsstar' has no attribute {name!r}")
