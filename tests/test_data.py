"""Datasets load from their real on-disk formats; splits are fixed, nested and disjoint; loaders
are seeded and re-iterable.

Each torchvision dataset is tested on tiny files written here in the format of the official
release (CIFAR python pickles, MNIST idx ubyte files, SVHN .mat files), read through the same code
path as the real data.
"""

from __future__ import annotations

import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from torch.utils.data import Subset, TensorDataset

from epsstar.config import ConfigError, TrainConfig
from epsstar.data import (
    DATASETS,
    DataError,
    ImageTensorDataset,
    load_data,
    make_loader,
    random_crop,
    split_indices,
    unaugmented,
)

# ------------------------------------------------------------------------- official formats
# Each writer returns (train images (N, C, H, W) uint8, train labels, test images, test labels)
# as the loader should read them back.


def _images(rng: np.random.Generator, n: int, c: int, size: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, c, size, size), dtype=np.uint8)


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    parts = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        x, y = _images(rng, n, 3, 32), rng.integers(0, 10, n)
        # One row per image: 1024 red, 1024 green, 1024 blue values, each 32x32 row-major.
        _pickle(folder / name, {"batch_label": name, "data": x.reshape(n, 3072), "labels": list(y)})
        parts.append((x, y))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship"]
    _pickle(folder / "batches.meta", {"label_names": names + ["truck"], "num_vis": 3072})
    x_train = np.concatenate([p[0] for p in parts[:5]])
    y_train = np.concatenate([p[1] for p in parts[:5]])
    return x_train, y_train, parts[5][0], parts[5][1]


def write_cifar100(root: Path, n_train: int = 12, n_test: int = 5):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        x, y = _images(rng, n, 3, 32), rng.integers(0, 100, n)
        coarse = list(y // 5)
        batch = {"data": x.reshape(n, 3072), "fine_labels": list(y), "coarse_labels": coarse}
        _pickle(folder / name, batch)
        out += [x, y]
    meta = {
        "fine_label_names": [f"c{i}" for i in range(100)],
        "coarse_label_names": [f"s{i}" for i in range(20)],
    }
    _pickle(folder / "meta", meta)
    return tuple(out)


def _write_idx(path: Path, array: np.ndarray) -> None:
    # idx format: magic (0, 0, dtype 0x08 = ubyte, number of dims), big-endian sizes, raw bytes.
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 10, n_test: int = 4):
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    out = []
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = _images(rng, n, 1, 28), rng.integers(0, 10, n)
        _write_idx(folder / f"{split}-images-idx3-ubyte", x[:, 0])
        _write_idx(folder / f"{split}-labels-idx1-ubyte", y)
        out += [x, y]
    return tuple(out)


def write_svhn(root: Path, n_train: int = 9, n_test: int = 5):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    out = []
    for split, n in (("train", n_train), ("test", n_test)):
        x = _images(rng, n, 3, 32)
        digit = np.arange(n) % 10  # every digit, 0 included
        # SVHN's .mat: X is (H, W, C, N), y is (N, 1) with the digit 0 stored as label 10.
        mat_y = np.where(digit == 0, 10, digit).reshape(n, 1).astype(np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x.transpose(2, 3, 1, 0), "y": mat_y})
        out += [x, digit]
    return tuple(out)


WRITERS = {
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "mnist": write_mnist,
    "svhn": write_svhn,
}


def _all(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.batch(torch.arange(len(dataset)), None)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"augment": False, **kw})


# ------------------------------------------------------------------------------ file formats


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_official_format_loads_through_the_real_code_path(tmp_path, name):
    x_tr, y_tr, x_te, y_te = WRITERS[name](tmp_path)
    bundle = load_data(_cfg(dataset=name, data_dir=str(tmp_path)))
    spec = DATASETS[name]
    shape = (spec.num_classes, spec.in_channels, spec.image_size)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == shape
    assert len(bundle.mean) == len(bundle.std) == spec.in_channels
    assert bundle.eval_split == "test"
    for dataset, x, y in ((bundle.train, x_tr, y_tr), (bundle.eval, x_te, y_te)):
        got_x, got_y = _all(dataset)
        assert got_x.dtype == torch.float32 and got_y.dtype == torch.int64
        assert got_x.shape == (len(x), spec.in_channels, spec.image_size, spec.image_size)
        assert 0.0 <= got_x.min() and got_x.max() <= 1.0
        assert torch.equal((got_x * 255).round().to(torch.uint8), torch.from_numpy(x))
        assert got_y.tolist() == [int(v) for v in y]
    item_x, item_y = bundle.train[1]
    assert torch.equal(item_x, _all(bundle.train)[0][1]) and item_y.dim() == 0


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_missing_files_say_what_to_put_where(tmp_path, name):
    spec = DATASETS[name]
    with pytest.raises(DataError) as err:
        load_data(_cfg(dataset=name, data_dir=str(tmp_path / "data")))
    message = str(err.value)
    assert "\n" not in message
    assert f"{spec.title} not found in {tmp_path / 'data'}/" in message
    assert spec.hint in message and "--download true" in message


