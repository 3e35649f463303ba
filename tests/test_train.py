"""The training loop without MLflow: metrics, early stopping, checkpoints, resume."""

from __future__ import annotations

import math

import pytest
import torch

from epsstar.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from epsstar.config import TrainConfig
from epsstar.data import load_data
from epsstar.train import fit, lr_factor

CFG = TrainConfig(dataset="digits", width=16, epochs=4, steps=3, batch_size=256, device="cpu")


@pytest.fixture(scope="module")
def data():
    return load_data(CFG)


def test_clean_fit_logs_every_epoch_and_selects_smallest_test_loss(data, tmp_path):
    seen = []
    result = fit(CFG, data, checkpoint_dir=tmp_path, on_epoch=lambda e, m: seen.append(e))
    assert seen == [1, 2, 3, 4]
    losses = [row["test_clean_loss"] for row in result.history]
    best = result.best
    assert best["best_epoch"] == 1 + losses.index(min(losses))
    assert best["best_test_clean_loss"] == min(losses)
    # eps = 0: the attacked test set is the test set
    assert all(r["test_adv_loss"] == r["test_clean_loss"] for r in result.history)
    assert {"train_seconds", "best_train_eval_loss", "best_train_adv_acc"} <= set(best)
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()


def test_adversarial_fit_attacked_losses_exceed_clean(data, tmp_path):
    result = fit(CFG.replace(eps=16 / 255), data, checkpoint_dir=tmp_path)
    for row in result.history:
        assert row["test_adv_loss"] > row["test_clean_loss"]
        assert math.isfinite(row["train_adv_loss"])
    losses = [row["test_adv_loss"] for row in result.history]
    assert result.best["best_test_adv_loss"] == min(losses)


def test_killed_fit_resumes_to_the_same_result(data, tmp_path):
    cfg = CFG.replace(eps=4 / 255)
    straight = fit(cfg, data, checkpoint_dir=tmp_path / "a")

    def die_after_two(epoch, metrics):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, data, checkpoint_dir=tmp_path / "b", on_epoch=die_after_two)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 2
    epochs = []
    resumed = fit(cfg, data, checkpoint_dir=tmp_path / "b", on_epoch=lambda e, m: epochs.append(e))
    assert epochs == [3, 4]
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    for a, b in zip(straight.history, resumed.history, strict=True):
        assert a["train_adv_loss"] == pytest.approx(b["train_adv_loss"], rel=1e-5)
        assert a["test_adv_loss"] == pytest.approx(b["test_adv_loss"], rel=1e-5)


def test_same_seed_same_numbers(data, tmp_path):
    a = fit(CFG.replace(eps=2 / 255, epochs=2), data, checkpoint_dir=tmp_path / "a")
    b = fit(CFG.replace(eps=2 / 255, epochs=2), data, checkpoint_dir=tmp_path / "b")
    assert a.best == pytest.approx(b.best | {"train_seconds": a.best["train_seconds"]})


def test_fine_tune_starts_from_given_weights(data, tmp_path):
    clean = fit(CFG.replace(epochs=3), data, checkpoint_dir=tmp_path / "clean")
    weights = clean.model.state_dict()
    tuned = fit(CFG.replace(eps=1 / 255, epochs=1, schedule="triangular", init="x"), data,
                checkpoint_dir=tmp_path / "ft", init_weights=weights)
    scratch = fit(CFG.replace(eps=1 / 255, epochs=1), data, checkpoint_dir=tmp_path / "s")
    # one epoch from the clean optimum beats one epoch from random weights
    assert tuned.history[0]["train_adv_loss"] < scratch.history[0]["train_adv_loss"]


def test_lr_schedules():
    assert lr_factor("piecewise", 0.49) == 1 and lr_factor("piecewise", 0.5) == 0.1
    assert lr_factor("piecewise", 0.8) == pytest.approx(0.01)
    tri = [lr_factor("triangular", p / 10) for p in range(10)]
    assert max(tri) == pytest.approx(1.0) and tri.index(max(tri)) == 4
    assert tri[0] > 0 and tri[-1] < tri[5]
    assert lr_factor("constant", 0.9) == 1


def test_checkpoint_round_trip_and_corruption(tmp_path):
    path = save_checkpoint({"epoch": 1, "model": {"w": torch.ones(2)}}, tmp_path / "c.pt")
    assert load_checkpoint(path)["model"]["w"].sum() == 2
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"format": 1, "model": {}, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_diverging_training_raises(data, tmp_path):
    with pytest.raises(FloatingPointError, match="diverged"):
        fit(CFG.replace(lr=1e6, epochs=2, optimizer="sgd", momentum=0.9), data,
            checkpoint_dir=tmp_path)
