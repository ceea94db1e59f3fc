"""Dagster resources: thin, configurable wrappers over the pure lib/ modules."""

import functools
from pathlib import Path
from typing import Any

import dagster as dg
from sqlalchemy.engine import Engine

from capti_pipeline.lib import notify, staging
from capti_pipeline.lib.store import create_store_engine, migrate


@functools.cache
def store_engine(database_url: str) -> Engine:
    """One engine per process and URL, with the schema migrated on first use."""
    engine = create_store_engine(database_url)
    migrate(engine)
    return engine


class RosterStore(dg.ConfigurableResource):
    """Capti's roster store (SQLAlchemy URL; SQLite file by default, PostgreSQL in production)."""

    database_url: str

    def engine(self) -> Engine:
        return store_engine(self.database_url)


class DeliveryStorage(dg.ConfigurableResource):
    """Where landing copies go, and how deliveries are taken from their source."""

    data_dir: str
    stability_window_ms: int = 2000
    retry_wait_ms: int = 30000
    keep_landings: int = 14
    zip_max_entries: int = 64  # a zip delivery with more entries is refused
    zip_max_uncompressed_bytes: int = 20 * 1024**3  # ... or expanding to more bytes than this

    @property
    def stability_window_s(self) -> float:
        return self.stability_window_ms / 1000

    @property
    def retry_wait_s(self) -> float:
        return self.retry_wait_ms / 1000

    def landing_root(self, district_id: str) -> Path:
        root = Path(self.data_dir) / "landing" / district_id
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return root


class Notifier(dg.ConfigurableResource):
    """Webhook (Slack-compatible JSON) for failed, refused and held runs; empty URL = off."""

    webhook_url: str = ""
    ui_base_url: str = ""

    def send(self, district_id: str, state: str, reason: str, run_id: str | None) -> list[str]:
        if not self.webhook_url:
            return []
        note = notify.Notification(
            district_id=district_id,
            state=state,
            reason=reason,
            run_id=run_id,
            run_url=notify.build_run_url(self.ui_base_url or None, run_id),
        )
        return notify.notify(note, webhook_url=self.webhook_url)


class StagingIOManager(dg.ConfigurableIOManager):
    """Hands assets' outputs to the next step through owner-only files, one per asset and
    district, whose data buffers are memory-mapped back instead of copied; big ones are written
    while the next step runs and handed over in memory meanwhile (lib/staging.py).

    Rosters hold personal data, so files are 0600 in 0700 folders and written atomically.
    """

    base_dir: str

    def _folder(self, context: dg.OutputContext | dg.InputContext) -> Path:
        asset = "/".join(context.asset_key.path)
        partition = context.asset_partition_key if context.has_asset_partitions else "_"
        return Path(self.base_dir) / "staging" / asset / partition

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        # One file per run: concurrent runs of a district never read each other's outputs.
        _HANDOFF.put(self._folder(context) / f"{context.run_id}.stg", obj, context.run_id)

    def load_input(self, context: dg.InputContext) -> Any:
        upstream = context.upstream_output
        run_id = upstream.run_id if upstream is not None else None
        folder = self._folder(context)
        return _HANDOFF.get(staging.run_file(folder, run_id), run_id)


# One per process: big outputs are written while the next step runs (lib/staging.Handoff).
_HANDOFF = staging.Handoff()
