"""land_delivery over SFTP against a real OpenSSH sshd on loopback (no mocks of paramiko)."""

import os
import socket
import stat
import threading
import time
import uuid
from pathlib import Path

import pytest

from capti_pipeline.lib.intake import (
    DeliveryNotReady,
    DeliveryRefused,
    PermanentSourceError,
    SourceSpec,
    TransientSourceError,
    land_delivery,
    observe_delivery,
)
from capti_pipeline_tests.lib.test_intake import (
    DELIVERY,
    WINDOW,
    _grow_during,
    assert_landed,
    leftovers,
    write_loose,
    write_zip,
)
from capti_pipeline_tests.support.sshd import SshdServer, generate_ed25519_key

pytestmark = [pytest.mark.sftp, pytest.mark.timeout(60)]


@pytest.fixture
def folder(sshd_server: SshdServer) -> Path:
    """A fresh delivery folder served over SFTP."""
    path = sshd_server.root / uuid.uuid4().hex
    path.mkdir()
    return path


@pytest.fixture
def landing(tmp_path: Path) -> Path:
    (tmp_path / "landing").mkdir()
    return tmp_path / "landing" / "d1-2026-01-01"


def spec_for(server: SshdServer, folder: Path, **overrides) -> SourceSpec:
    kw = {
        "url": server.url(folder),
        "sftp_key_path": str(server.client_key_path),
        "known_hosts_path": str(server.known_hosts_path),
        "connect_timeout_s": 10.0,
        "io_timeout_s": 10.0,
    }
    kw.update(overrides)
    return SourceSpec(**kw)


def assert_nothing_landed(landing: Path) -> None:
    assert not landing.exists()
    assert leftovers(landing.parent) == []


def test_sftp_loose_delivery_lands_byte_identical(sshd_server, folder, landing) -> None:
    files = {
        **DELIVERY,
        "demographics.csv": os.urandom(3 * 1024 * 1024),
    }  # multi-MB: exercises prefetch
    write_loose(folder, files)
    (folder / "readme.txt").write_text("ignored")

    result = land_delivery(spec_for(sshd_server, folder), landing, stability_window_s=WINDOW)

    assert_landed(result, landing, files)
    assert result.source_kind == "sftp"
    assert result.archive_name is None
    assert stat.S_IMODE(landing.stat().st_mode) == 0o700


def test_sftp_zip_delivery_matches_loose(sshd_server, folder, landing, tmp_path) -> None:
    loose = land_delivery(
        SourceSpec(url=str(write_loose(tmp_path / "loose"))),
        tmp_path / "loose-landed",
        stability_window_s=0,
    )
    write_zip(folder, [(f"OneRoster/{n}", d) for n, d in DELIVERY.items()], "OneRoster_2026.zip")

    result = land_delivery(spec_for(sshd_server, folder), landing, stability_window_s=WINDOW)

    assert_landed(result, landing, DELIVERY)
    assert result.archive_name == "OneRoster_2026.zip"
    assert result.fingerprint == loose.fingerprint


def test_sftp_unsafe_zip_is_refused(sshd_server, folder, landing) -> None:
    write_zip(folder, [*DELIVERY.items(), ("../../evil.csv", b"x")])
    with pytest.raises(DeliveryRefused, match="path traversal"):
        land_delivery(spec_for(sshd_server, folder), landing, stability_window_s=WINDOW)
    assert_nothing_landed(landing)


def test_wrong_host_key_is_permanent(sshd_server, folder, landing, tmp_path) -> None:
    write_loose(folder)
    _, other_key = generate_ed25519_key(tmp_path / "impostor")
    kh = sshd_server.write_known_hosts(tmp_path / "known_hosts", public_key=other_key)

    with pytest.raises(PermanentSourceError) as ei:
        land_delivery(
            spec_for(sshd_server, folder, known_hosts_path=str(kh)),
            landing,
            stability_window_s=WINDOW,
        )

    msg = str(ei.value)
    assert f"host key for [127.0.0.1]:{sshd_server.port} does not match known_hosts {kh}" in msg
    assert "SHA256:" in msg
    assert_nothing_landed(landing)


