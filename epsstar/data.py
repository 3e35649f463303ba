"""Dataset registry and minibatch loaders.

Every dataset is held in memory as one (N, C, H, W) tensor (uint8 for the image datasets, so
CIFAR-10's training set takes 150 MB) and served as float pixels in [0, 1]; labels are int64.
Normalisation is not a data transform: it is the model's first layer (``epsstar.models``), with
the per-channel ``mean``/``std`` of the :class:`DataBundle`.

Which examples a run sees never depends on ``cfg.seed``: the digits train/test split, the
``n_train`` subset and the validation split all use :data:`DATA_SEED`, so runs at different ε and
seeds are trained and early-stopped on the same examples. Subsets are nested: the ``n_train = 1000``
examples are among the ``n_train = 2000`` ones.

Augmentation (training split only, ``cfg.augment``) is applied per batch with the loader's seeded
generator: CIFAR random crop 32 with 4-pixel zero padding + horizontal flip (as in the paper's base
code); SVHN the crop only, because a mirrored house-number digit is not a digit (a flipped 2 or 7
belongs to no class); none for digits and MNIST.
"""

from __future__ import annotations

import hashlib
import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from epsstar.config import ConfigError, EpsstarError, TrainConfig

# The seed of every data split (digits train/test, n_train subset, validation hold-out). Fixed,
# and deliberately not cfg.seed: changing the seed must change the training run, not the data.
DATA_SEED = 0

Augment = Callable[[Tensor, torch.Generator | None], Tensor]  # (B, C, H, W) → (B, C, H, W)


class DataError(EpsstarError):
    """Dataset files that are missing, unreadable or could not be downloaded."""


# ------------------------------------------------------------------------------- augmentation


def random_crop(x: Tensor, generator: torch.Generator | None, pad: int = 4) -> Tensor:
    """Per-image random crop of the original size from the image zero-padded by ``pad`` pixels.

    x: (B, C, H, W) → (B, C, H, W); the same as torchvision's ``RandomCrop(H, padding=pad)``,
    vectorised over the batch.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b)[:, None, None, None]
    channel = torch.arange(c)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Mirror each image of x (B, C, H, W) left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def crop_flip(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """CIFAR augmentation: :func:`random_crop` then :func:`random_flip`."""
    return random_flip(random_crop(x, generator), generator)


# ------------------------------------------------------------------------------------ dataset


class ImageTensorDataset(Dataset):
    """Images and labels in memory, served as ([0, 1] float (C, H, W), int64 label).

    Args:
        images: (N, C, H, W), uint8 (0..255) or float already in [0, 1].
        labels: (N,) int64.
        augment: optional batch augmentation (random, drawn from the generator it is given).
    """

    def __init__(self, images: Tensor, labels: Tensor, augment: Augment | None = None) -> None:
        if images.dim() != 4 or len(images) != len(labels):
            shapes = f"{tuple(images.shape)} and {tuple(labels.shape)}"
            raise ValueError(f"need images (N, C, H, W) and labels (N,), got {shapes}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.batch(torch.tensor([index]), None)
        return x[0], y[0]

    def batch(self, index: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """The examples at ``index`` (B,) as x (B, C, H, W) float in [0, 1] and y (B,) int64."""
        x = self.images[index]
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.augment is not None:
            x = self.augment(x, generator)
        return x, self.labels[index]

    def subset(self, index: Tensor) -> ImageTensorDataset:
        """A new dataset of the examples at ``index`` (copied), with the same augmentation."""
        return ImageTensorDataset(self.images[index], self.labels[index], self.augment)

    def with_augment(self, augment: Augment | None) -> ImageTensorDataset:
        """The same examples (shared, not copied) with another augmentation (None: none)."""
        return ImageTensorDataset(self.images, self.labels, augment)


def unaugmented(dataset: Dataset) -> Dataset:
    """``dataset`` without its augmentation, e.g. to re-evaluate a model on the training set."""
    if isinstance(dataset, ImageTensorDataset):
        return dataset.with_augment(None)
    return dataset


# ------------------------------------------------------------------------------------ readers
#
# A reader maps (root, train, download) to (images (N, C, H, W) uint8 or float, labels (N,)).
#
# torchvision checks every CIFAR/SVHN file against the md5 of the official release before it
# reads it. That rejects files a user placed by hand that are in the right format but not the
# byte-identical release (re-pickled, a subset, a mirror's copy, or the tiny files our tests
# write). The subclasses below accept any file that is present; a file in the wrong format still
# fails when it is parsed. Downloads are still verified: CIFAR's archive against its md5 by
# torchvision's own download(), SVHN's .mat files by ours.


def download_url(url: str, root: str, **kwargs) -> None:
    """torchvision's ``download_url``, imported on use (see :func:`_torchvision_readers`)."""
    from torchvision.datasets.utils import download_url as torchvision_download_url

    torchvision_download_url(url, root, **kwargs)


