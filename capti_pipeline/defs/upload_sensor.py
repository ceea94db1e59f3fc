"""Optional per-district upload watching: sync as soon as a new, complete delivery has settled."""

from datetime import UTC, datetime

import dagster as dg

from capti_pipeline.defs.assets import TRIGGER_TAG
from capti_pipeline.defs.jobs import roster_sync_job
from capti_pipeline.lib import intake, operations, uploads
from capti_pipeline.resources import RosterStore


@dg.sensor(
    name="delivery_upload_sensor",
    job=roster_sync_job,
    minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="For districts with watch_uploads on: lists the drop folder every 2 minutes and "
    "starts one run when a new delivery (with manifest.csv, or a zip) is unchanged across two "
    "looks. Never reads a file that is still growing.",
)
def delivery_upload_sensor(
    context: dg.SensorEvaluationContext, roster_store: RosterStore
) -> dg.SensorResult | dg.SkipReason:
    state = uploads.WatchState.from_cursor(context.cursor)
    requests: list[dg.RunRequest] = []
    with roster_store.engine().begin() as conn:
        watched = [d for d in operations.districts_due(conn, datetime.now(UTC)) if d.watch_uploads]
    if not watched:
        return dg.SkipReason("no district watches its uploads")
    for district in watched:
        spec = intake.SourceSpec(
            url=district.source_url,
            sftp_key_path=district.sftp_key_path,
            known_hosts_path=district.known_hosts_path,
            password_env=district.password_env,
        )
        try:
            listing = intake.observe_delivery(spec)
        except intake.IntakeError as exc:
            context.log.warning(f"{district.id}: cannot list its source: {exc}")
            continue
        signature = uploads.ready_to_launch(state, district.id, listing)
        if signature:
            requests.append(
                dg.RunRequest(
                    partition_key=district.id,
                    run_key=f"upload:{district.id}:{signature}",
                    tags={TRIGGER_TAG: "upload"},
                )
            )
    return dg.SensorResult(run_requests=requests, cursor=state.to_cursor())