def test_unknown_host_is_permanent(sshd_server, folder, landing, tmp_path) -> None:
    write_loose(folder)
    kh = tmp_path / "empty_known_hosts"
    kh.write_text("")
    with pytest.raises(
        PermanentSourceError, match=rf"\[127\.0\.0\.1\]:{sshd_server.port} is not in known_hosts"
    ):
        land_delivery(
            spec_for(sshd_server, folder, known_hosts_path=str(kh)),
            landing,
            stability_window_s=WINDOW,
        )
    assert_nothing_landed(landing)

    # a known_hosts entry without the [host]:port form does not match a non-22 port either
    kh.write_text(f"127.0.0.1 {sshd_server.host_public_key}\n")
    with pytest.raises(PermanentSourceError, match="not in known_hosts"):
        observe_delivery(spec_for(sshd_server, folder, known_hosts_path=str(kh)))


def test_missing_known_hosts_file_is_permanent(sshd_server, folder, landing, tmp_path) -> None:
    with pytest.raises(PermanentSourceError, match=r"known_hosts file .* not found"):
        land_delivery(
            spec_for(sshd_server, folder, known_hosts_path=str(tmp_path / "nope")),
            landing,
            stability_window_s=WINDOW,
        )
    assert_nothing_landed(landing)


def test_wrong_client_key_is_permanent(sshd_server, folder, landing, tmp_path) -> None:
    write_loose(folder)
    key, _ = generate_ed25519_key(tmp_path / "not_authorized")
    with pytest.raises(
        PermanentSourceError, match=f"authentication failed for user {sshd_server.username}"
    ):
        land_delivery(
            spec_for(sshd_server, folder, sftp_key_path=str(key)),
            landing,
            stability_window_s=WINDOW,
        )
    assert_nothing_landed(landing)


def test_password_auth_failure_never_reveals_the_password(
    sshd_server, folder, landing, monkeypatch
) -> None:
    secret = "S3cret-" + uuid.uuid4().hex
    monkeypatch.setenv("CAPTI_TEST_SFTP_PASSWORD", secret)
    spec = spec_for(
        sshd_server, folder, sftp_key_path=None, password_env="CAPTI_TEST_SFTP_PASSWORD"
    )
    with pytest.raises(PermanentSourceError) as ei:  # the test sshd has PasswordAuthentication no
        land_delivery(spec, landing, stability_window_s=WINDOW)
    assert "authentication failed" in str(ei.value)
    assert secret not in str(ei.value)
    assert secret not in repr(ei.value.__cause__) and secret not in repr(ei.value.__context__)
    assert secret not in repr(spec.password_env)

    monkeypatch.delenv("CAPTI_TEST_SFTP_PASSWORD")
    with pytest.raises(PermanentSourceError, match=r"CAPTI_TEST_SFTP_PASSWORD .*is not set"):
        land_delivery(spec, landing, stability_window_s=WINDOW)
    assert_nothing_landed(landing)


def test_missing_remote_folder_is_permanent(sshd_server, landing) -> None:
    missing = sshd_server.root / "no-such-district"
    with pytest.raises(PermanentSourceError, match="does not exist"):
        land_delivery(spec_for(sshd_server, missing), landing, stability_window_s=WINDOW)
    assert_nothing_landed(landing)


