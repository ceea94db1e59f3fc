"""Entry points shared by the CLI, the demo and the tests: register districts, run the Dagster job
for one district partition against the instance in DAGSTER_HOME, and read results back."""

import logging
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg

from capti_pipeline import config
from capti_pipeline.defs.assets import DRY_RUN_TAG, TRIGGER_TAG
from capti_pipeline.defs.partitions import districts_partitions
from capti_pipeline.defs.pools import ensure_pools
from capti_pipeline.lib import report as rp
from capti_pipeline.lib import store as st
from capti_pipeline.lib.intake import PermanentSourceError, SourceSpec, parse_source
from capti_pipeline.lib.run_status import (
    RecordedFailure,
    fail_dead_operator_runs,
    fail_dead_runs,
    process_is_gone,
    record_dagster_failure,
)
from capti_pipeline.resources import Notifier, store_engine

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2
EXIT_HELD = 3
EXIT_CODES = {
    rp.APPLIED: EXIT_OK,
    rp.NO_CHANGES: EXIT_OK,
    rp.DRY_RUN: EXIT_OK,
    rp.NOT_READY: EXIT_OK,
    rp.REFUSED: EXIT_REFUSED,
    rp.HELD: EXIT_HELD,
    rp.FAILED: EXIT_FAILED,
}
_DIAGNOSIS_ASSETS = (
    "oneroster_delivery",
    "validated_oneroster_frames",
    "resolved_roster",
    "roster_diff",
)
# In-process (CLI) runs have no run worker Dagster could health-check: these tags let the next
# CLI call or `status` see that the process is gone, instead of locking the district forever.
RUNNER_PID_TAG = "capti/runner_pid"
RUNNER_HOST_TAG = "capti/runner_host"


def engine():
    return store_engine(os.environ["CAPTI_DATABASE_URL"])


def notifier() -> Notifier:
    """The webhook notifier as the code location configures it (same environment variables)."""
    return Notifier(
        webhook_url=os.environ.get("CAPTI_WEBHOOK_URL", ""),
        ui_base_url=os.environ.get("CAPTI_UI_BASE_URL", ""),
    )


def ensure_dagster_home() -> Path:
    """DAGSTER_HOME (default .capti/dagster_home) exists and holds the project's dagster.yaml."""
    home = config.dagster_home()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    source = config.PROJECT_ROOT / "dagster.yaml"
    if not target.exists() and source.exists():
        shutil.copyfile(source, target)
    return home


def dagster_instance() -> dg.DagsterInstance:
    ensure_dagster_home()
    return dg.DagsterInstance.get()


def register_district(
    district_id: str,
    source: str,
    *,
    name: str | None = None,
    higher_ed: bool = False,
    sftp_key: str | None = None,
    known_hosts: str | None = None,
    password_env: str | None = None,
    instance: dg.DagsterInstance | None = None,
) -> st.District:
    """Add (or update) a district and its partition; the source URL is checked now."""
    spec = SourceSpec(
        url=source, sftp_key_path=sftp_key, known_hosts_path=known_hosts, password_env=password_env
    )
    parsed = parse_source(spec)
    if parsed.kind == "local" and not Path(parsed.path).is_dir():
        what = "is not a folder" if Path(parsed.path).exists() else "does not exist"
        raise PermanentSourceError(
            f"source folder {parsed.path} {what}; create it (or fix --source) and add the "
            "district again"
        )
    if source.startswith("sftp://") and not (sftp_key or password_env):
        raise PermanentSourceError("an SFTP source needs --sftp-key (or --password-env)")
    if source.startswith("sftp://") and not known_hosts:
        raise PermanentSourceError("an SFTP source needs --known-hosts (host keys are verified)")
    values: dict[str, Any] = {
        "source_url": source if source.startswith("sftp://") else str(Path(source).resolve()),
        "higher_ed": higher_ed,
        "sftp_key_path": str(Path(sftp_key).resolve()) if sftp_key else None,
        "known_hosts_path": str(Path(known_hosts).resolve()) if known_hosts else None,
        "password_env": password_env,
        "active": True,
    }
    if name:
        values["name"] = name
    with engine().begin() as conn:
        st.upsert_district(conn, district_id, **values)
        district = st.get_district(conn, district_id)
    instance = instance or dagster_instance()
    if not instance.has_dynamic_partition(districts_partitions.name, district_id):
        instance.add_dynamic_partitions(districts_partitions.name, [district_id])
    ensure_pools(instance)
    return district


