"""The roster sync as Dagster assets, one district partition at a time.

oneroster_delivery → validated_oneroster_frames → resolved_roster → roster_diff
→ applied_roster_changes → sync_report. Each asset is a thin call into capti_pipeline.lib.sync;
the blocking checks `delivery_accepted` and `within_safety_limits` stop a refused or held
delivery before anything is applied.
"""

import shutil
import time
from collections.abc import Iterator

import dagster as dg

from capti_pipeline.defs.partitions import districts_partitions
from capti_pipeline.defs.pools import APPLY_POOL
from capti_pipeline.lib import intake, operations, sync
from capti_pipeline.lib import report as rp
from capti_pipeline.lib import store as st
from capti_pipeline.lib.apply import AppliedChanges
from capti_pipeline.lib.diff import Plan
from capti_pipeline.lib.issues import ERROR, Issue, file_error
from capti_pipeline.lib.resolve import ResolvedRoster
from capti_pipeline.lib.safety import ThresholdsError
from capti_pipeline.lib.validate import ValidatedDelivery
from capti_pipeline.resources import DeliveryStorage, Notifier, RosterStore

GROUP = "roster_sync"
TRIGGER_TAG = "capti/trigger"
DRY_RUN_TAG = "capti/dry_run"
IMPORT_REQUEST_TAG = "capti/import_request"
_OWNERS = ["team:roster-sync"]
_LEFTOVER_AGE_S = 6 * 3600


def _trigger(context: dg.AssetExecutionContext) -> str:
    return context.run.tags.get(TRIGGER_TAG, "manual")


def _finish(
    roster_store: RosterStore,
    notifier: Notifier | None,
    run_id: str,
    district_id: str,
    state: str,
    report: dict,
    **values: object,
) -> None:
    with roster_store.engine().begin() as conn:
        st.record_run_end(
            conn, run_id, state=state, report=report, reason=report.get("reason"), **values
        )  # type: ignore[arg-type]
    if notifier is not None and state in (rp.FAILED, rp.REFUSED, rp.HELD):
        notifier.send(district_id, state, report.get("reason") or state, run_id)


def _refused_reason(issues: list[Issue]) -> str:
    """Short reason of a refused delivery: how many file-level errors, in which files (the
    errors themselves are the report's issues, printed below the summary)."""
    errors = [i for i in issues if i.severity == ERROR and i.line == 0]
    files = ", ".join(dict.fromkeys(i.file for i in errors if i.file))
    plural = "s" if len(errors) != 1 else ""
    return f"delivery refused: {len(errors)} file-level error{plural}" + (
        f" in {files}" if files else ""
    )


def _manifest_expected(roster_store: RosterStore, district_id: str) -> bool:
    """Whether a loose delivery must wait for manifest.csv: yes once the district's last applied
    delivery had one; a district whose last applied delivery had none (or that has none yet)
    may deliver without (README, "Deliveries without manifest.csv")."""
    states = [rp.APPLIED, rp.NO_CHANGES, rp.APPROVED]
    with roster_store.engine().connect() as conn:
        runs = [r for r in st.list_runs(conn, district_id, states=states) if r.kind == "sync"]
    if not runs:
        return False
    return not any(
        issue.get("file") == intake.MANIFEST_NAME
        and str(issue.get("message", "")).startswith(intake.NO_MANIFEST_WARNING)
        for issue in runs[0].report.get("issues") or []
    )


def _issues_markdown(issues: list, limit: int = 50) -> str:
    if not issues:
        return "none"
    lines = [
        "| severity | file | line | column | sourcedId | message |",
        "|---|---|---|---|---|---|",
    ]
    for issue in issues[:limit]:
        lines.append(
            f"| {issue.severity} | {issue.file} | {issue.line or ''} | {issue.column} | "
            f"{issue.sourced_id} | {issue.message.replace('|', '/')} |"
        )
    if len(issues) > limit:
        lines.append(f"\n… {len(issues) - limit} more in `capti-sync report`")
    return "\n".join(lines)


