"""Attack cost benchmarks (a script, not a test). Results and the exact command: attacks.md.

(a) one PGD step ÷ one training step on the same batch (target ≤ 0.75): a PGD step is a forward
    pass and a backward pass to the *input* only; a training step is a forward pass, a full
    backward pass (input and weight gradients) and an optimizer step.
(b) a PGD-k adversarial-training epoch ÷ a clean epoch on digits, against the ideal (2k+3)/3
    (a forward pass = 1 unit, a backward pass = 2, an input-only backward = 1; target ≤ 1.1×).
(c) our PGD vs torchattacks' PGD on the same model and batch (eval mode, as torchattacks runs
    attacks), in images per second.

Every ratio is measured side by side in one run: the two timed blocks alternate repetition by
repetition and last about as long as each other, so drifts in machine load hit both alike, and
the fastest repetition of each is kept (other processes only ever add time). On CPU the clock is
this process's CPU time, not wall time: on a shared machine, time spent waiting for a core held by
another process is not our cost (run with --threads 1 so CPU time is the time of one thread's
work). On CUDA it is wall time between synchronisations.

Usage:
    python benchmarks/bench_attacks.py                                  # CPU suite
    python benchmarks/bench_attacks.py --device cuda --arch preact_resnet18 --cifar-shaped

torchattacks is a benchmark-only extra (``pip install torchattacks``); without it (c) is skipped.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from epsstar.attacks import default_step_size, pgd
from epsstar.config import TrainConfig
from epsstar.data import load_data, make_loader
from epsstar.losses import training_loss
from epsstar.models import build_model

EPS = 8 / 255  # pixel units, L∞
STEPS = 10


# --------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def side_by_side(
    fns: dict[str, Callable[[], None]], reps: int, device: torch.device, min_seconds: float = 3.0
) -> dict[str, float]:
    """Best-of-n seconds per call of each function, calls interleaved, after a warm-up.

    n is at least ``reps``, and cheap functions repeat until ``min_seconds`` have passed (at
    most 500 times): a best-of-n over milliseconds-long calls needs many tries to catch a
    quiet moment of a shared machine.
    """
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    n = 0
    while n < reps or (time.perf_counter() - start < min_seconds and n < 500):
        n += 1
        for name, fn in fns.items():
            _sync(device)
            t0 = clock()
            fn()
            _sync(device)
            times[name].append(clock() - t0)
    return {name: min(ts) for name, ts in times.items()}


# ---------------------------------------------------------------------------------- models


def make_model(arch: str, width: int, channels: int, size: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(
        arch,
        num_classes=10,
        in_channels=channels,
        image_size=size,
        width=width,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
    )
    return model.to(device)


def random_batch(batch: int, channels: int, size: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, channels, size, size, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return x.to(device), y.to(device)


# ------------------------------------------------------------------------------- benchmarks


def step_ratio(
    model: nn.Module, x, y, reps: int, device: torch.device, steps: int = STEPS
) -> dict[str, float]:
    """(a): seconds per PGD step (timed over a PGD-``steps`` attack) and per training step on the
    batch (x, y), model in train mode (as during adversarial training)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step_size = default_step_size(EPS, steps)

    def train_steps() -> None:
        # As many training steps as the attack has steps: both timed blocks last about as long,
        # so a best-of-n does not favour the shorter one.
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    def attack() -> None:
        pgd(model, x, y, eps=EPS, norm="linf", steps=steps, step_size=step_size)

    t = side_by_side({"train": train_steps, "pgd": attack}, reps, device)
    return {
        "pgd_step_ms": 1e3 * t["pgd"] / steps,
        "train_step_ms": 1e3 * t["train"] / steps,
        "ratio": t["pgd"] / t["train"],
    }