def remove_district(district_id: str, instance: dg.DagsterInstance | None = None) -> None:
    """Stop syncing a district (its roster is kept) and delete its partition."""
    with engine().begin() as conn:
        st.get_district(conn, district_id)
        st.upsert_district(conn, district_id, active=False)
    instance = instance or dagster_instance()
    if instance.has_dynamic_partition(districts_partitions.name, district_id):
        instance.delete_dynamic_partition(districts_partitions.name, district_id)


@dataclass(frozen=True)
class SyncOutcome:
    run_id: str
    state: str
    exit_code: int
    report: dict[str, Any]


class RunInProgressError(Exception):
    pass


def _in_progress(instance: dg.DagsterInstance, district_id: str) -> list[str]:
    """Runs of this district still going; CLI runs whose process died are marked failed."""
    runs = instance.get_run_records(
        filters=dg.RunsFilter(
            job_name="roster_sync_job",
            tags={"dagster/partition": district_id},
            statuses=[
                dg.DagsterRunStatus.QUEUED,
                dg.DagsterRunStatus.STARTING,
                dg.DagsterRunStatus.STARTED,
            ],
        )
    )
    busy = []
    for record in runs:
        if _fail_if_runner_died(instance, record.dagster_run) is None:
            busy.append(record.dagster_run.run_id)
    return busy


def _runner_is_gone(run: dg.DagsterRun) -> bool:
    """True only when we can tell: a CLI run on this host whose process no longer exists."""
    if run.status != dg.DagsterRunStatus.STARTED:
        return False
    return process_is_gone(run.tags.get(RUNNER_PID_TAG), run.tags.get(RUNNER_HOST_TAG))