@dg.asset(
    partitions_def=districts_partitions,
    group_name=GROUP,
    kinds={"csv"},
    owners=_OWNERS,
    output_required=False,
    description="The district's latest OneRoster delivery, copied from its source (SFTP or "
    "folder, loose CSVs or zip) into an immutable owner-only landing copy for this run, with "
    "sha256 checksums. Skipped with status not_ready while an upload is still in progress.",
)
def oneroster_delivery(
    context: dg.AssetExecutionContext,
    roster_store: RosterStore,
    delivery_storage: DeliveryStorage,
    notifier: Notifier,
) -> Iterator[dg.Output[intake.LandedDelivery]]:
    district_id = context.partition_key
    run_id = context.run.run_id
    engine = roster_store.engine()
    with engine.begin() as conn:
        district = st.get_district(conn, district_id)
        request_id = context.run.tags.get(IMPORT_REQUEST_TAG)
        if request_id:
            operations.attach_run_to_import_request(conn, request_id, run_id)
        if context.retry_number == 0:
            st.record_run_start(
                conn,
                run_id,
                district_id,
                kind="dry_run" if context.run.tags.get(DRY_RUN_TAG) else "sync",
                trigger=_trigger(context),
            )
    spec = intake.SourceSpec(
        url=district.source_url,
        sftp_key_path=district.sftp_key_path,
        known_hosts_path=district.known_hosts_path,
        password_env=district.password_env,
    )
    root = delivery_storage.landing_root(district_id)
    landing = root / run_id
    if landing.exists():  # a retried attempt starts from a clean landing copy
        shutil.rmtree(landing)
    try:
        landed = intake.land_delivery(
            spec,
            landing,
            stability_window_s=delivery_storage.stability_window_s,
            zip_max_entries=delivery_storage.zip_max_entries,
            zip_max_uncompressed_bytes=delivery_storage.zip_max_uncompressed_bytes,
            require_manifest=_manifest_expected(roster_store, district_id),
        )
    except intake.DeliveryNotReady as exc:
        report = rp.build_report(
            district_id=district_id, run_id=run_id, state=rp.NOT_READY, issues=[], reason=str(exc)
        )
        _finish(roster_store, None, run_id, district_id, rp.NOT_READY, report)
        context.log.warning(f"delivery not ready: {exc}")
        return
    except intake.TransientSourceError as exc:
        context.log.warning(f"transient source error, will retry: {exc}")
        # Exponential backoff: 30 s, 60 s, 120 s by default.
        wait = delivery_storage.retry_wait_s * 2**context.retry_number
        raise dg.RetryRequested(max_retries=3, seconds_to_wait=wait) from exc
    except intake.DeliveryRefused as exc:
        issues = [*exc.warnings, file_error(exc.file, str(exc))]
        report = rp.build_report(
            district_id=district_id,
            run_id=run_id,
            state=rp.REFUSED,
            issues=issues,
            reason=_refused_reason(issues),
        )
        _finish(roster_store, notifier, run_id, district_id, rp.REFUSED, report)
        raise dg.Failure(description=f"delivery refused: {exc}", allow_retries=False) from exc
    except intake.IntakeError as exc:
        report = rp.build_report(
            district_id=district_id, run_id=run_id, state=rp.FAILED, issues=[], reason=str(exc)
        )
        _finish(roster_store, notifier, run_id, district_id, rp.FAILED, report)
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    _prune_landings(root, keep=delivery_storage.keep_landings)
    yield dg.Output(
        landed,
        metadata={
            "source": district.source_url.split("@")[-1],
            "source_kind": landed.source_kind,
            "archive": landed.archive_name or "",
            "fingerprint": landed.fingerprint,
            "manifest": landed.manifest,
            "passwords_redacted": landed.passwords_redacted,
            "files": dg.MetadataValue.md(
                "| file | bytes delivered | sha256 delivered | passwords redacted |\n"
                "|---|---|---|---|\n"
                + "\n".join(
                    f"| {f.name} | {f.size} | `{f.sha256[:16]}…` | {f.passwords_redacted} |"
                    for f in sorted(landed.files.values(), key=lambda f: f.name)
                )
            ),
            "warnings": dg.MetadataValue.md(_issues_markdown(landed.issues)),
            "landing_copy": str(landed.directory),
        },
    )


