"""Jobs over the roster sync assets (partitioning is inferred from the assets)."""

import dagster as dg

from capti_pipeline.defs.assets import GROUP

roster_sync_job = dg.define_asset_job(
    "roster_sync_job",
    selection=dg.AssetSelection.groups(GROUP),
    # The steps form a chain, so separate step processes would only add start-up cost.
    executor_def=dg.in_process_executor,
    description="Sync one district: take its latest delivery, validate, resolve, diff, apply, "
    "report. Partition = district id.",
)
