"""The nightly sync: 2:00 AM America/New_York, one run per active, unpaused district."""

import dagster as dg

from capti_pipeline.defs.assets import TRIGGER_TAG
from capti_pipeline.defs.jobs import roster_sync_job
from capti_pipeline.defs.partitions import districts_partitions
from capti_pipeline.defs.pools import ensure_pools
from capti_pipeline.lib import operations
from capti_pipeline.resources import RosterStore


@dg.schedule(
    name="nightly_roster_sync",
    job=roster_sync_job,
    cron_schedule=operations.NIGHTLY_CRON,
    execution_timezone=operations.NIGHTLY_TIMEZONE,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every night at 2:00 AM Eastern, one run per registered, active, unpaused "
    "district. DST: on the March change day 2:00 does not exist and the tick fires at 3:00 EDT; "
    "on the November change day there is one tick (2:00 EST). The run key is district + Eastern "
    "date, so a re-evaluated tick never launches a district twice.",
)
def nightly_roster_sync(
    context: dg.ScheduleEvaluationContext, roster_store: RosterStore
) -> dg.SkipReason | list[dg.RunRequest]:
    scheduled = context.scheduled_execution_time
    with roster_store.engine().begin() as conn:
        due = operations.districts_due(conn, scheduled)  # also ends pauses whose --until passed
    if not due:
        return dg.SkipReason("no active, unpaused district is registered")
    # A district registered since district_discovery_sensor last ran has no partition yet; a
    # RunRequest for an unknown partition would fail the whole tick, so add it here (idempotent).
    known = set(context.instance.get_dynamic_partitions(districts_partitions.name))
    missing = [d.id for d in due if d.id not in known]
    if missing:
        context.instance.add_dynamic_partitions(districts_partitions.name, missing)
    ensure_pools(context.instance)  # the night's runs start together: no race for the pool
    return [
        dg.RunRequest(
            partition_key=district.id,
            run_key=operations.nightly_run_key(district.id, scheduled),
            tags={TRIGGER_TAG: "nightly"},
        )
        for district in due
    ]
