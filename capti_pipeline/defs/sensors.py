"""Sensors: district partitions follow the districts table; Import Now requests become runs;
failed runs are recorded so the status never says "running" for a dead run."""

from datetime import UTC, datetime, timedelta

import dagster as dg

from capti_pipeline.defs.assets import IMPORT_REQUEST_TAG, TRIGGER_TAG
from capti_pipeline.defs.jobs import roster_sync_job
from capti_pipeline.defs.partitions import districts_partitions
from capti_pipeline.defs.pools import ensure_pools
from capti_pipeline.lib import operations
from capti_pipeline.lib import store as st
from capti_pipeline.lib.run_status import record_dagster_failure
from capti_pipeline.resources import Notifier, RosterStore

PARTITION_TAG = "dagster/partition"
# sync_runs.trigger is VARCHAR(32): PostgreSQL would reject a longer tag value.
_TRIGGER_MAX = 32
# A request taken this long ago without any Dagster run carrying its tag was lost between the
# sensor's commit and the daemon creating the run (daemon crash): ask for it again. Safe because
# the run key is the same and Dagster never launches a sensor's run key twice.
LOST_REQUEST_AFTER = timedelta(minutes=10)
_DEAD_STATUSES = {dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


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
        ensure_pools(context.instance)
    if removed:
        requests.append(districts_partitions.build_delete_request(removed))
    context.log.info(f"districts added: {added or 'none'}; removed: {removed or 'none'}")
    return dg.SensorResult(dynamic_partitions_requests=requests)


def import_run_request(request: operations.ImportRequest) -> dg.RunRequest:
    return dg.RunRequest(
        partition_key=request.district_id,
        run_key=request.run_key,
        tags={
            TRIGGER_TAG: f"import_now:{request.requested_by}"[:_TRIGGER_MAX],
            IMPORT_REQUEST_TAG: str(request.id),
        },
    )


def _link_taken_requests(
    context: dg.SensorEvaluationContext, roster_store: RosterStore, now: datetime
) -> list[dg.RunRequest]:
    """Give taken requests their Dagster run id (the asset does it too, but only once the run
    starts), record runs that died before their first step, and re-ask lost requests."""
    engine = roster_store.engine()
    dead: list[tuple[operations.ImportRequest, dg.DagsterRun]] = []
    again: list[dg.RunRequest] = []
    with engine.begin() as conn:
        for request in operations.unlinked_requests(conn):
            records = context.instance.get_run_records(
                dg.RunsFilter(tags={IMPORT_REQUEST_TAG: str(request.id)}), limit=1
            )
            if records:
                run = records[0].dagster_run
                operations.attach_run_to_import_request(conn, request.id, run.run_id)
                if run.status in _DEAD_STATUSES:
                    dead.append((request, run))
            elif (
                request.taken_at and request.taken_at.replace(tzinfo=UTC) < now - LOST_REQUEST_AFTER
            ):
                again.append(import_run_request(request))
    for request, run in dead:  # own transactions: SQLite allows one writer at a time
        record_dagster_failure(
            engine,
            run.run_id,
            f"the Dagster run ended {run.status.value.lower()} before the sync started",
            district_id=request.district_id,
        )
    return again


@dg.sensor(
    name="import_now_sensor",
    job=roster_sync_job,
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Turns each pending Import Now request into exactly one run of that district's "
    "partition (run key import-now:<request id>) and marks the request taken; requests for "
    "paused or removed districts are refused with the reason.",
)
def import_now_sensor(
    context: dg.SensorEvaluationContext, roster_store: RosterStore
) -> dg.SensorResult | dg.SkipReason:
    now = datetime.now(UTC)
    requests = _link_taken_requests(context, roster_store, now)
    known = set(context.instance.get_dynamic_partitions(districts_partitions.name))
    new_partitions: list[str] = []
    refused: list[str] = []
    with roster_store.engine().begin() as conn:
        operations.resume_expired_pauses(conn, now)
        for request in operations.pending_requests(conn):
            district = st.get_district(conn, request.district_id)
            if district.paused or not district.active:
                detail = (
                    operations.paused_detail(district)
                    if district.paused
                    else "district was removed"
                )
                operations.mark_request(conn, request.id, operations.REFUSED, detail)
                refused.append(f"#{request.id} ({detail})")
                continue
            if district.id not in known:  # registered moments ago: the partition comes first
                new_partitions.append(district.id)
                known.add(district.id)
            requests.append(import_run_request(request))
            operations.mark_request(conn, request.id, operations.TAKEN)
    if refused:
        context.log.info(f"Import Now refused: {', '.join(refused)}")
    if not requests:
        return dg.SkipReason(
            "no pending Import Now request" + (f"; refused {len(refused)}" if refused else "")
        )
    return dg.SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=(
            [districts_partitions.build_add_request(new_partitions)] if new_partitions else []
        ),
    )


def _failure_reason(context: dg.RunFailureSensorContext) -> str:
    """The root cause of the first failed step ("RuntimeError: ..."), else Dagster's summary."""
    for event in context.get_step_failure_events():
        error = event.step_failure_data.error if event.step_failure_data else None
        while error is not None and error.cause is not None:
            error = error.cause
        if error is not None and error.message.strip():
            return f"step {event.step_key}: {error.message.strip().splitlines()[0]}"
    return (context.failure_event.message if context.failure_event else None) or "run failed"


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
    message = _failure_reason(context)
    engine = roster_store.engine()
    request_id = run.tags.get(IMPORT_REQUEST_TAG)
    if request_id:  # a run that died before its first step never linked itself
        with engine.begin() as conn:
            operations.attach_run_to_import_request(conn, request_id, run.run_id)
    state = record_dagster_failure(
        engine,
        run.run_id,
        message,
        district_id=run.tags.get(PARTITION_TAG),
        trigger=run.tags.get(TRIGGER_TAG, "dagster")[:_TRIGGER_MAX],
    )
    if state is not None and state.notify:
        notifier.send(state.district_id, "failed", state.reason, run.run_id)
