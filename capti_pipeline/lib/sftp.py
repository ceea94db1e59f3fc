"""paramiko SFTP client for delivery intake (pure, Dagster-free).

Follows the project style guide §5: project-owned known_hosts + ``RejectPolicy`` (never AutoAdd),
key auth via ``PKey.from_path`` (or a password from the environment variable named by
``SourceSpec.password_env``), no agent / no ~/.ssh keys, every timeout set, keepalive, a per-read
channel timeout and bounded prefetch. paramiko/socket errors are mapped to the intake errors:

- unknown or changed host key, authentication failure, unreadable key, missing folder,
  permission denied -> ``PermanentSourceError``
- timeouts, resets, EOF, other SSH errors while connecting or transferring -> ``TransientSourceError``

Passwords and key material never appear in messages.
"""

import os
import posixpath
import socket
import stat
from typing import BinaryIO

import paramiko

from capti_pipeline.lib.intake import (
    ParsedSource,
    PermanentSourceError,
    RemoteEntry,
    SourceSpec,
    TransientSourceError,
    kind_from_mode,
)

PREFETCH_MAX_REQUESTS = 64  # OpenSSH's own client caps outstanding reads at 64 (paramiko #1788)


def host_key_name(host: str, port: int) -> str:
    """The known_hosts name paramiko looks up: ``host`` for port 22, else ``[host]:port``."""
    return host if port == 22 else f"[{host}]:{port}"


def _key_desc(key: paramiko.PKey | None) -> str:
    if key is None:
        return "no key"
    try:
        return f"{key.get_name()} {key.fingerprint}"
    except Exception:
        return key.get_name()


class _RecordingRejectPolicy(paramiko.RejectPolicy):
    """RejectPolicy that remembers the offered key so the error can show its fingerprint."""

    offered: paramiko.PKey | None = None

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> None:
        self.offered = key
        super().missing_host_key(client, hostname, key)


def _entry(name: str, attrs: paramiko.SFTPAttributes) -> RemoteEntry:
    return RemoteEntry(
        name=name,
        size=int(attrs.st_size or 0),
        mtime=float(attrs.st_mtime or 0),
        kind=kind_from_mode(attrs.st_mode),
    )


