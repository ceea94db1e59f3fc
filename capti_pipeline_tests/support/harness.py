"""A throwaway Capti environment: its own data dir, SQLite store and Dagster instance.

Tests drive the product the way operators do (service/CLI functions, real Dagster runs).
"""

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from capti_pipeline import service
from capti_pipeline.lib import store as st
from capti_pipeline.lib import sync

# Public OneRoster deliveries, in ../shared beside the checkout (CI lays a copy there too).
SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "oneroster-samples"
EDFI = SAMPLES / "Ed-Fi-Exchange-OSS__LMS-Toolkit" / "oneroster-1.1"


@dataclass
class CaptiEnv:
    root: Path
    database_url: str
    instance: dg.DagsterInstance

    def engine(self):
        return service.engine()

    def register(self, district_id: str, source: Path | str, **kwargs: Any) -> st.District:
        return service.register_district(district_id, str(source), instance=self.instance, **kwargs)

    def run(self, district_id: str, *, dry_run: bool = False) -> service.SyncOutcome:
        return service.run_district_sync(district_id, dry_run=dry_run, instance=self.instance)

    def snapshot(self, district_id: str) -> dict[str, Any]:
        return sync.snapshot(service.engine(), district_id)

    def active_user_ids(self, district_id: str) -> set[str]:
        return {
            u["sourcedId"] for u in self.snapshot(district_id)["users"] if u["status"] == "active"
        }

    def delivery_dir(self, name: str) -> Path:
        path = self.root / "deliveries" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def snapshot_without_ids(snapshot: dict[str, Any]) -> str:
    """Snapshot comparable across stores: account ids are store-internal."""
    users = [{k: v for k, v in u.items() if k != "accountId"} for u in snapshot["users"]]
    return json.dumps({**snapshot, "district": "-", "users": users}, sort_keys=True)


@pytest.fixture
def capti_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CaptiEnv]:
    root = tmp_path / "capti"
    root.mkdir()
    url = f"sqlite:///{root / 'roster.sqlite3'}"
    monkeypatch.setenv("CAPTI_DATA_DIR", str(root))
    monkeypatch.setenv("CAPTI_DATABASE_URL", url)
    monkeypatch.setenv("DAGSTER_HOME", str(root / "dagster_home"))
    monkeypatch.setenv("CAPTI_STABILITY_WINDOW_MS", "0")
    monkeypatch.setenv("CAPTI_RETRY_WAIT_MS", "0")
    monkeypatch.setenv("CAPTI_WEBHOOK_URL", os.environ.get("CAPTI_TEST_WEBHOOK_URL", ""))
    (root / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "dagster_home")) as instance:
        yield CaptiEnv(root, url, instance)
