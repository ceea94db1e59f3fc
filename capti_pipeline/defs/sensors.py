"""Sensors: district partitions follow the districts table; Import Now requests become runs;
failed runs are recorded so the status never says "running" for a dead run."""

from datetime import UTC, datetime

import dagster as dg

from capti_pipeline.defs.assets import TRIGGER_TAG
from capti_pipeline.defs.jobs import roster_sync_job
from capti_pipeline.defs.partitions import districts_partitions
from capti_pipeline.lib import operations
from capti_pipeline.lib import store as st
from capti_pipeline.lib.run_status import record_dagster_failure
from capti_pipeline.resources import Notifier, RosterStore

IMPORT_REQUEST_TAG = "capti/import_request"


@dg.sensor(
    name="district_discovery_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Adds a `districts` partition for every registered district and deletes the "
    "partitions of removed ones.",
)
def district_discovery_sensor(
    context: dg.SensorEvaluationContext, roster_store: RosterStore
) -> dg.SensorResult | dg.SkipReason:
    with roster_store.engine().connect() as conn:
        registered = {d.id for d in st.list_districts(conn)}
    known = set(context.instance.get_dynamic_partitions(districts_partitions.name))
    added = sorted(registered - known)
    removed = sorted(known - registered)
    if not added and not removed:
        return dg.SkipReason(f"{len(known)} district partitions already match the registry")
    requests = []
    if added:
        requests.append(districts_partitions.build_add_request(added))
    if removed:
        requests.append(districts_partitions.build_delete_request(removed))
    context.log.info(f"districts added: {added or 'none'}; removed: {removed or 'none'}")
    return dg.SensorResult(dynamic_partitions_requests=requests)


@dg.sensor(
    name="import_now_sensor",
    job=roster_sync_job,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Turns each pending Import Now request into exactly one run of that district's "
    "partition (run key = request id) and marks the request taken.",
)
def import_now_sensor(
    context: dg.SensorEvaluationContext, roster_store: RosterStore
) -> dg.SensorResult | dg.SkipReason:
    now = datetime.now(UTC)
    requests: list[dg.RunRequest] = []
    with roster_store.engine().begin() as conn:
        pending = operations.pending_requests(conn)
        if not pending:
            return dg.SkipReason("no pending Import Now request")
        operations.resume_expired_pauses(conn, now)
        known = set(context.instance.get_dynamic_partitions(districts_partitions.name))
        new_partitions: list[str] = []
        for request in pending:
            district = st.get_district(conn, request.district_id)
            if district.paused or not district.active:
                reason = "paused" if district.paused else "removed"
                operations.mark_request(conn, request.id, "refused", f"district is {reason}")
                continue
            if district.id not in known:
                new_partitions.append(district.id)
                known.add(district.id)
            requests.append(
                dg.RunRequest(
                    partition_key=district.id,
                    run_key=f"import-now:{request.id}",
                    tags={
                        TRIGGER_TAG: f"import_now:{request.requested_by}",
                        IMPORT_REQUEST_TAG: str(request.id),
                    },
                )
            )
            operations.mark_request(conn, request.id, "taken")
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=(
            [districts_partitions.build_add_request(new_partitions)] if new_partitions else []
        ),
    )


@dg.run_failure_sensor(
    name="sync_run_failure_sensor",
    monitored_jobs=[roster_sync_job],
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Records failed sync runs in the roster store (and notifies), so a dead run "
    "never shows as running.",
)
def sync_run_failure_sensor(
    context: dg.RunFailureSensorContext, roster_store: RosterStore, notifier: Notifier
) -> None:
    run = context.dagster_run
    message = context.failure_event.message if context.failure_event else "run failed"
    state = record_dagster_failure(roster_store.engine(), run.run_id, message or "run failed")
    if state is not None and state.notify:
        notifier.send(state.district_id, "failed", state.reason, run.run_id)
