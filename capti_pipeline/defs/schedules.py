"""The nightly sync: 2:00 AM America/New_York, one run per active, unpaused district."""

import dagster as dg

from capti_pipeline.defs.assets import TRIGGER_TAG
from capti_pipeline.defs.jobs import roster_sync_job
from capti_pipeline.lib import operations
from capti_pipeline.resources import RosterStore


@dg.schedule(
    name="nightly_roster_sync",
    job=roster_sync_job,
    cron_schedule="0 2 * * *",
    execution_timezone="America/New_York",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every night at 2:00 AM Eastern (DST-aware; on the March change the tick fires "
    "at 3:00 EDT). The run key is district + Eastern date, so a re-evaluated tick never "
    "launches a district twice.",
)
def nightly_roster_sync(
    context: dg.ScheduleEvaluationContext, roster_store: RosterStore
) -> dg.SkipReason | list[dg.RunRequest]:
    scheduled = context.scheduled_execution_time
    with roster_store.engine().begin() as conn:
        due = operations.districts_due(conn, scheduled)
    if not due:
        return dg.SkipReason("no active, unpaused district is registered")
    return [
        dg.RunRequest(
            partition_key=district.id,
            run_key=operations.nightly_run_key(district.id, scheduled),
            tags={TRIGGER_TAG: "nightly"},
        )
        for district in due
    ]
