"""The Dagster UI of a synced environment, seen by headless Chromium: the asset graph shows the
sync's assets and the district partition (and the GraphQL API agrees).

Chromium is driven with its command line only (--dump-dom / --screenshot), no extra Python deps.
Set CAPTI_UPDATE_SCREENSHOT=1 to refresh docs/ui-asset-graph.png from this test.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from capti_pipeline_tests.defs.conftest import PROJECT_ROOT, VENV_BIN
from capti_pipeline_tests.support.harness import EDFI, CaptiEnv

ASSETS = [
    "oneroster_delivery",
    "validated_oneroster_frames",
    "resolved_roster",
    "roster_diff",
    "applied_roster_changes",
    "sync_report",
]
STARTUP_WAIT_S = 120
# Wide enough that the graph is drawn at the zoom level where nodes show their details
# ("1 partition", checks, kinds) instead of bare names.
WINDOW = "2400,1000"
SCREENSHOT = PROJECT_ROOT / "docs" / "ui-asset-graph.png"


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("Chromium is required in CI (apt-get install chromium)")
    pytest.skip("headless Chromium is not installed")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _graphql(base: str, query: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = json.loads(response.read())
    assert "errors" not in body, body
    return body["data"]


class Webserver:
    def __init__(self, process: subprocess.Popen[bytes], base: str, log: Path) -> None:
        self.process, self.base, self.log = process, base, log

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def synced_webserver(capti_env: CaptiEnv, tmp_path: Path) -> Iterator[Webserver]:
    capti_env.register("edfi", EDFI)
    assert capti_env.run("edfi").state == "applied"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "webserver.log"
    with log.open("wb") as sink:
        # capti_env has set CAPTI_* and DAGSTER_HOME in this process's environment.
        command = [str(VENV_BIN / "dagster-webserver"), "-w", "workspace.yaml"]
        process = subprocess.Popen(
            [*command, "-h", "127.0.0.1", "-p", str(port)],
            cwd=PROJECT_ROOT,
            env={**os.environ, "DAGSTER_DISABLE_TELEMETRY": "yes"},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Webserver(process, base, log)
    try:
        _wait_until_loaded(server)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _wait_until_loaded(server: Webserver) -> None:
    deadline = time.monotonic() + STARTUP_WAIT_S
    query = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"dagster-webserver exited:\n{server.log_tail()}")
        try:
            entries = _graphql(server.base, query)["workspaceOrError"]["locationEntries"]
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(f"dagster-webserver not ready after {STARTUP_WAIT_S}s:\n{server.log_tail()}")


def _chromium_args(chromium: str, profile: Path) -> list[str]:
    return [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        # The UI is a React app fed by GraphQL: give it (virtual) time to fetch and render.
        "--virtual-time-budget=30000",
        f"--window-size={WINDOW}",
    ]


def _dump_dom(chromium: str, profile: Path, url: str) -> str:
    done = subprocess.run(
        [*_chromium_args(chromium, profile), "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _screenshot(chromium: str, profile: Path, url: str, path: Path) -> None:
    done = subprocess.run(
        [*_chromium_args(chromium, profile), f"--screenshot={path}", url],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0 and path.exists(), done.stderr[-2000:]


@pytest.mark.browser
def test_asset_graph_shows_the_sync_and_its_district_partition(
    synced_webserver: Webserver, tmp_path: Path
) -> None:
    chromium = _chromium()
    server = synced_webserver

    nodes = _graphql(server.base, "{ assetNodes { assetKey { path } groupName partitionKeys } }")[
        "assetNodes"
    ]
    by_name = {node["assetKey"]["path"][-1]: node for node in nodes}
    assert set(by_name) == set(ASSETS)
    for node in nodes:
        assert node["groupName"] == "roster_sync"
        assert node["partitionKeys"] == ["edfi"]  # the district's dynamic partition

    # On 127.0.0.1 the UI opens a "Join the Dagster community" dialog over everything until
    # it is skipped once; skipping is this mutation.
    assert _graphql(server.base, "mutation { setNuxSeen }")["setNuxSeen"] is True

    graph_url = f"{server.base}/asset-groups/roster_sync"
    graph = _dump_dom(chromium, tmp_path / "profile-graph", graph_url)
    for name in ASSETS:
        assert name in graph, f"{name} not on the asset graph"
    assert "1 partition" in graph  # node footers: one district partition each
    assert "Join the Dagster community" not in graph

    partitions = _dump_dom(
        chromium,
        tmp_path / "profile-partitions",
        f"{server.base}/assets/sync_report?view=partitions",
    )
    assert "edfi" in partitions, "the district partition key is not listed"

    shot = tmp_path / "ui-asset-graph.png"
    _screenshot(chromium, tmp_path / "profile-shot", graph_url, shot)
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000  # a rendered page, not a blank one
    if os.environ.get("CAPTI_UPDATE_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)
