"""The one place that assembles the code location's Definitions."""

import dagster as dg

from capti_pipeline import config
from capti_pipeline.defs.assets import roster_sync_assets
from capti_pipeline.defs.jobs import roster_sync_job
from capti_pipeline.defs.schedules import nightly_roster_sync
from capti_pipeline.defs.sensors import (
    district_discovery_sensor,
    import_now_sensor,
    sync_run_failure_sensor,
)
from capti_pipeline.defs.upload_sensor import delivery_upload_sensor
from capti_pipeline.resources import DeliveryStorage, Notifier, RosterStore, StagingIOManager

config.apply_defaults()


def build_resources() -> dict[str, object]:
    return {
        "roster_store": RosterStore(database_url=dg.EnvVar("CAPTI_DATABASE_URL")),
        "delivery_storage": DeliveryStorage(
            data_dir=dg.EnvVar("CAPTI_DATA_DIR"),
            stability_window_ms=dg.EnvVar.int("CAPTI_STABILITY_WINDOW_MS"),
            retry_wait_ms=dg.EnvVar.int("CAPTI_RETRY_WAIT_MS"),
            zip_max_entries=dg.EnvVar.int("CAPTI_ZIP_MAX_ENTRIES"),
            zip_max_uncompressed_bytes=dg.EnvVar.int("CAPTI_ZIP_MAX_UNCOMPRESSED_BYTES"),
        ),
        "notifier": Notifier(
            webhook_url=dg.EnvVar("CAPTI_WEBHOOK_URL"), ui_base_url=dg.EnvVar("CAPTI_UI_BASE_URL")
        ),
        "io_manager": StagingIOManager(base_dir=dg.EnvVar("CAPTI_DATA_DIR")),
    }


defs = dg.Definitions(
    assets=roster_sync_assets,
    jobs=[roster_sync_job],
    schedules=[nightly_roster_sync],
    sensors=[
        district_discovery_sensor,
        import_now_sensor,
        sync_run_failure_sensor,
        delivery_upload_sensor,
    ],
    resources=build_resources(),
)
