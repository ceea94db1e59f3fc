"""A real OpenSSH sshd on 127.0.0.1 for SFTP tests (pytest plugin, see conftest.pytest_plugins).

``sshd_server`` (session scope) starts ``/usr/sbin/sshd -D -e`` on a free loopback port with a
throw-away ed25519 host key, a throw-away ed25519 client key in ``authorized_keys`` and
``Subsystem sftp internal-sftp``. Tests write deliveries below ``sshd_server.root`` and point
``SourceSpec.url`` at ``sshd_server.url(...)``.

When sshd/ssh-keygen are missing the fixture skips, or fails when the ``CI`` env var is set
(CI must not silently skip the SFTP tests).
"""

import dataclasses
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

SSHD = os.environ.get("CAPTI_TEST_SSHD", "/usr/sbin/sshd")
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
_START_TIMEOUT_S = 15.0


@dataclasses.dataclass(frozen=True)
class SshdServer:
    host: str
    port: int
    username: str
    client_key_path: Path
    known_hosts_path: Path  # contains "[127.0.0.1]:PORT ssh-ed25519 ..."
    root: Path  # a temp dir served over SFTP; tests write deliveries below it
    host_public_key: str  # "ssh-ed25519 AAAA..." (no host name)
    workdir: Path
    log_path: Path

    def url(self, subpath: str | os.PathLike[str] = "") -> str:
        """``sftp://user@127.0.0.1:PORT/abs/path`` for ``subpath`` (relative to ``root``)."""
        path = Path(subpath)
        if not path.is_absolute():
            path = self.root / path
        return f"sftp://{quote(self.username, safe='')}@{self.host}:{self.port}{quote(str(path))}"

    def known_hosts_line(self, port: int | None = None, public_key: str | None = None) -> str:
        return f"[{self.host}]:{port or self.port} {public_key or self.host_public_key}\n"

    def write_known_hosts(
        self, path: Path, *, port: int | None = None, public_key: str | None = None
    ) -> Path:
        """Write a known_hosts file (e.g. for a proxy port, or with a wrong key)."""
        path.write_text(self.known_hosts_line(port, public_key))
        return path

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"SFTP tests need OpenSSH sshd, but {reason} (CI is set, so not skipping)")
    pytest.skip(f"SFTP tests need OpenSSH sshd: {reason}")


def generate_ed25519_key(path: Path, comment: str = "capti-test") -> tuple[Path, str]:
    """Create an unencrypted ed25519 key pair at ``path``; returns (path, public key line)."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    pub = path.with_name(path.name + ".pub").read_text().split()
    return path, f"{pub[0]} {pub[1]}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_config(
    workdir: Path, port: int, host_key: Path, authorized_keys: Path, *, penalties: bool
) -> Path:
    lines = [
        "ListenAddress 127.0.0.1",
        f"Port {port}",
        f"HostKey {host_key}",
        f"AuthorizedKeysFile {authorized_keys}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "StrictModes no",
        "UsePAM no",
        "UseDNS no",
        f"PidFile {workdir / 'sshd.pid'}",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
        "MaxStartups 50:30:100",
    ]
    if penalties:
        lines.append(
            "PerSourcePenalties no"
        )  # OpenSSH >= 9.8 would block loopback after auth failures
    cfg = workdir / "sshd_config"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def _config_ok(cfg: Path) -> tuple[bool, str]:
    proc = subprocess.run([SSHD, "-t", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    return proc.returncode == 0, proc.stderr


def _wait_for_port(proc: subprocess.Popen, port: int, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.settimeout(2.0)
                if s.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # sshd and its per-connection children (our group)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdServer]:
    if not (os.path.isfile(SSHD) and os.access(SSHD, os.X_OK)):
        _unavailable(f"{SSHD} is not installed")
    if not (os.path.isfile(SSH_KEYGEN) and os.access(SSH_KEYGEN, os.X_OK)):
        _unavailable(f"{SSH_KEYGEN} is not installed")

    workdir = tmp_path_factory.mktemp("sshd")
    os.chmod(workdir, 0o700)
    root = workdir / "sftp-root"
    root.mkdir(mode=0o700)
    host_key, host_pub = generate_ed25519_key(workdir / "ssh_host_ed25519_key", "capti-test-host")
    client_key, client_pub = generate_ed25519_key(workdir / "client_ed25519", "capti-test-client")
    authorized_keys = workdir / "authorized_keys"
    authorized_keys.write_text(client_pub + "\n")
    os.chmod(authorized_keys, 0o600)

    # sshd's privilege-separation directory; harmless if it already exists.
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)

    log_path = workdir / "sshd.log"
    proc: subprocess.Popen | None = None
    port = 0
    last_error = ""
    for _attempt in range(3):  # a free port can be taken between probing and binding
        port = _free_port()
        cfg = _write_config(workdir, port, host_key, authorized_keys, penalties=True)
        ok, err = _config_ok(cfg)
        if not ok and "PerSourcePenalties" in err:
            cfg = _write_config(workdir, port, host_key, authorized_keys, penalties=False)
            ok, err = _config_ok(cfg)
        if not ok:
            _unavailable(f"sshd rejected the test config: {err.strip()}")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(cfg)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if _wait_for_port(proc, port, time.monotonic() + _START_TIMEOUT_S):
            break
        _stop(proc)
        last_error = log_path.read_text(errors="replace")[-2000:]
        proc = None
    if proc is None:
        _unavailable(f"sshd did not start on 127.0.0.1; log tail:\n{last_error}")
    assert proc is not None

    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
    server = SshdServer(
        host="127.0.0.1",
        port=port,
        username=getpass.getuser(),
        client_key_path=client_key,
        known_hosts_path=known_hosts,
        root=root,
        host_public_key=host_pub,
        workdir=workdir,
        log_path=log_path,
    )
    try:
        yield server
    finally:
        _stop(proc)