def epoch_ratio(arch: str, width: int, reps: int, device: torch.device) -> dict[str, float]:
    """(b): one digits epoch (1437 images, batch 128) of PGD-10 AT ÷ one clean epoch."""
    bundle = load_data(TrainConfig(dataset="digits"))
    model = build_model(
        arch,
        num_classes=bundle.num_classes,
        in_channels=bundle.in_channels,
        image_size=bundle.image_size,
        width=width,
        mean=bundle.mean,
        std=bundle.std,
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loader = make_loader(bundle.train, 128, shuffle=True, seed=0)

    ideal = (2 * STEPS + 3) / 3
    clean_epochs = round(ideal)  # the clean block lasts about as long as one adversarial epoch

    def epochs(cfg: TrainConfig, n: int) -> Callable[[], None]:
        def run() -> None:
            model.train()
            for x, y in (batch for _ in range(n) for batch in loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                objective, _ = training_loss(model, x, y, cfg)
                opt.zero_grad(set_to_none=True)
                objective.backward()
                opt.step()

        return run

    clean, adv = TrainConfig(eps=0.0), TrainConfig(eps=EPS, steps=STEPS)
    blocks = {"clean": epochs(clean, clean_epochs), "adv": epochs(adv, 1)}
    t = side_by_side(blocks, reps, device)
    t["clean"] /= clean_epochs
    ratio = t["adv"] / t["clean"]
    return {
        "clean_epoch_ms": 1e3 * t["clean"],
        "adv_epoch_ms": 1e3 * t["adv"],
        "ratio": ratio,
        "ratio_over_ideal": ratio / ideal,
    }


def throughput(
    model: nn.Module, x, y, reps: int, device: torch.device, steps: int = STEPS
) -> dict[str, float] | None:
    """(c): images/s of our PGD-``steps`` and torchattacks' on the same model and batch, in eval
    mode. None when torchattacks is not installed."""
    try:
        import torchattacks
    except ImportError:
        return None
    model.eval()
    step_size = default_step_size(EPS, steps)
    theirs = torchattacks.PGD(model, eps=EPS, alpha=step_size, steps=steps, random_start=True)

    def ours() -> None:
        pgd(model, x, y, eps=EPS, norm="linf", steps=steps, step_size=step_size)

    t = side_by_side({"epsstar": ours, "torchattacks": lambda: theirs(x, y)}, reps, device)
    ips = {name: len(x) / s for name, s in t.items()}
    return {
        "epsstar_img_s": ips["epsstar"],
        "torchattacks_img_s": ips["torchattacks"],
        "speedup": ips["epsstar"] / ips["torchattacks"],
    }


# ----------------------------------------------------------------------------------- report


def _fmt(row: dict[str, float]) -> str:
    return ", ".join(f"{k} = {v:.3g}" for k, v in row.items())


def suite(device: torch.device, reps: int, resnet_steps: int) -> None:
    """The default run: small models on digits-shaped batches, PreActResNet18 on a CIFAR-shaped
    batch of 32 (on CPU one of its training steps takes seconds, hence fewer PGD steps: the cost
    per step does not depend on the number of steps)."""
    cases = [  # (label, arch, width, channels, size, batch, PGD steps)
        ("digits MLP h=64, batch 128", "mlp", 64, 1, 8, 128, STEPS),
        ("digits CNN h=128, batch 128", "cnn", 128, 1, 8, 128, STEPS),
        ("PreActResNet18 3x32x32, batch 32", "preact_resnet18", 1, 3, 32, 32, resnet_steps),
    ]
    print("(a) PGD step / training step (target <= 0.75)")
    for label, arch, width, c, s, b, k in cases:
        model, (x, y) = make_model(arch, width, c, s, device), random_batch(b, c, s, device)
        print(f"  {label}, PGD-{k}: {_fmt(step_ratio(model, x, y, reps, device, k))}")
    print(f"(b) PGD-{STEPS} AT epoch / clean epoch on digits (ideal {(2 * STEPS + 3) / 3:.2f})")
    for label, arch, width in (("MLP h=64", "mlp", 64), ("CNN h=16", "cnn", 16)):
        print(f"  {label}: {_fmt(epoch_ratio(arch, width, reps, device))}")
    print("(c) PGD images/s, epsstar vs torchattacks (eval mode)")
    for label, arch, width, c, s, b, k in cases:
        model, (x, y) = make_model(arch, width, c, s, device), random_batch(b, c, s, device)
        row = throughput(model, x, y, reps, device, k)
        print(f"  {label}, PGD-{k}: {_fmt(row) if row else 'torchattacks not installed'}")


def single(args: argparse.Namespace, device: torch.device) -> None:
    """One architecture on one random batch: (a) and (c)."""
    c, s = (3, 32) if args.cifar_shaped else (1, 8)
    model = make_model(args.arch, args.width, c, s, device)
    x, y = random_batch(args.batch_size, c, s, device)
    label = f"{args.arch} {c}x{s}x{s}, batch {args.batch_size}, PGD-{args.steps}"
    print(f"(a) {label}: {_fmt(step_ratio(model, x, y, args.reps, device, args.steps))}")
    row = throughput(model, x, y, args.reps, device, args.steps)
    print(f"(c) {label}: {_fmt(row) if row else 'torchattacks not installed'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement")
    parser.add_argument("--arch", help="benchmark one architecture instead of the suite")
    parser.add_argument("--width", type=int, default=1, help="width of --arch")
    parser.add_argument("--cifar-shaped", action="store_true", help="3x32x32 inputs for --arch")
    parser.add_argument("--batch-size", type=int, default=128, help="batch of --arch")
    parser.add_argument("--steps", type=int, default=STEPS, help="PGD steps of --arch")
    parser.add_argument("--resnet-steps", type=int, default=2, help="PGD steps, suite ResNet")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        # One thread is the robust choice on a shared CPU: OpenMP threads that wait for a core
        # held by another process slow every small kernel by an order of magnitude.
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    threads = torch.get_num_threads()
    print(f"device: {device} ({name}); torch {torch.__version__}; {threads} CPU threads")
    print(f"best of >= {args.reps} timed repetitions per number; eps = 8/255 (L-inf)")
    if args.arch:
        single(args, device)
    else:
        suite(device, args.reps, args.resnet_steps)


if __name__ == "__main__":
    main()