def _fail_if_runner_died(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str | None:
    """Mark a STARTED CLI run whose process was killed as failed (Dagster and roster store)."""
    if not _runner_is_gone(run):
        return None
    message = f"the capti-sync process {run.tags[RUNNER_PID_TAG]} running it is gone (killed?)"
    instance.report_run_failed(run, message)
    record_dagster_failure(
        engine(), run.run_id, message, district_id=run.tags.get("dagster/partition")
    )
    return message


def reconcile_dead_runs(instance: dg.DagsterInstance | None = None) -> list[RecordedFailure]:
    """Record as failed every roster-store run that says running but whose Dagster run is over
    (failed, canceled, or a killed CLI process), and every approve/undo whose `capti-sync`
    process was killed; `capti-sync status` calls this first."""
    operator_failures = fail_dead_operator_runs(engine())
    instance = instance or dagster_instance()

    def why_dead(record: st.RunRecord) -> str | None:
        run = instance.get_run_by_id(record.run_id)
        if run is None:  # not a run of this instance: nothing to judge by
            return None
        if run.status in (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED):
            return f"the Dagster run ended {run.status.value.lower()}"
        if run.status == dg.DagsterRunStatus.SUCCESS:
            return "the Dagster run ended without recording an outcome"
        return _fail_if_runner_died(instance, run)

    return operator_failures + fail_dead_runs(engine(), why_dead)


def run_district_sync(
    district_id: str,
    *,
    dry_run: bool = False,
    trigger: str = "cli",
    instance: dg.DagsterInstance | None = None,
) -> SyncOutcome:
    """Run roster_sync_job for one partition now, in this process, recorded in the instance."""
    from capti_pipeline.definitions import defs  # heavy import, only when a run is asked for

    with engine().connect() as conn:
        st.get_district(conn, district_id)  # unknown districts fail before Dagster is involved
    instance = instance or dagster_instance()
    if not instance.has_dynamic_partition(districts_partitions.name, district_id):
        instance.add_dynamic_partitions(districts_partitions.name, [district_id])
    ensure_pools(instance)
    busy = _in_progress(instance, district_id)
    if busy:
        raise RunInProgressError(
            f"district {district_id} already has a run in progress ({', '.join(busy)}); "
            "one run per district at a time"
        )
    job = defs.resolve_job_def("roster_sync_job")
    tags = {
        TRIGGER_TAG: trigger,
        RUNNER_PID_TAG: str(os.getpid()),
        RUNNER_HOST_TAG: socket.gethostname(),
    }
    selection = None
    if dry_run:
        tags[DRY_RUN_TAG] = "true"
        selection = [dg.AssetKey(name) for name in _DIAGNOSIS_ASSETS]
    plan_logger = logging.getLogger(_PLAN_LOGGER)
    quiet = _ExpectedSkipNotices()
    if _console_log_level() != "DEBUG":
        plan_logger.addFilter(quiet)
    try:
        result = job.execute_in_process(
            instance=instance,
            partition_key=district_id,
            tags=tags,
            raise_on_error=False,
            asset_selection=selection,
            run_id=str(uuid.uuid4()),
            run_config={"loggers": {"console": {"config": {"log_level": _console_log_level()}}}},
        )
    finally:
        plan_logger.removeFilter(quiet)
    return outcome_of(result.run_id, result.success, _failure_message(result))


# Dagster's execution plan logs (Python logging, printed on stderr when nothing is configured)
# that a blocking check "emitted no result" whenever its step was skipped: every not-ready
# delivery skips the steps after intake on purpose. Only that notice is dropped.
_PLAN_LOGGER = "dagster._core.execution.plan.active"


class _ExpectedSkipNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Blocking asset check ") and "emitted no result" in message)


def _console_log_level() -> str:
    return os.environ.get("CAPTI_LOG_LEVEL", "CRITICAL").upper()


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    """What failed, in one line: the step and the exception it raised (not Dagster's wrapper)."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            return f"step {event.step_key} failed: {error_cause(event.step_failure_data.error)}"
    return "the Dagster run failed"


# Dagster's own wrappers around what a step raised: the message worth showing is their cause.
_DAGSTER_WRAPPERS = ("DagsterExecutionStepExecutionError", "DagsterUserCodeExecutionError")


def error_cause(error: Any) -> str:
    """One line for a Dagster ``SerializableErrorInfo``: the exception a step raised, with its
    class name (the project's own errors carry operator-facing messages and are shown as is)."""
    retries = ""
    while error.cause is not None and (
        error.cls_name in _DAGSTER_WRAPPERS
        or error.cls_name.startswith("DagsterExecution")
        or error.cls_name == "RetryRequested"
    ):
        if error.cls_name == "RetryRequested":
            retries = f" ({error.message.strip().splitlines()[0].lower()})"
        error = error.cause
    lines = error.message.strip().splitlines() or [error.cls_name or "unknown error"]
    line = lines[0]
    prefix, sep, rest = line.partition(": ")
    if sep and prefix.rsplit(".", 1)[-1] == error.cls_name:
        own = prefix.startswith("capti_pipeline.") or error.cls_name == "Failure"
        line = rest if own else f"{error.cls_name}: {rest}"
    return line + retries


def outcome_of(run_id: str, success: bool, failure_message: str) -> SyncOutcome:
    with engine().connect() as conn:
        run = st.get_run(conn, run_id)
    if run is None or run.state == "running":
        # The run died outside the assets' own error handling (which record and notify): record
        # it, and notify as the failure sensor does for daemon runs.
        failure = record_dagster_failure(engine(), run_id, failure_message)
        if failure is not None and failure.notify:
            notifier().send(failure.district_id, rp.FAILED, failure.reason, run_id)
        with engine().connect() as conn:
            run = st.get_run(conn, run_id)
    if run is None:
        report = rp.build_report(
            district_id="?", run_id=run_id, state=rp.FAILED, issues=[], reason=failure_message
        )
        return SyncOutcome(run_id, rp.FAILED, EXIT_FAILED, report)
    report = run.report or rp.build_report(
        district_id=run.district_id, run_id=run_id, state=run.state, issues=[], reason=run.reason
    )
    return SyncOutcome(run_id, run.state, EXIT_CODES.get(run.state, EXIT_FAILED), report)


def new_run_id() -> str:
    return str(uuid.uuid4())