def _prune_landings(root, keep: int) -> None:
    """Keep the newest `keep` landing copies of a district (they hold personal data), and drop
    leftovers of downloads interrupted by a killed process."""
    stale = time.time() - _LEFTOVER_AGE_S  # never a concurrent run's download in progress
    for leftover in root.glob(".*"):
        if leftover.stat().st_mtime < stale:
            shutil.rmtree(leftover, ignore_errors=True)
    copies = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in copies[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


@dg.asset(
    partitions_def=districts_partitions,
    group_name=GROUP,
    kinds={"pandas", "pandera"},
    owners=_OWNERS,
    check_specs=[
        dg.AssetCheckSpec(
            "delivery_accepted",
            asset="validated_oneroster_frames",
            blocking=True,
            description="No file-level problem (missing file or column, bad encoding, empty "
            "required file, manifest contradicting the files). Failing refuses the delivery.",
        ),
        dg.AssetCheckSpec(
            "rows_valid",
            asset="validated_oneroster_frames",
            description="Rows rejected by the pandera models or by reference checks (warns; "
            "rejected rows are left untouched in the roster).",
        ),
    ],
    description="orgs, users, roles, classes, enrollments (and academicSessions/courses) "
    "validated with pandera DataFrameModels; rejected rows removed and their sourcedIds "
    "protected from archiving. Passwords are dropped on read.",
)
def validated_oneroster_frames(
    context: dg.AssetExecutionContext,
    oneroster_delivery: intake.LandedDelivery,
    roster_store: RosterStore,
    notifier: Notifier,
) -> Iterator[dg.Output[ValidatedDelivery] | dg.AssetCheckResult]:
    district_id = context.partition_key
    run_id = context.run.run_id
    validated = sync.validate_landed_delivery(
        roster_store.engine(), district_id, oneroster_delivery.directory
    )
    # Intake warnings (ignored files, stale upload markers, ...) lead the run's issues, so they
    # reach every report from here on (refused, held, dry run, applied).
    validated.issues[:0] = getattr(oneroster_delivery, "issues", [])
    file_errors = validated.file_errors
    row_errors = validated.row_errors()
    if validated.refused:
        reason = _refused_reason(file_errors)
        report = rp.build_report(
            district_id=district_id,
            run_id=run_id,
            state=rp.REFUSED,
            issues=validated.issues,
            reason=reason,
            rows_read=validated.rows_read,
        )
        _finish(
            roster_store,
            notifier,
            run_id,
            district_id,
            rp.REFUSED,
            report,
            fingerprint=oneroster_delivery.fingerprint,
        )
    yield dg.Output(
        validated,
        metadata={
            "oneroster_version": validated.version or "unknown",
            "modes": dg.MetadataValue.json(validated.modes),
            "rows_read": dg.MetadataValue.json(validated.rows_read),
            "dagster/row_count": sum(validated.rows_read.values()),
            "rows_kept": dg.MetadataValue.json({k: len(v) for k, v in validated.frames.items()}),
        },
    )
    yield dg.AssetCheckResult(
        check_name="delivery_accepted",
        passed=not validated.refused,
        metadata={
            "file_errors": len(file_errors),
            "details": dg.MetadataValue.md(_issues_markdown(file_errors)),
        },
    )
    yield dg.AssetCheckResult(
        check_name="rows_valid",
        passed=not row_errors,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "rejected_rows": len(row_errors),
            "details": dg.MetadataValue.md(_issues_markdown(row_errors)),
        },
    )


