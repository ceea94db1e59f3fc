"""Jobs over the roster sync assets (partitioning is inferred from the assets)."""

import dagster as dg

from capti_pipeline.defs.assets import GROUP

roster_sync_job = dg.define_asset_job(
    "roster_sync_job",
    selection=dg.AssetSelection.groups(GROUP),
    description="Sync one district: take its latest delivery, validate, resolve, diff, apply, "
    "report. Partition = district id.",
)