@lru_cache(maxsize=1)
def _torchvision_readers() -> dict[str, type]:
    """The torchvision dataset classes, built on first use: importing torchvision costs seconds,
    and the digits default never needs it."""
    from torchvision.datasets import CIFAR10, CIFAR100, MNIST, SVHN

    class PlacedCIFAR10(CIFAR10):
        train_list = [[name, None] for name, _ in CIFAR10.train_list]
        test_list = [[name, None] for name, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    class PlacedCIFAR100(CIFAR100):
        train_list = [[name, None] for name, _ in CIFAR100.train_list]
        test_list = [[name, None] for name, _ in CIFAR100.test_list]
        meta = {**CIFAR100.meta, "md5": None}

    class PlacedSVHN(SVHN):
        def _check_integrity(self) -> bool:
            return Path(self.root, self.filename).is_file()

        def download(self) -> None:
            if not self._check_integrity():
                download_url(self.url, self.root, filename=self.filename, md5=self.file_md5)

    return {"cifar10": PlacedCIFAR10, "cifar100": PlacedCIFAR100, "svhn": PlacedSVHN,
            "mnist": MNIST}


def _read_cifar(name: str, root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    ds = _torchvision_readers()[name](str(root), train=train, download=download)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) → NCHW
    return images, torch.as_tensor(ds.targets, dtype=torch.int64)


def _read_mnist(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    ds = _torchvision_readers()["mnist"](str(root), train=train, download=download)
    return ds.data.unsqueeze(1), ds.targets.to(torch.int64)  # (N, 28, 28) → (N, 1, 28, 28)


def _read_svhn(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    svhn = _torchvision_readers()["svhn"]
    ds = svhn(str(root), split="train" if train else "test", download=download)
    return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).to(torch.int64)


@lru_cache(maxsize=1)
def _digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Imported here: scikit-learn is slow to import and only digits needs it.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    # Stratified 80/20 with a fixed seed: the test set is the same for every run.
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=DATA_SEED
    )
    return x_tr, y_tr, x_te, y_te


def _read_digits(root: Path, train: bool, download: bool) -> tuple[Tensor, Tensor]:
    del root, download  # bundled with scikit-learn
    x_tr, y_tr, x_te, y_te = _digits_split()
    return (x_tr, y_tr) if train else (x_te, y_te)


# ----------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is and where its files are."""

    title: str  # human-readable name used in messages, e.g. "CIFAR-10"
    num_classes: int
    in_channels: int
    image_size: int  # H = W, pixels
    mean: tuple[float, ...]  # per channel, [0, 1] pixel units (for the model's Normalize layer)
    std: tuple[float, ...]
    read: Callable[[Path, bool, bool], tuple[Tensor, Tensor]]  # (root, train, download)
    files: tuple[str, ...] = ()  # paths under data_dir that must exist; () = bundled
    hint: str = ""  # what to put in data_dir
    augment: Augment | None = None  # training-split augmentation when cfg.augment


# The files of each CIFAR release, relative to data_dir (torchvision's layout).
_CIFAR10_FILES = tuple(
    f"cifar-10-batches-py/{n}"
    for n in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
)
_CIFAR100_FILES = tuple(f"cifar-100-python/{n}" for n in ("train", "test", "meta"))


_MNIST_FILES = tuple(
    f"MNIST/raw/{split}-{kind}-idx{dim}-ubyte"
    for split in ("train", "t10k")
    for kind, dim in (("images", 3), ("labels", 1))
)

# mean/std are the usual per-channel statistics of each training set (digits: of our fixed
# training split, pixels /16). Normalising by the data's own statistics rather than 0.5/0.5 keeps
# the first layer's inputs centred for every dataset; attacks are unaffected (pixel space).
DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        title="digits",
        num_classes=10,
        in_channels=1,
        image_size=8,
        mean=(0.3054,),
        std=(0.3761,),
        read=_read_digits,
    ),
    "mnist": DatasetSpec(
        title="MNIST",
        num_classes=10,
        in_channels=1,
        image_size=28,
        mean=(0.1307,),
        std=(0.3081,),
        read=_read_mnist,
        files=_MNIST_FILES,
        hint="put MNIST/raw/ with the four *-ubyte files there",
    ),
    "cifar10": DatasetSpec(
        title="CIFAR-10",
        num_classes=10,
        in_channels=3,
        image_size=32,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2471, 0.2435, 0.2616),
        read=partial(_read_cifar, "cifar10"),
        files=_CIFAR10_FILES,
        hint="put cifar-10-batches-py/ there",
        augment=crop_flip,
    ),
    "cifar100": DatasetSpec(
        title="CIFAR-100",
        num_classes=100,
        in_channels=3,
        image_size=32,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
        read=partial(_read_cifar, "cifar100"),
        files=_CIFAR100_FILES,
        hint="put cifar-100-python/ there",
        augment=crop_flip,
    ),
    "svhn": DatasetSpec(
        title="SVHN",
        num_classes=10,
        in_channels=3,
        image_size=32,
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
        read=_read_svhn,
        files=("train_32x32.mat", "test_32x32.mat"),
        hint="put train_32x32.mat and test_32x32.mat there",
        augment=random_crop,
    ),
}


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry for ``name``; :class:`ConfigError` listing the choices if unknown."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