@dg.asset(
    partitions_def=districts_partitions,
    group_name=GROUP,
    kinds={"pandas"},
    owners=_OWNERS,
    description="Capti's model of the delivery: locations (schools; the district org), accounts "
    "with Capti roles (student, teacher, school_admin, district_admin), memberships, classes and "
    "enrollments.",
)
def resolved_roster(
    context: dg.AssetExecutionContext,
    validated_oneroster_frames: ValidatedDelivery,
    roster_store: RosterStore,
) -> dg.Output[ResolvedRoster]:
    roster = sync.resolve_delivery(
        roster_store.engine(), context.partition_key, validated_oneroster_frames
    )
    users = roster.frames["users"]
    return dg.Output(
        roster,
        metadata={
            "records": dg.MetadataValue.json({k: len(v) for k, v in roster.frames.items()}),
            "roles": dg.MetadataValue.json(
                {str(k): int(v) for k, v in users["role"].value_counts().items()}
            ),
            "modes": dg.MetadataValue.json(roster.modes),
            "delivered_schools": len(roster.delivered_schools),
        },
    )


@dg.asset(
    partitions_def=districts_partitions,
    group_name=GROUP,
    kinds={"pandas"},
    owners=_OWNERS,
    check_specs=[
        dg.AssetCheckSpec(
            "within_safety_limits",
            asset="roster_diff",
            blocking=True,
            description="The plan stays under the district's thresholds (default: 10 % archived, "
            "75 % updated per entity) and the delivery is as complete as the last applied one. "
            "Failing holds the plan for `capti-sync approve` / `discard`.",
        )
    ],
    description="The plan: creates, updates, archives and restores per entity, membership "
    "changes and possible duplicates, computed against the live roster store.",
)
def roster_diff(
    context: dg.AssetExecutionContext,
    resolved_roster: ResolvedRoster,
    roster_store: RosterStore,
    notifier: Notifier,
) -> Iterator[dg.Output[Plan] | dg.AssetCheckResult]:
    district_id = context.partition_key
    run_id = context.run.run_id
    engine = roster_store.engine()
    try:
        planned = sync.plan_sync(engine, district_id, resolved_roster)
    except ThresholdsError as exc:  # malformed stored settings: fail clearly, apply nothing
        reason = (
            f"district {district_id} has invalid thresholds: {exc}; nothing applied (fix them "
            f"with `capti-sync district set {district_id} --thresholds ...`)"
        )
        report = rp.build_report(
            district_id=district_id, run_id=run_id, state=rp.FAILED, issues=[], reason=reason
        )
        _finish(roster_store, notifier, run_id, district_id, rp.FAILED, report)
        raise dg.Failure(description=reason, allow_retries=False) from exc
    plan = planned.plan
    counts = plan.counts()
    dry_run = bool(context.run.tags.get(DRY_RUN_TAG))
    held = bool(planned.holds) and not dry_run
    if held or dry_run:
        state = rp.HELD if held else rp.DRY_RUN
        reason = (
            "held by safety rules: " + "; ".join(h.message for h in planned.holds)
            if held
            else "dry run: plan stored, nothing applied"
        )
        report = rp.build_report(
            district_id=district_id,
            run_id=run_id,
            state=state,
            issues=plan.issues,
            counts=counts,
            reason=reason,
            holds=[h.as_dict() for h in planned.holds],
            affected=rp.affected_ids(plan.changes),
            rows_read=resolved_roster.rows_read,
            extra={
                "membership_changes": plan.membership_changes,
                "skipped_by_adds_only": planned.skipped_by_adds_only,
            },
        )
        sync.store_plan(engine, run_id, plan)
        _finish(
            roster_store,
            notifier if held else None,
            run_id,
            district_id,
            state,
            report,
            counts=counts,
            base_version=plan.base_version,
        )
        if held:  # a newer hold replaces the district's older held plans
            sync.supersede_older_holds(engine, district_id, run_id)
    yield dg.Output(
        plan,
        metadata={
            "counts": dg.MetadataValue.json(counts),
            "total_changes": plan.total(),
            "possible_duplicates": len(plan.duplicates),
            "base_version": plan.base_version,
        },
    )
    yield dg.AssetCheckResult(
        check_name="within_safety_limits",
        passed=not held,
        metadata={
            "holds": dg.MetadataValue.md(
                "\n".join(f"- {h.message}" for h in planned.holds) or "none"
            ),
        },
    )