class SftpFolder:
    """One SSH connection + SFTP session rooted at one remote delivery folder.

    Use ``open_sftp_folder`` to create it; call ``close()`` (or use it as a context manager).
    """

    def __init__(
        self, client: paramiko.SSHClient, sftp: paramiko.SFTPClient, folder: str, display: str
    ) -> None:
        self._client = client
        self._sftp = sftp
        self.folder = folder
        self.display = display

    def __enter__(self) -> "SftpFolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _transient(self, what: str, exc: BaseException) -> TransientSourceError:
        detail = str(exc) or "no detail"
        return TransientSourceError(
            f"SFTP {what} on {self.display} failed: {type(exc).__name__}: {detail}"
        )

    def list_entries(self) -> list[RemoteEntry]:
        try:
            st = self._sftp.stat(self.folder)
            if st.st_mode is not None and not stat.S_ISDIR(st.st_mode):
                raise PermanentSourceError(f"SFTP path {self.display} is not a folder")
            attrs = self._sftp.listdir_attr(self.folder)
        except FileNotFoundError:
            raise PermanentSourceError(f"SFTP folder {self.display} does not exist") from None
        except PermissionError:
            raise PermanentSourceError(
                f"no permission to list SFTP folder {self.display}"
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._transient("listing", exc) from exc
        return [_entry(a.filename, a) for a in attrs if a.filename not in (".", "..")]

    def stat(self, name: str) -> RemoteEntry:
        try:
            attrs = self._sftp.lstat(posixpath.join(self.folder, name))
        except FileNotFoundError:
            raise TransientSourceError(
                f"{name} disappeared from {self.display} during intake"
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._transient(f"stat of {name}", exc) from exc
        return _entry(name, attrs)

    def fetch(self, name: str, fh: BinaryIO) -> int:
        """Stream ``name`` into ``fh``; returns the byte count paramiko reports (not checked here)."""
        remote = posixpath.join(self.folder, name)
        try:
            return self._sftp.getfo(
                remote, fh, prefetch=True, max_concurrent_prefetch_requests=PREFETCH_MAX_REQUESTS
            )
        except FileNotFoundError:
            raise TransientSourceError(
                f"{name} disappeared from {self.display} during download"
            ) from None
        except PermissionError:
            raise PermanentSourceError(f"no permission to read {name} in {self.display}") from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise self._transient(f"download of {name}", exc) from exc

    def close(self) -> None:
        try:
            self._sftp.close()
        except Exception:  # best effort: the connection may already be gone
            pass
        self._client.close()


def _load_pkey(path: str) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(path)
    except FileNotFoundError:
        raise PermanentSourceError(f"SFTP client key file {path} not found") from None
    except PermissionError:
        raise PermanentSourceError(f"no permission to read SFTP client key file {path}") from None
    except paramiko.PasswordRequiredException:
        raise PermanentSourceError(
            f"SFTP client key {path} is passphrase-protected; use an unencrypted key file "
            "mounted as a secret"
        ) from None
    except (paramiko.SSHException, ValueError, TypeError, OSError) as exc:
        raise PermanentSourceError(
            f"cannot load SFTP client key {path} ({type(exc).__name__}); expected an OpenSSH "
            "ed25519 / ECDSA / RSA private key"
        ) from None


def open_sftp_folder(spec: SourceSpec, source: ParsedSource) -> SftpFolder:
    """Connect (verifying the host key against ``spec.known_hosts_path``) and open SFTP."""
    if source.kind != "sftp" or not source.host or not source.username:
        raise PermanentSourceError(f"not an SFTP source: {source.display}")
    display = source.display
    hk_name = host_key_name(source.host, source.port)
    known_hosts = spec.known_hosts_path
    if not known_hosts:
        raise PermanentSourceError(f"SFTP source {display} needs known_hosts_path")
    if not os.path.isfile(known_hosts):
        raise PermanentSourceError(f"known_hosts file {known_hosts} for {display} not found")

    pkey = _load_pkey(spec.sftp_key_path) if spec.sftp_key_path else None
    password: str | None = None
    if spec.password_env:
        password = os.environ.get(spec.password_env)
        if not password:
            raise PermanentSourceError(
                f"environment variable {spec.password_env} (SFTP password for {display}) is not set"
            )
    if pkey is None and password is None:
        raise PermanentSourceError(f"SFTP source {display} needs sftp_key_path and/or password_env")
    method = " + ".join(
        m for m, on in (("key " + str(spec.sftp_key_path), pkey), ("password", password)) if on
    )

    client = paramiko.SSHClient()
    policy = _RecordingRejectPolicy()
    try:
        try:
            client.load_host_keys(known_hosts)
        except (OSError, paramiko.SSHException, ValueError) as exc:
            raise PermanentSourceError(
                f"cannot read known_hosts file {known_hosts}: {type(exc).__name__}"
            ) from None
        client.set_missing_host_key_policy(policy)  # never AutoAddPolicy
        timeout = spec.connect_timeout_s
        try:
            client.connect(
                source.host,
                port=source.port,
                username=source.username,
                pkey=pkey,
                password=password,
                allow_agent=False,
                look_for_keys=False,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                channel_timeout=timeout,
            )
        except paramiko.BadHostKeyException as exc:
            raise PermanentSourceError(
                f"host key for {hk_name} does not match known_hosts {known_hosts}: the server "
                f"offered {_key_desc(exc.key)}, known_hosts has {_key_desc(exc.expected_key)}. "
                "Possible man-in-the-middle, or the vendor rotated its key: verify out of band "
                "before updating known_hosts"
            ) from None
        except paramiko.AuthenticationException:
            raise PermanentSourceError(
                f"SFTP authentication failed for user {source.username} at {hk_name} "
                f"(tried {method})"
            ) from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc) or policy.offered is not None:
                raise PermanentSourceError(
                    f"host {hk_name} is not in known_hosts {known_hosts} (the server offered "
                    f"{_key_desc(policy.offered)}); add a verified '{hk_name} <key>' line"
                ) from None
            if isinstance(exc, paramiko.ssh_exception.IncompatiblePeer):
                raise PermanentSourceError(
                    f"no common SSH algorithms with {hk_name}: {exc}"
                ) from None
            raise TransientSourceError(
                f"SSH connection to {hk_name} failed: {type(exc).__name__}: {exc}"
            ) from exc
        except TimeoutError as exc:
            raise TransientSourceError(
                f"SSH connection to {hk_name} timed out after {timeout:g} s"
            ) from exc
        except socket.gaierror as exc:
            raise TransientSourceError(f"cannot resolve SFTP host {source.host}: {exc}") from exc
        except (OSError, EOFError) as exc:
            raise TransientSourceError(
                f"SSH connection to {hk_name} failed: {type(exc).__name__}: {exc}"
            ) from exc

        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(spec.keepalive_s)
        try:
            sftp = client.open_sftp()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise TransientSourceError(
                f"cannot open an SFTP session on {hk_name}: {type(exc).__name__}: {exc}"
            ) from exc
        sftp.get_channel().settimeout(
            spec.io_timeout_s
        )  # per-read timeout; a stall can't hang forever
    except BaseException:
        client.close()
        raise
    return SftpFolder(client, sftp, source.path, display)
