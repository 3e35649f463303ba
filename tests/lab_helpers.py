"""The real services of a lab, for tests: fresh PostgreSQL databases on 127.0.0.1:5432 and an
``mlflow server`` started by deploy/tracking-server.sh (basic-auth, proxied artifacts) on a free
loopback port.

The ``lab`` fixture (module scope) creates ``epsstar_test_<random>_{mlflow,optuna,auth}``, starts
the server, points this process and every subprocess at it through the environment (admin
credentials, heartbeats every second) and drops the databases at the end. PostgreSQL
unreachable is a test *failure*, not a skip: the lab tests are the only check that the
multi-worker path works at all.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest

REPO = Path(__file__).resolve().parents[1]
PG = dict(host="127.0.0.1", port=5432, user="postgres", dbname="postgres")
# The cheap training configuration: a trial takes a couple of seconds on one core.
TINY = dict(dataset="digits", arch="mlp", width=16, epochs=4, steps=3, batch_size=64, lr=0.1,
            device="cpu")
HEARTBEAT_S, GRACE_S = 1, 3  # Optuna heartbeats: a killed worker's trial is stale after 3 s
ADMIN = "admin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_url(db: str) -> str:
    return f"postgresql+psycopg2://{PG['user']}@{PG['host']}:{PG['port']}/{db}"


def _connect():
    import psycopg2

    try:
        conn = psycopg2.connect(connect_timeout=5, **PG)
    except psycopg2.OperationalError as err:
        pytest.fail(f"PostgreSQL at {PG['host']}:{PG['port']} is unreachable (the lab tests "
                    f"need it; .ci/run starts it): {str(err).strip()}")
    conn.autocommit = True  # CREATE / DROP DATABASE cannot run inside a transaction
    return conn


@dataclass
class TrackingServer:
    """``deploy/tracking-server.sh`` as a subprocess in its own process group (the server
    forks HTTP workers; stopping the group stops them all)."""

    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the server's lifetime
        self.proc = subprocess.Popen([str(REPO / "deploy" / "tracking-server.sh")], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=self.log_path.parent,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({self.proc.returncode}):\n{self._tail()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server not healthy after {timeout:.0f} s:\n{self._tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        _kill_group_leftovers(self.proc.pid)

    def _tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def _kill_group_leftovers(pgid: int) -> None:
    """Uvicorn's workers may outlive their parent by a moment; they are in our group."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass
class Lab:
    """Handles on the running services (see the module docstring)."""

    root: Path
    server: TrackingServer
    databases: dict[str, str]  # role (mlflow | optuna | auth) -> database name
    password: str  # the admin's; must never reach the tracking or Optuna store
    artifacts: Path
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def tracking_uri(self) -> str:
        return self.server.uri

    @property
    def optuna_url(self) -> str:
        return pg_url(self.databases["optuna"])

    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(self.tracking_uri)

    def spawn_worker(self, study_name: str, checkpoint_dir: Path,
                     env: dict[str, str] | None = None) -> subprocess.Popen:
        """``epsstar worker`` joining the study, as a separate process (like another machine
        when ``checkpoint_dir`` differs: only the artifact store is shared)."""
        cmd = [sys.executable, "-m", "epsstar", "worker", "--study-name", study_name,
               "--storage", self.optuna_url, "--checkpoint-dir", str(checkpoint_dir),
               "--log-model", "false"]
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=self.root)
        self.workers.append(proc)
        return proc

    def rows_containing(self, text: str) -> list[str]:
        """Every row of every table of the tracking and Optuna databases whose text contains
        ``text`` (as ``db.table``)."""
        import psycopg2

        hits = []
        for role in ("mlflow", "optuna"):
            with psycopg2.connect(**{**PG, "dbname": self.databases[role]}) as conn, \
                    conn.cursor() as cur:
                cur.execute("SELECT table_name FROM information_schema.tables "
                            "WHERE table_schema = 'public'")
                for (table,) in cur.fetchall():
                    cur.execute(f'SELECT count(*) FROM "{table}" AS t '
                                "WHERE position(%s in t::text) > 0", (text,))
                    if cur.fetchone()[0]:
                        hits.append(f"{self.databases[role]}.{table}")
            conn.close()
        return hits

    def files_containing(self, text: str) -> list[Path]:
        needle = text.encode()
        return [p for p in self.artifacts.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _create_databases(conn, base: str) -> dict[str, str]:
    names = {role: f"{base}_{role}" for role in ("mlflow", "optuna", "auth")}
    with conn.cursor() as cur:
        for name in names.values():
            cur.execute(f"CREATE DATABASE {name}")
    return names


def _drop_databases(names: dict[str, str]) -> None:
    conn = _connect()
    with conn.cursor() as cur:
        for name in names.values():
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    conn.close()


def _auth_config(root: Path, auth_db: str) -> Path:
    """deploy/basic_auth.ini with this session's users database."""
    text = (REPO / "deploy" / "basic_auth.ini").read_text()
    default = "postgresql+psycopg2://postgres@127.0.0.1:5432/epsstar_auth"
    assert default in text
    path = root / "basic_auth.ini"
    path.write_text(text.replace(default, pg_url(auth_db)))
    return path


def _lab_env(lab_root: Path, port: int, password: str, names: dict[str, str]) -> dict[str, str]:
    """What the server, this process and every worker see."""
    return {
        # the server (deploy/tracking-server.sh)
        "EPSSTAR_BACKEND_URI": pg_url(names["mlflow"]),
        "EPSSTAR_ARTIFACTS": str(lab_root / "artifacts"),
        "EPSSTAR_PORT": str(port),
        "EPSSTAR_SERVER_WORKERS": "1",
        "MLFLOW_AUTH_CONFIG_PATH": str(_auth_config(lab_root, names["auth"])),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        # the clients
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}",
        "MLFLOW_TRACKING_USERNAME": ADMIN,
        "MLFLOW_TRACKING_PASSWORD": password,
        "EPSSTAR_HEARTBEAT_S": str(HEARTBEAT_S),
        "EPSSTAR_GRACE_S": str(GRACE_S),
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    conn = _connect()
    root = tmp_path_factory.mktemp("lab")
    names = _create_databases(conn, f"epsstar_test_{secrets.token_hex(4)}")
    conn.close()
    password = f"pw-{secrets.token_hex(12)}"
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        for key, value in _lab_env(root, port, password, names).items():
            mp.setenv(key, value)
        server = TrackingServer(dict(os.environ), port, root / "server.log")
        lab = Lab(root, server, names, password, root / "artifacts")
        try:
            server.start()
            mlflow.set_tracking_uri(server.uri)
            yield lab
        finally:
            for proc in lab.workers:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            server.stop()
            mlflow.set_tracking_uri(None)
            _drop_databases(names)
