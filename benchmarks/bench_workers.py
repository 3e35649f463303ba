"""Wall-clock to ε* with 1, 2 and 4 workers on one PostgreSQL-backed study. Results: workers.md.

Not a test: a measurement. Each trial stands in for one adversarial training run of fixed cost
(it sleeps ``--trial-seconds`` and returns a synthetic loss curve's value), so the wall-clock
counts search *rounds*: the real :class:`epsstar.sampler.BisectionSampler`, a real Optuna
RDBStorage with heartbeats on PostgreSQL, and separate worker processes (``study.optimize``, as
``epsstar worker`` runs it) that share nothing else. The clock starts once every worker has
imported its libraries and opened the study (a real worker's start-up is seconds against
trials of minutes or hours) and stops when the last worker exits.

A bisection is sequential: with one worker each run waits for the previous one. With several,
the sampler hands each worker a different ε (before a bracket exists, the pending runs split
the range and the new run goes where one worker would go if ε* lay in the widest part; inside a
bracket, the new run is placed to split it together with the pending runs), so a search needs
fewer rounds, not n times fewer.

Usage (PostgreSQL on 127.0.0.1:5432; a throw-away database is created and dropped):
    python benchmarks/bench_workers.py                    # about 4 min on 2 CPU cores
    python benchmarks/bench_workers.py --trial-seconds 1 --workers 1 2 4 8
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import optuna

from epsstar.sampler import BisectionSampler, estimate_from_study, study_settings

PG = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
EPS_LOW, EPS_HIGH = 0.1 / 255, 64 / 255

# Synthetic R̂(θ̂(ε), ε) curves, ε in /255 units, and their threshold R*(0) (ε* in the name).
Curve = tuple[float, Callable[[float], float]]
CURVES: dict[str, Curve] = {
    # SPEC §3's worked example: clean training loss 0.0403, 0.1205 per 1/255 -> eps* = 3.33/255
    "linear-3.3": (0.441, lambda e: 0.0403 + 0.1205 * e),
    "convex-8": (0.466, lambda e: 0.05 + 0.02 * e + 0.004 * e * e),
    "concave-0.5": (0.40, lambda e: 0.2 + 0.2828427 * math.sqrt(e)),
    "linear-26": (0.36, lambda e: 0.1 + 0.01 * e),
}


# --------------------------------------------------------------------------- one worker
def _storage(url: str) -> optuna.storages.RDBStorage:
    # the heartbeat settings of epsstar.search.open_storage (not imported: it pulls in torch)
    return optuna.storages.RDBStorage(url, heartbeat_interval=20, grace_period=60)


def worker(study_name: str, url: str, go: Path, ready: Path) -> None:
    """Join the study, wait for the start signal, run trials until the sampler stops it."""
    storage = _storage(url)
    plain = optuna.load_study(study_name=study_name, storage=storage)
    settings = {k: v for k, v in study_settings(plain).items() if k != "sampler"}
    study = optuna.load_study(study_name=study_name, storage=storage,
                              sampler=BisectionSampler(**settings))
    curve = CURVES[study.user_attrs["curve"]][1]
    seconds = study.user_attrs["trial_seconds"]

    def objective(trial: optuna.Trial) -> float:
        eps = trial.suggest_float("eps", EPS_LOW, EPS_HIGH, log=True)
        time.sleep(seconds)  # the training run
        return curve(eps * 255)

    ready.touch()
    while not go.exists():
        time.sleep(0.01)
    study.optimize(objective, n_trials=settings["max_trials"])


# --------------------------------------------------------------------------- the driver
def measure(url: str, curve: str, workers: int, trial_seconds: float, rtol: float,
            tmp: Path) -> dict:
    threshold, fn = CURVES[curve]
    name = f"bench-{curve}-{workers}-{uuid.uuid4().hex[:6]}"
    sampler = BisectionSampler(threshold=threshold, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                               rtol=rtol, clean_train_loss=fn(0.0), max_trials=30)
    study = optuna.create_study(study_name=name, storage=_storage(url), sampler=sampler)
    sampler.check_study(study)
    study.set_user_attr("curve", curve)
    study.set_user_attr("trial_seconds", trial_seconds)
    go = tmp / f"{name}.go"
    ready = [tmp / f"{name}.{i}" for i in range(workers)]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", name, url, str(go),
                               str(r)]) for r in ready]
    while not all(r.exists() for r in ready):
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a worker died before the start: {[p.returncode for p in procs]}")
        time.sleep(0.05)
    start = time.perf_counter()
    go.touch()
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - start
    if any(codes):
        raise SystemExit(f"worker exit codes {codes}")
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    estimate = estimate_from_study(study)
    return {"curve": curve, "workers": workers, "wall_s": wall, "runs": len(complete),
            "rounds": wall / trial_seconds, "epsstar_255": estimate.epsstar * 255,
            "stop": sampler.stop_reason(study)}


def _database() -> tuple[str, Callable[[], None]]:
    """A fresh database on the local PostgreSQL, and how to drop it."""
    import psycopg2

    name = f"epsstar_bench_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(**PG)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE {name}")

    def drop() -> None:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.close()

    return f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{name}", drop


def report(rows: list[dict], workers: list[int]) -> str:
    base = {r["curve"]: r["wall_s"] for r in rows if r["workers"] == workers[0]}
    lines = ["| curve | workers | wall-clock (s) | runs | rounds | speed-up | eps* (/255) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['curve']} | {r['workers']} | {r['wall_s']:.1f} | {r['runs']} | "
                     f"{r['rounds']:.1f} | {base[r['curve']] / r['wall_s']:.2f}x | "
                     f"{r['epsstar_255']:.3f} |")
    lines += ["", "| workers | total wall-clock (s) | speed-up (total) | "
              "speed-up (median over curves) |", "|---|---|---|---|"]
    total1 = sum(base.values())
    for n in workers:
        mine = [r for r in rows if r["workers"] == n]
        total = sum(r["wall_s"] for r in mine)
        median = statistics.median(base[r["curve"]] / r["wall_s"] for r in mine)
        lines.append(f"| {n} | {total:.1f} | {total1 / total:.2f}x | {median:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--trial-seconds", type=float, default=2.0)
    parser.add_argument("--rtol", type=float, default=0.05)
    parser.add_argument("--curves", nargs="+", default=list(CURVES), choices=list(CURVES))
    parser.add_argument("--worker", nargs=4, metavar=("STUDY", "URL", "GO", "READY"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.worker:
        name, url, go, ready = args.worker
        worker(name, url, Path(go), Path(ready))
        return
    url, drop = _database()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for curve in args.curves:
                for n in args.workers:
                    rows.append(measure(url, curve, n, args.trial_seconds, args.rtol,
                                        Path(tmp)))
                    r = rows[-1]
                    print(f"{curve:12s} workers={n}: {r['wall_s']:5.1f} s, {r['runs']} runs, "
                          f"eps*={r['epsstar_255']:.3f}/255 ({r['stop']})", flush=True)
    finally:
        drop()
    print()
    print(report(rows, args.workers))


if __name__ == "__main__":
    main()