# -------------------------------------------------------------------------------------- loading


@dataclass
class DataBundle:
    """The data of one run. Pixels are float in [0, 1], (C, H, W); labels int64."""

    train: Dataset  # the (n_train-subset, possibly augmented) training examples
    eval: Dataset  # early-stopping split: the test split, or the held-out validation split
    eval_split: str  # "test" | "val"
    num_classes: int
    in_channels: int
    image_size: int  # H = W, pixels
    mean: tuple[float, ...]  # per channel, [0, 1] pixel units
    std: tuple[float, ...]


# What a reader may raise on a file that is present but not in the expected format (torchvision's
# idx parser checks the header with assert), or on a failed download (URLError is an OSError).
_READ_ERRORS = (
    OSError,
    RuntimeError,
    ValueError,
    KeyError,
    EOFError,
    AssertionError,
    pickle.UnpicklingError,
)


def _read_split(
    spec: DatasetSpec, root: Path, *, train: bool, download: bool
) -> ImageTensorDataset:
    missing = [f for f in spec.files if not (root / f).is_file()]
    if missing and not download:
        raise DataError(
            f"{spec.title} not found in {root}/ (no {missing[0]}): {spec.hint} "
            "or pass --download true"
        )
    try:
        images, labels = spec.read(root, train, download)
    except _READ_ERRORS as err:
        action = "download" if missing else "read"
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise DataError(f"cannot {action} {spec.title} in {root}/: {reason}") from None
    return ImageTensorDataset(images, labels)


def split_indices(n_total: int, n_train: int, val_fraction: float) -> tuple[Tensor, Tensor | None]:
    """Indices of the training examples and of the validation hold-out (None if no hold-out).

    Draws ``n_train`` (0 = all) of ``n_total`` examples, then holds out ``val_fraction`` of those,
    from one generator seeded with :data:`DATA_SEED`; both index tensors are sorted and disjoint.
    """
    if n_train > n_total:
        raise ConfigError(f"n_train={n_train} is larger than the training split ({n_total})")
    generator = torch.Generator().manual_seed(DATA_SEED)
    chosen = torch.randperm(n_total, generator=generator)[: n_train or n_total]
    if val_fraction == 0:
        return chosen.sort().values, None
    n_val = round(val_fraction * len(chosen))
    if not 0 < n_val < len(chosen):
        raise ConfigError(
            f"val_fraction={val_fraction} of {len(chosen)} training examples leaves "
            f"{n_val} for validation and {len(chosen) - n_val} for training; both must be >= 1"
        )
    order = torch.randperm(len(chosen), generator=generator)
    return chosen[order[n_val:]].sort().values, chosen[order[:n_val]].sort().values


