"""Throwaway PostgreSQL cluster for tests (pytest plugin, registered in ``conftest.py``).

One cluster per test session (per xdist worker): ``initdb`` into a temp dir, ``pg_ctl start`` on a
free loopback port with durability switched off, ``pg_ctl stop -m immediate`` + delete at teardown.

Fixtures:

* ``postgres_server`` (session) -> :class:`PostgresServer` with ``host``, ``port``, ``user``,
  ``create_database(name) -> url`` and ``dagster_storage_config(dbname) -> dict``.
* ``postgres_url`` (function) -> SQLAlchemy URL of a fresh, empty database for one test.

Binaries: ``/usr/lib/postgresql/15/bin``, else ``pg_config --bindir``, else the newest
``/usr/lib/postgresql/*/bin``. Missing binaries (or, as root, a missing ``postgres`` OS user) skip
the requesting tests with a reason -- except when ``CI`` is set, where they fail: a missing
component in CI is a broken build, never a silent skip. Tests using these fixtures carry
``@pytest.mark.postgres``.

PostgreSQL refuses to run as root, so when the tests run as root every server-side command goes
through ``runuser -u postgres --`` and the temp dir is created under ``/tmp`` and chowned to
``postgres`` (``$TMPDIR`` may live under an untraversable ``/root``).
"""

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

PREFERRED_BINDIR = Path("/usr/lib/postgresql/15/bin")
SUPERUSER = "capti"
HOST = "127.0.0.1"
_OS_USER = "postgres"  # the account that owns and runs the cluster when tests run as root
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_DB_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_START_ATTEMPTS = 3  # a free port can be taken between probing and binding (xdist workers)


@dataclass
class PostgresServer:
    """A running throwaway cluster. Trust auth: no password anywhere."""

    host: str
    port: int
    user: str
    bindir: Path
    base_dir: Path
    startup_seconds: float = 0.0  # initdb + pg_ctl start, wall clock

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.base_dir / "sock"

    @property
    def log_file(self) -> Path:
        return self.base_dir / "postgres.log"

    def url(self, dbname: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) for an existing database."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        """Create an empty database ``name`` (lowercase identifier) and return its SQLAlchemy URL."""
        if not _DB_NAME_RE.match(name):
            raise ValueError(f"database name must match {_DB_NAME_RE.pattern!r}, got {name!r}")
        import psycopg  # deferred: only needed once a cluster exists

        with psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True
        ) as conn:
            # template0: never blocked by a leftover connection to template1.
            conn.execute(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'")
        return self.url(name)

    def dagster_storage_config(self, dbname: str) -> dict[str, Any]:
        """``storage:`` block of a Dagster ``dagster.yaml`` for database ``dbname`` (must exist)."""
        return {
            "postgres": {
                "postgres_db": {
                    # dagster-postgres needs psycopg2; SQLAlchemy 2.1's default driver is psycopg 3.
                    "scheme": "postgresql+psycopg2",
                    "username": self.user,
                    "hostname": self.host,
                    "db_name": dbname,
                    "port": self.port,
                }
            }
        }


# ##### BINARY LOOKUP


def _has_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _version_key(path: Path) -> tuple[int, ...]:
    digits = re.findall(r"\d+", path.parent.name)
    return tuple(int(d) for d in digits) or (0,)


def find_postgres_bindir() -> Path | None:
    """Directory holding initdb/pg_ctl/postgres, or None."""
    if _has_binaries(PREFERRED_BINDIR):
        return PREFERRED_BINDIR
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out and _has_binaries(Path(out)):
                return Path(out)
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        if _has_binaries(candidate):
            return candidate
    return None


def skip_or_fail(reason: str) -> NoReturn:
    """Fail under CI (a missing component is a broken build), skip elsewhere."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


# ##### CLUSTER LIFECYCLE


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _as_cluster_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", _OS_USER, "--", *cmd] if _is_root() else cmd