def test_connection_refused_is_transient(sshd_server, folder, landing, tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    kh = sshd_server.write_known_hosts(tmp_path / "kh", port=port)
    url = sshd_server.url(folder).replace(f":{sshd_server.port}/", f":{port}/")
    with pytest.raises(TransientSourceError):
        land_delivery(
            spec_for(sshd_server, folder, url=url, known_hosts_path=str(kh)),
            landing,
            stability_window_s=0,
        )
    assert_nothing_landed(landing)


def test_missing_manifest_over_sftp_is_not_ready(sshd_server, folder, landing) -> None:
    write_loose(folder, {k: v for k, v in DELIVERY.items() if k != "manifest.csv"})
    with pytest.raises(DeliveryNotReady, match=r"manifest\.csv not present yet"):
        land_delivery(spec_for(sshd_server, folder), landing, stability_window_s=WINDOW)
    assert_nothing_landed(landing)


def test_empty_remote_folder_is_not_ready(sshd_server, folder, landing) -> None:
    with pytest.raises(DeliveryNotReady, match="empty"):
        land_delivery(spec_for(sshd_server, folder), landing, stability_window_s=WINDOW)


def test_file_growing_during_window_over_sftp_is_not_ready(sshd_server, folder, landing) -> None:
    write_loose(folder)
    grower = _grow_during(folder / "enrollments.csv", 10 * WINDOW)
    try:
        with pytest.raises(DeliveryNotReady, match=r"enrollments\.csv changed size"):
            land_delivery(spec_for(sshd_server, folder), landing, stability_window_s=2 * WINDOW)
    finally:
        grower.join()
    assert_nothing_landed(landing)


def test_observe_delivery_over_sftp(sshd_server, folder) -> None:
    write_loose(folder)
    (folder / ".users.csv.part").write_bytes(b"partial")
    seen = observe_delivery(spec_for(sshd_server, folder))
    assert sorted(seen) == sorted([*DELIVERY, ".users.csv.part"])
    st = (folder / "users.csv").stat()
    assert seen["users.csv"] == (
        st.st_size,
        float(int(st.st_mtime)),
    )  # SFTP v3 mtime: whole seconds


class DroppingProxy:
    """Loopback TCP proxy to sshd that closes both sockets after N bytes of server->client data."""

    def __init__(self, target_port: int, drop_after: int) -> None:
        self._target = ("127.0.0.1", target_port)
        self._drop_after = drop_after
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.forwarded = 0
        self.dropped = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        upstream = socket.create_connection(self._target)
        self._socks += [client, upstream]
        for src, dst, counted in ((client, upstream, False), (upstream, client, True)):
            t = threading.Thread(target=self._pump, args=(src, dst, counted), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                if counted:
                    self.forwarded += len(data)
                    if self.forwarded >= self._drop_after:
                        self.dropped.set()
                        break
        except OSError:
            pass
        self._close_all()

    def _close_all(self) -> None:
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._listener.close()
        self._close_all()
        for t in self._threads:
            t.join(timeout=5)


def _wait_for_prefetch_threads(timeout: float = 5.0) -> None:
    """Let paramiko's prefetch threads finish inside the test (so their noise is attributed here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(
        "_prefetch_thread" in t.name for t in threading.enumerate()
    ):
        time.sleep(0.05)


# paramiko's own prefetch thread may die with "Socket is closed" once the link is gone; that is
# paramiko-internal noise, the failure that matters is raised to the caller and asserted below.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_connection_dropped_mid_download_is_transient_and_leaves_nothing(
    sshd_server, folder, landing, tmp_path
) -> None:
    big = os.urandom(6 * 1024 * 1024)
    write_loose(folder, {**DELIVERY, "users.csv": big})
    proxy = DroppingProxy(sshd_server.port, drop_after=1_500_000)
    try:
        kh = sshd_server.write_known_hosts(tmp_path / "kh_proxy", port=proxy.port)
        url = sshd_server.url(folder).replace(f":{sshd_server.port}/", f":{proxy.port}/")
        spec = spec_for(sshd_server, folder, url=url, known_hosts_path=str(kh), io_timeout_s=5.0)
        with pytest.raises(TransientSourceError, match="SFTP"):
            land_delivery(spec, landing, stability_window_s=WINDOW)
        assert proxy.dropped.is_set()
        assert proxy.forwarded < len(big)  # it really was mid-download
    finally:
        proxy.close()
        _wait_for_prefetch_threads()
    assert_nothing_landed(landing)