@dg.asset(
    partitions_def=districts_partitions,
    group_name=GROUP,
    kinds={"sqlite", "postgres"},
    owners=_OWNERS,
    pool=APPLY_POOL,
    description="The plan written to the roster store in one transaction per district, with a "
    "change ledger for undo. A plan computed against an older roster is never applied.",
)
def applied_roster_changes(
    context: dg.AssetExecutionContext,
    roster_diff: Plan,
    roster_store: RosterStore,
    notifier: Notifier,
) -> dg.Output[AppliedChanges]:
    run_id = context.run.run_id
    if context.run.tags.get(DRY_RUN_TAG):
        raise dg.Failure("dry runs never apply", allow_retries=False)
    if roster_diff.is_empty():
        applied = AppliedChanges(run_id, roster_diff.base_version, 0, roster_diff.counts())
    else:
        try:
            applied = sync.apply_in_transaction(roster_store.engine(), roster_diff, run_id)
        except st.StalePlanError as exc:
            report = rp.build_report(
                district_id=context.partition_key,
                run_id=run_id,
                state=rp.FAILED,
                issues=roster_diff.issues,
                reason=str(exc),
            )
            _finish(roster_store, notifier, run_id, context.partition_key, rp.FAILED, report)
            raise dg.Failure(description=str(exc), allow_retries=False) from exc
    return dg.Output(
        applied,
        metadata={
            "rows_written": applied.rows_written,
            "roster_version": applied.roster_version,
            "counts": dg.MetadataValue.json(applied.counts),
        },
    )


@dg.asset(
    partitions_def=districts_partitions,
    group_name=GROUP,
    kinds={"json"},
    owners=_OWNERS,
    description="The sync report: counts per entity and action, every error and warning with "
    "file, line, column and sourcedId (no personal data). Stored for the status page and "
    "`capti-sync report`.",
)
def sync_report(
    context: dg.AssetExecutionContext,
    roster_diff: Plan,
    applied_roster_changes: AppliedChanges,
    roster_store: RosterStore,
) -> dg.Output[dict]:
    district_id = context.partition_key
    run_id = context.run.run_id
    state = rp.NO_CHANGES if roster_diff.is_empty() else rp.APPLIED
    errors = sum(1 for i in roster_diff.issues if i.severity == ERROR)
    report = rp.build_report(
        district_id=district_id,
        run_id=run_id,
        state=state,
        issues=roster_diff.issues,
        counts=applied_roster_changes.counts,
        reason=None if state == rp.APPLIED else "the roster already matches this delivery",
        affected=rp.affected_ids(roster_diff.changes),
        rows_read=roster_diff.rows_read,
        extra={
            "rows_written": applied_roster_changes.rows_written,
            "membership_changes": roster_diff.membership_changes,
            "possible_duplicates": roster_diff.duplicates.to_dict("records"),
            "skipped_by_adds_only": roster_diff.skipped_by_adds_only,
        },
    )
    _finish(
        roster_store,
        None,
        run_id,
        district_id,
        state,
        report,
        counts=applied_roster_changes.counts,
        base_version=roster_diff.base_version,
    )
    return dg.Output(
        report,
        metadata={
            "state": state,
            "errors": errors,
            "warnings": report["warning_count"],
            "summary": rp.summary_line(report),
            "report": dg.MetadataValue.md(rp.to_markdown(report, max_issues=50)),
        },
    )


roster_sync_assets = [
    oneroster_delivery,
    validated_oneroster_frames,
    resolved_roster,
    roster_diff,
    applied_roster_changes,
    sync_report,
]
