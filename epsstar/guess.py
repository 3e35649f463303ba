"""A free lower guess of ε* from the clean model alone (attacks only, no training).

Adversarial training at ε minimises the attacked training loss, and the clean model is one of
the models it could end at, so R̂(θ̂(ε), ε) ≤ (the clean model's attacked training loss at ε)
(up to the optimiser finding that minimum). Where the clean model's attacked loss is still
≤ R*(0), ε is therefore below ε*: the largest such ε is a lower guess that costs a few attacked
passes over a slice of the training set instead of a training run.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from torch.utils.data import Subset

from epsstar import tracking
from epsstar.checkpoint import CheckpointError, load_checkpoint
from epsstar.config import TrainConfig
from epsstar.data import load_data, make_loader, unaugmented
from epsstar.train import evaluate, make_model, resolve_device

N_EXAMPLES = 1024  # training examples attacked per probe: enough for a guess, cheap on a GPU
N_PROBES = 7  # log-ε bisection steps: the guess is within a factor (hi/lo)^(1/2^7) of the edge


def _best_weights(run_id: str, root: Path) -> dict:
    local = root / run_id / "best.pt"
    if local.exists():
        return load_checkpoint(local)["model"]
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(run_id, "checkpoints/best.pt", tmp)
        if path is None:
            raise CheckpointError(f"clean run {run_id} has no best checkpoint")
        return load_checkpoint(path)["model"]


def clean_model_lower_guess(cfg: TrainConfig, clean_run_id: str, threshold: float,
                            eps_low: float, eps_high: float, root: Path) -> float | None:
    """Largest ε in [eps_low, eps_high] (pixel units) whose attacked training loss of the clean
    model is ≤ ``threshold``; None when even ``eps_low`` is above it."""
    data = load_data(cfg)
    device = resolve_device(cfg.device)
    model = make_model(cfg, data).to(device)
    model.load_state_dict(_best_weights(clean_run_id, root))
    n = min(N_EXAMPLES, len(data.train))
    loader = make_loader(Subset(unaugmented(data.train), range(n)), 256, shuffle=False, seed=0)
    torch.manual_seed(cfg.seed)

    def attacked_loss(eps: float) -> float:
        return evaluate(model, loader, cfg.replace(eps=eps), device, adversarial=True)[0]

    if attacked_loss(eps_low) > threshold:
        return None
    if attacked_loss(eps_high) <= threshold:
        return eps_high
    lo, hi = math.log(eps_low), math.log(eps_high)
    for _ in range(N_PROBES):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if attacked_loss(math.exp(mid)) <= threshold else (lo, mid)
    return math.exp(lo)