def load_data(cfg: TrainConfig, *, download: bool = False) -> DataBundle:
    """The training and early-stopping data of ``cfg``.

    Uses cfg.dataset, cfg.data_dir, cfg.n_train (0 = all), cfg.val_fraction, cfg.augment.
    torchvision datasets are read from ``cfg.data_dir`` in their usual on-disk layout and
    downloaded there only when ``download`` is true.

    Raises:
        ConfigError: unknown dataset, ``n_train`` larger than the training split, or a
            ``val_fraction`` that leaves an empty split.
        DataError: dataset files missing or unreadable (the message says what to put where).

    Example:
        >>> bundle = load_data(TrainConfig(dataset="digits", n_train=500, val_fraction=0.2))
        >>> len(bundle.train), len(bundle.eval), bundle.eval_split
        (400, 100, 'val')
    """
    spec = dataset_spec(cfg.dataset)
    root = Path(cfg.data_dir)
    full = _read_split(spec, root, train=True, download=download)
    try:
        train_idx, val_idx = split_indices(len(full), cfg.n_train, cfg.val_fraction)
    except ConfigError as err:
        raise ConfigError(f"{spec.title}: {err}") from None
    train = full.subset(train_idx)
    if val_idx is None:
        evaluation, eval_split = _read_split(spec, root, train=False, download=download), "test"
    else:
        evaluation, eval_split = full.subset(val_idx), "val"
    if cfg.augment and spec.augment is not None:
        train = train.with_augment(spec.augment)
    return DataBundle(
        train=train,
        eval=evaluation,
        eval_split=eval_split,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        image_size=spec.image_size,
        mean=spec.mean,
        std=spec.std,
    )


# -------------------------------------------------------------------------------------- loaders


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for one epoch of a loader, stable across processes."""
    digest = hashlib.sha256(f"epsstar-loader/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Batches:
    """Re-iterable minibatches (x (B, C, H, W) float in [0, 1], y (B,) int64), one epoch per pass.

    Epoch e (0-based, counted by the passes made, or set with :meth:`set_epoch` when resuming)
    draws its order and augmentation from a generator seeded with (seed, e), so a run is
    reproducible from its seed and every epoch sees a different order.

    An :class:`ImageTensorDataset` is served by slicing its tensors with shuffled indices and
    augmenting whole batches: a per-item DataLoader costs more than a small model's training
    step on CPU, and DataLoader with ``workers=0`` would draw augmentations from the global RNG,
    which the seed alone does not determine. Any other Dataset goes through a torch DataLoader
    with the seeded generator (its order is then reproducible; its transforms are its own).
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, workers: int = 0
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.workers = workers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass epoch ``epoch`` (0-based), e.g. when resuming a run."""
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        if isinstance(self.dataset, ImageTensorDataset):
            return self._slices(self.dataset, generator)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            generator=generator,
            num_workers=self.workers,
        )
        return iter(loader)

    def _slices(
        self, dataset: ImageTensorDataset, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            yield dataset.batch(order[start : start + self.batch_size], generator)


def make_loader(
    dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int, workers: int = 0
) -> Batches:
    """Minibatches of ``dataset`` for one pass per epoch; see :class:`Batches`.

    ``len(loader)`` is the number of batches (the last one may be smaller). ``workers`` applies
    only to datasets served through a torch DataLoader (not an :class:`ImageTensorDataset` or a
    ``Subset`` of one).

    Example:
        >>> loader = make_loader(bundle.train, 128, shuffle=True, seed=cfg.seed)
        >>> for x, y in loader: ...  # x (B, C, H, W) in [0, 1], y (B,) int64
    """
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, ImageTensorDataset):
        # A Subset of in-memory images is sliced once, so it keeps the fast batched path.
        dataset = dataset.dataset.subset(torch.as_tensor(dataset.indices, dtype=torch.int64))
    return Batches(dataset, batch_size, shuffle=shuffle, seed=seed, workers=workers)