def _run(cmd: list[str], *, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    env.pop("PGDATA", None)
    return subprocess.run(
        _as_cluster_owner(cmd),
        cwd=cwd,  # postgres may not be able to read the caller's cwd
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _make_base_dir() -> Path:
    """Temp dir holding data/ (made by initdb), sock/ and the server log, owned by the runner."""
    if not _is_root():
        base = Path(tempfile.mkdtemp(prefix="capti-pg-"))
        (base / "sock").mkdir(mode=0o700)
        return base
    import pwd

    try:
        owner = pwd.getpwnam(_OS_USER)
    except KeyError:
        skip_or_fail(f"running as root but there is no {_OS_USER!r} OS user to run PostgreSQL")
    # /tmp is world-traversable; $TMPDIR might not be (e.g. under /root).
    base = Path(tempfile.mkdtemp(prefix="capti-pg-", dir="/tmp"))
    (base / "sock").mkdir(mode=0o700)
    for path in (base, base / "sock"):
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return base


def start_postgres(bindir: Path, settings: dict[str, str] | None = None) -> PostgresServer:
    """initdb + start a cluster (extra server `settings`, e.g. memory for the benchmark); the
    caller must :func:`stop_postgres` it."""
    started = time.perf_counter()
    base = _make_base_dir()
    server = PostgresServer(host=HOST, port=0, user=SUPERUSER, bindir=bindir, base_dir=base)
    try:
        initdb = _run(
            [
                str(bindir / "initdb"),
                "-D",
                str(server.data_dir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",  # deterministic, independent of the host's installed locales
                "--no-sync",
            ],
            cwd=base,
            timeout=120,
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stderr}")

        last_error = ""
        for _ in range(_START_ATTEMPTS):
            port = _free_port()
            options = (
                f"-p {port} -k {server.socket_dir} -c listen_addresses={HOST}"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            ) + "".join(f" -c {name}={value}" for name, value in (settings or {}).items())
            start = _run(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(server.data_dir),
                    "-l",
                    str(server.log_file),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
                cwd=base,
                timeout=90,
            )
            if start.returncode == 0:
                server.port = port
                server.startup_seconds = time.perf_counter() - started
                return server
            last_error = f"{start.stdout}\n{start.stderr}\n--- log ---\n{_tail(server.log_file)}"
            if "could not bind" not in last_error and "in use" not in last_error:
                break
        raise RuntimeError(f"pg_ctl start failed:\n{last_error}")
    except BaseException:
        if (server.data_dir / "postmaster.pid").exists():  # e.g. pg_ctl -w timed out
            stop_postgres(server)
        else:
            _remove(base)
        raise


def stop_postgres(server: PostgresServer) -> None:
    """Stop immediately (no checkpoint: the data is thrown away) and delete the directory."""
    try:
        pid = _postmaster_pid(server)
        stop = _run(
            [str(server.bindir / "pg_ctl"), "-D", str(server.data_dir), "stop", "-m", "immediate"],
            cwd=server.base_dir,
            timeout=60,
        )
        if stop.returncode != 0 and pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)  # our own postmaster, by pid
    finally:
        _remove(server.base_dir)


def _postmaster_pid(server: PostgresServer) -> int | None:
    try:
        return int((server.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ##### FIXTURES


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for the whole session (one per xdist worker)."""
    bindir = find_postgres_bindir()
    if bindir is None:
        skip_or_fail(
            "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/15/bin, "
            "`pg_config --bindir`, /usr/lib/postgresql/*/bin); install postgresql-15"
        )
    try:
        server = start_postgres(bindir)
    except RuntimeError as exc:
        pytest.fail(f"could not start the throwaway PostgreSQL cluster: {exc}", pytrace=False)
    try:
        yield server
    finally:
        stop_postgres(server)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """SQLAlchemy URL of a fresh, empty database private to this test."""
    return postgres_server.create_database(f"test_{uuid.uuid4().hex[:16]}")