def test_a_single_missing_file_is_named(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="no cifar-10-batches-py/data_batch_3"):
        load_data(_cfg(dataset="cifar10", data_dir=str(tmp_path)))


def test_an_unreadable_file_is_a_data_error(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(DataError, match=r"cannot read MNIST in .*"):
        load_data(_cfg(dataset="mnist", data_dir=str(tmp_path)))


class Downloaded(Exception):
    """Raised by the stand-in download functions below: no test touches the network."""


def _no_network(monkeypatch) -> list[str | None]:
    """Replace torchvision's download functions; returns the md5 each call was asked to verify."""
    md5s: list[str | None] = []

    def fake(url, *args, md5=None, **kwargs):
        md5s.append(md5)
        raise Downloaded(url)

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", fake)
    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", fake)
    monkeypatch.setattr("epsstar.data.download_url", fake)
    return md5s


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_placed_files_are_not_downloaded_over(tmp_path, monkeypatch, name):
    md5s = _no_network(monkeypatch)
    x_tr, *_ = WRITERS[name](tmp_path)
    bundle = load_data(_cfg(dataset=name, data_dir=str(tmp_path)), download=True)
    assert len(bundle.train) == len(x_tr) and md5s == []


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_downloads_are_checksummed_and_failures_are_data_errors(tmp_path, monkeypatch, name):
    md5s = _no_network(monkeypatch)
    with pytest.raises(Downloaded):
        load_data(_cfg(dataset=name, data_dir=str(tmp_path)), download=True)
    assert len(md5s) == 1 and len(md5s[0]) == 32  # the official release's md5 is verified

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    monkeypatch.setattr("epsstar.data.download_url", offline)
    title = DATASETS[name].title
    with pytest.raises(DataError, match=f"cannot download {title} in .*: network is unreachable"):
        load_data(_cfg(dataset=name, data_dir=str(tmp_path)), download=True)


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'; choose one of: digits"):
        load_data(_cfg(dataset="imagenet"))


# ------------------------------------------------------------------------------------ splits


def test_digits_split_is_fixed_stratified_and_independent_of_the_seed():
    a = load_data(_cfg(dataset="digits", seed=0))
    b = load_data(_cfg(dataset="digits", seed=123))
    assert (len(a.train), len(a.eval)) == (1437, 360)
    assert a.in_channels == 1 and a.image_size == 8
    for split in ("train", "eval"):
        assert torch.equal(_all(getattr(a, split))[0], _all(getattr(b, split))[0])
    counts = torch.bincount(_all(a.eval)[1], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # 20% of each class's ~180 images
    x, _ = _all(a.train)
    assert x.max() == 1.0 and x.min() == 0.0  # 0..16 scaled by 1/16


def _rows(dataset) -> set[tuple[float, ...]]:
    return {tuple(r.tolist()) for r in _all(dataset)[0].flatten(1)}


def test_n_train_subsets_are_seed_independent_and_nested():
    small = load_data(_cfg(dataset="digits", n_train=300, seed=1))
    again = load_data(_cfg(dataset="digits", n_train=300, seed=9))
    large = load_data(_cfg(dataset="digits", n_train=900))
    assert len(small.train) == 300
    assert torch.equal(_all(small.train)[0], _all(again.train)[0])
    assert _rows(small.train) <= _rows(large.train)


def test_validation_split_is_deterministic_disjoint_and_from_the_subset():
    train_idx, val_idx = split_indices(1000, 400, 0.25)
    again_train, again_val = split_indices(1000, 400, 0.25)
    subset, _ = split_indices(1000, 400, 0.0)
    assert torch.equal(train_idx, again_train) and torch.equal(val_idx, again_val)
    assert (len(train_idx), len(val_idx)) == (300, 100)
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert set(train_idx.tolist()) | set(val_idx.tolist()) == set(subset.tolist())


def test_val_fraction_holds_out_part_of_the_training_set():
    bundle = load_data(_cfg(dataset="digits", n_train=500, val_fraction=0.2, seed=4))
    other = load_data(_cfg(dataset="digits", n_train=500, val_fraction=0.2, seed=5))
    assert bundle.eval_split == "val" and (len(bundle.train), len(bundle.eval)) == (400, 100)
    assert torch.equal(_all(bundle.eval)[0], _all(other.eval)[0])


def test_too_large_n_train_names_both_numbers():
    with pytest.raises(
        ConfigError, match=r"n_train=5000 is larger than the training split \(1437\)"
    ):
        load_data(_cfg(dataset="digits", n_train=5000))


def test_val_fraction_that_empties_a_split_is_a_config_error():
    with pytest.raises(ConfigError, match="val_fraction=0.01 of 10 training examples leaves 0"):
        load_data(_cfg(dataset="digits", n_train=10, val_fraction=0.01))


# ------------------------------------------------------------------------------ augmentation


def _crop_offsets(out: torch.Tensor, img: torch.Tensor, pad: int = 4) -> list[tuple[int, int]]:
    """Every (dy, dx) for which ``out`` is the crop of zero-padded ``img`` at that offset."""
    padded = torch.nn.functional.pad(img, (pad,) * 4)
    h, w = img.shape[-2:]
    return [
        (dy, dx)
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
        if torch.equal(padded[:, dy : dy + h, dx : dx + w], out)
    ]


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32)
    out = random_crop(x, gen)
    offsets = [_crop_offsets(o, i) for o, i in zip(out, x, strict=True)]
    assert all(len(o) == 1 for o in offsets)
    assert len({o[0] for o in offsets}) > 20  # offsets vary across the batch


@pytest.mark.parametrize("name,flips", [("cifar10", True), ("svhn", False)])
def test_training_augmentation_crops_and_flips_only_where_meaningful(tmp_path, name, flips):
    WRITERS[name](tmp_path)
    bundle = load_data(TrainConfig(dataset=name, data_dir=str(tmp_path), augment=True))
    clean, _ = _all(unaugmented(bundle.train))
    gen = torch.Generator().manual_seed(0)
    flipped = 0
    for _ in range(10):
        out, _ = bundle.train.batch(torch.arange(len(clean)), gen)
        for o, img in zip(out, clean, strict=True):
            plain, mirrored = _crop_offsets(o, img), _crop_offsets(o, img.flip(2))
            assert plain or mirrored
            flipped += bool(mirrored) and not plain
    assert (flipped > 0) is flips
    # The evaluation split is never augmented: two reads (unseeded) give the same images.
    assert bundle.eval.augment is None
    assert torch.equal(_all(bundle.eval)[0], _all(bundle.eval)[0])


def test_no_augmentation_for_digits_or_when_disabled(tmp_path):
    assert load_data(TrainConfig(dataset="digits", augment=True)).train.augment is None
    write_cifar10(tmp_path)
    bundle = load_data(TrainConfig(dataset="cifar10", data_dir=str(tmp_path), augment=False))
    assert bundle.train.augment is None


# ----------------------------------------------------------------------------------- loaders


def _epoch(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*loader, strict=True)
    return torch.cat(xs), torch.cat(ys)


@pytest.fixture
def numbered() -> ImageTensorDataset:
    """50 one-pixel images whose value encodes their index: (50, 1, 1, 1) float, labels 0..49."""
    return ImageTensorDataset(torch.arange(50.0).view(50, 1, 1, 1) / 100, torch.arange(50))


def test_loader_covers_every_example_once_per_epoch(numbered):
    loader = make_loader(numbered, 16, shuffle=True, seed=0)
    assert len(loader) == math.ceil(50 / 16) == 4
    first, second = _epoch(loader), _epoch(loader)  # re-iterable
    for x, y in (first, second):
        assert sorted(y.tolist()) == list(range(50))
        assert torch.equal((x.flatten() * 100).round().long(), y)  # images stay with labels
    assert first[1].tolist() != second[1].tolist()  # a new order each epoch
    assert [len(y) for _, y in loader] == [16, 16, 16, 2]


def test_loader_is_reproducible_from_its_seed(numbered):
    a = make_loader(numbered, 8, shuffle=True, seed=3)
    b = make_loader(numbered, 8, shuffle=True, seed=3)
    c = make_loader(numbered, 8, shuffle=True, seed=4)
    orders_a = [_epoch(a)[1].tolist() for _ in range(3)]
    assert orders_a == [_epoch(b)[1].tolist() for _ in range(3)]
    assert orders_a[0] != _epoch(c)[1].tolist()
    b.set_epoch(2)  # resuming at epoch 2 replays epoch 2
    assert _epoch(b)[1].tolist() == orders_a[2]


def test_unshuffled_loader_keeps_the_order(numbered):
    assert _epoch(make_loader(numbered, 7, shuffle=False, seed=0))[1].tolist() == list(range(50))


def test_augmented_loader_is_reproducible(tmp_path):
    write_cifar10(tmp_path)
    train = load_data(TrainConfig(dataset="cifar10", data_dir=str(tmp_path))).train
    a = _epoch(make_loader(train, 8, shuffle=True, seed=1))[0]
    b = _epoch(make_loader(train, 8, shuffle=True, seed=1))[0]
    assert torch.equal(a, b)


def test_a_subset_of_in_memory_images_keeps_the_batched_path(numbered):
    loader = make_loader(Subset(numbered, range(10, 20)), 4, shuffle=False, seed=0)
    assert isinstance(loader.dataset, ImageTensorDataset)
    assert _epoch(loader)[1].tolist() == list(range(10, 20))


def test_other_datasets_go_through_a_seeded_dataloader():
    dataset = TensorDataset(torch.rand(30, 1, 2, 2), torch.arange(30))
    a = make_loader(dataset, 4, shuffle=True, seed=5)
    b = make_loader(dataset, 4, shuffle=True, seed=5)
    assert len(a) == 8
    assert _epoch(a)[1].tolist() == _epoch(b)[1].tolist()
    assert sorted(_epoch(a)[1].tolist()) == list(range(30))
