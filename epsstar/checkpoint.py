"""Checkpoints: atomic writes and weights-only loads.

A checkpoint is a plain dict of tensors and primitive values::

    {"format": 1, "epoch": int, "config": dict, "model": state_dict, "optimizer": state_dict,
     "scheduler": state_dict, "best": dict, "history": list[dict], "run_id": str | None}

It is always loaded with ``torch.load(weights_only=True)``: artifact stores are shared in a lab,
and a pickled checkpoint must not be able to run code on whoever loads it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from epsstar.config import EpsstarError

FORMAT = 1


class CheckpointError(EpsstarError):
    """A checkpoint that is missing, truncated, not ours, or tries to unpickle arbitrary objects."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a killed process leaves the old file or the new
    one, never half of one (write to a temporary file in the same directory, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (weights only, never arbitrary code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, unsafe global...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot load checkpoint {path}: {reason[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise CheckpointError(f"{path} is not an epsstar checkpoint")
    return state
