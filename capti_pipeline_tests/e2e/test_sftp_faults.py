"""SFTP faults through the whole job: transient ones are retried, permanent ones are not, and the
roster never changes when a delivery could not be taken whole."""

import os
from pathlib import Path

import pytest

from capti_pipeline.lib.generator import DistrictSpec, generate_district, write_delivery
from capti_pipeline_tests.lib.test_sftp import DroppingProxy
from capti_pipeline_tests.support.harness import CaptiEnv

pytestmark = pytest.mark.sftp


def _retries(env: CaptiEnv, run_id: str) -> int:
    return sum(
        1
        for entry in env.instance.all_logs(run_id)
        if entry.dagster_event and entry.dagster_event.event_type_value == "STEP_UP_FOR_RETRY"
    )


class DropOnceProxy(DroppingProxy):
    """Drops the link mid-download, then stops listening: reconnects are refused at once."""

    def _close_all(self) -> None:
        self._listener.close()
        super()._close_all()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dropped_connection_is_retried_then_fails_with_the_roster_unchanged(
    capti_env: CaptiEnv, sshd_server, tmp_path: Path
):
    folder = sshd_server.root / f"district-{os.getpid()}-drop"
    folder.mkdir(parents=True)
    district = generate_district(DistrictSpec(district_id="sftp-drop", students=60))
    write_delivery(district, folder)
    # First night over a healthy link.
    capti_env.register(
        "sftp-drop",
        sshd_server.url(folder),
        sftp_key=str(sshd_server.client_key_path),
        known_hosts=str(sshd_server.known_hosts_path),
    )
    assert capti_env.run("sftp-drop").state == "applied"
    before = capti_env.snapshot("sftp-drop")

    # Second night: a big file and a link that drops mid-download (and then refuses to reconnect).
    (folder / "demographics.csv").write_bytes(os.urandom(4 * 1024 * 1024))
    proxy = DropOnceProxy(sshd_server.port, drop_after=1_000_000)
    try:
        known_hosts = sshd_server.write_known_hosts(tmp_path / "kh_proxy", port=proxy.port)
        capti_env.register(
            "sftp-drop",
            sshd_server.url(folder).replace(f":{sshd_server.port}/", f":{proxy.port}/"),
            sftp_key=str(sshd_server.client_key_path),
            known_hosts=str(known_hosts),
        )
        outcome = capti_env.run("sftp-drop")
    finally:
        proxy.close()
    assert proxy.dropped.is_set()
    assert outcome.state == "failed" and outcome.exit_code == 1
    assert _retries(capti_env, outcome.run_id) == 3
    assert capti_env.snapshot("sftp-drop") == before
    landing = capti_env.root / "landing" / "sftp-drop"
    assert not (landing / outcome.run_id).exists()
    assert not [p for p in landing.iterdir() if p.name.startswith(".")]


def test_changed_host_key_fails_at_once(capti_env: CaptiEnv, sshd_server, tmp_path: Path):
    folder = sshd_server.root / f"district-{os.getpid()}-hostkey"
    folder.mkdir(parents=True)
    write_delivery(generate_district(DistrictSpec(district_id="hk", students=20)), folder)
    other_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
    known_hosts = sshd_server.write_known_hosts(tmp_path / "kh_wrong", public_key=other_key)
    capti_env.register(
        "hk",
        sshd_server.url(folder),
        sftp_key=str(sshd_server.client_key_path),
        known_hosts=str(known_hosts),
    )
    outcome = capti_env.run("hk")
    assert outcome.state == "failed" and outcome.exit_code == 1
    assert "host key" in outcome.report["reason"].lower()
    assert _retries(capti_env, outcome.run_id) == 0
    assert capti_env.snapshot("hk")["users"] == []
