import math

import pytest

from epsstar.config import ConfigError, TrainConfig, parse_eps


@pytest.mark.parametrize(
    ("text", "value"),
    [("2/255", 2 / 255), ("0.1/255", 0.1 / 255), ("0.0078", 0.0078), ("0", 0.0),
     (" 8/255 ", 8 / 255), (0.5, 0.5)],
)
def test_parse_eps_accepts_decimal_and_fraction(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["-1", "-2/255", "nan", "inf", "1/0", "two", ""])
def test_parse_eps_rejects_bad_values(text):
    with pytest.raises(ConfigError):
        parse_eps(text)


@pytest.mark.parametrize(
    "kwargs",
    [{"eps": -0.1}, {"eps": math.nan}, {"eps": math.inf}, {"norm": "l1"}, {"attack": "cw"},
     {"loss": "hinge"}, {"optimizer": "lion"}, {"epochs": 0}, {"val_fraction": 1.0},
     {"n_train": -5}, {"lr": 0.0}],
)
def test_config_rejects_bad_fields(kwargs):
    with pytest.raises(ConfigError):
        TrainConfig(**kwargs)


def test_config_hash_ignores_device_but_not_eps():
    base = TrainConfig(eps=2 / 255)
    assert base.config_hash() == base.replace(device="cpu", loader_workers=3).config_hash()
    assert base.config_hash() != base.replace(eps=3 / 255).config_hash()
    assert base.config_hash() != base.replace(seed=1).config_hash()


def test_params_round_trip_through_strings():
    cfg = TrainConfig(eps=2 / 255, arch="cnn", width=16, augment=False, n_train=500)
    params = {k: str(v) for k, v in cfg.to_params().items()}
    assert TrainConfig.from_params(params) == cfg
    assert float(params["eps_255"]) == pytest.approx(2.0)


def test_fraction_param_from_mlflow_run_is_understood():
    # `mlflow run -P eps=2/255` logs the param as the user wrote it
    assert TrainConfig.from_params({"eps": "2/255"}).eps == pytest.approx(2 / 255)


def test_roles():
    assert TrainConfig().role == "clean"
    assert TrainConfig(eps=0.01).role == "scratch"
    assert TrainConfig(eps=0.01, init="runs:/abc").role == "finetune"


def test_clean_runs_share_one_identity_across_attacks():
    clean = TrainConfig()
    assert clean.config_hash() == clean.replace(norm="l2", attack="fgm", steps=3).config_hash()
    assert clean.config_hash() != clean.replace(width=32).config_hash()
    adv = TrainConfig(eps=1 / 255)
    assert adv.config_hash() != adv.replace(norm="l2").config_hash()
    # a search family is everything but eps, attack fields included
    assert adv.family_hash() == adv.replace(eps=2 / 255).family_hash()
    assert adv.family_hash() != adv.replace(norm="l2").family_hash()
