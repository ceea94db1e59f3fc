"""The sync report: counts per entity and action, errors and warnings; Markdown, JSON and CSV.

It carries file, line, column and sourcedId only: never names, emails or passwords. The CSV is
safe to open in a spreadsheet (formula-looking cells are escaped).
"""

import csv
import io
from collections.abc import Sequence
from typing import Any

from capti_pipeline.lib.issues import ERROR, WARNING, Issue

# Outcome of a run, as stored in sync_runs.state and shown on the status page.
APPLIED = "applied"
NO_CHANGES = "no_changes"
REFUSED = "refused"
HELD = "held"
DRY_RUN = "dry_run"
FAILED = "failed"
NOT_READY = "not_ready"
DISCARDED = "discarded"
APPROVED = "approved"
# A held plan that can no longer be approved: a newer hold replaced it, or a later run changed
# the roster (its stored plan is dropped).
SUPERSEDED = "superseded"

# The stored report keeps this many sourcedIds per entity and action (the counts are always
# complete); `capti-sync report --format json|csv` reads every id of a held or dry-run plan
# from the stored plan.
MAX_LISTED_IDS = 200
MARKDOWN_SAMPLE_IDS = 50
# Where each entity comes from, for the CSV's file column.
_ENTITY_FILES = {
    "locations": "orgs.csv",
    "users": "users.csv",
    "classes": "classes.csv",
    "enrollments": "enrollments.csv",
}
_FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def build_report(
    *,
    district_id: str,
    run_id: str,
    state: str,
    issues: Sequence[Issue],
    counts: dict[str, dict[str, int]] | None = None,
    reason: str | None = None,
    holds: Sequence[dict[str, Any]] = (),
    affected: dict[str, dict[str, list[str]]] | None = None,
    rows_read: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    errors = [i for i in issues if i.severity == ERROR]
    warnings = [i for i in issues if i.severity == WARNING]
    report = {
        "district": district_id,
        "run_id": run_id,
        "state": state,
        "reason": reason,
        "counts": counts or {},
        "error_count": len(errors),
        "warning_count": len(warnings),
        "issues": [i.as_dict() for i in issues],
        "holds": list(holds),
        "affected": affected or {},
        "rows_read": rows_read or {},
    }
    if extra:
        report.update(extra)
    return report


def summary_line(report: dict[str, Any]) -> str:
    counts = report.get("counts") or {}
    parts = []
    for entity, actions in counts.items():
        done = ", ".join(f"{n} {a}" for a, n in actions.items() if n)
        if done:
            parts.append(f"{entity}: {done}")
    body = "; ".join(parts) if parts else "no changes"
    tail = f" ({report.get('error_count', 0)} errors, {report.get('warning_count', 0)} warnings)"
    reason = f" — {report['reason']}" if report.get("reason") else ""
    return f"{report['district']} run {report['run_id']}: {report['state']}{reason}. {body}{tail}"


def to_markdown(report: dict[str, Any], *, max_issues: int = 200) -> str:
    lines = [
        f"# Sync report — district `{report['district']}`",
        "",
        f"- run: `{report['run_id']}`",
        f"- state: **{report['state']}**",
    ]
    if report.get("reason"):
        lines.append(f"- reason: {report['reason']}")
    lines.append(
        f"- errors: {report.get('error_count', 0)}, warnings: {report.get('warning_count', 0)}"
    )
    counts = report.get("counts") or {}
    if counts:
        actions = sorted({a for per in counts.values() for a in per})
        lines += ["", "## Changes", "", "| entity | " + " | ".join(actions) + " |"]
        lines.append("|---" * (len(actions) + 1) + "|")
        for entity, per in counts.items():
            cells = " | ".join(str(per.get(a, 0)) for a in actions)
            lines.append(f"| {entity} | {cells} |")
    if report.get("holds"):
        lines += ["", "## Held by safety rules", ""]
        lines += [f"- {hold['message']}" for hold in report["holds"]]
    affected = report.get("affected") or {}
    if affected:
        lines += ["", "## Affected records (sourcedIds)", ""]
        for entity, per in affected.items():
            for action, ids in per.items():
                total = affected_total(report, entity, action)
                shown = ", ".join(ids[:MARKDOWN_SAMPLE_IDS])
                rest = total - min(len(ids), MARKDOWN_SAMPLE_IDS)
                more = f" … and {rest} more (--format csv for all)" if rest > 0 else ""
                lines.append(f"- {entity} {action} ({total}): {shown}{more}")
    issues = report.get("issues") or []
    if issues:
        lines += [
            "",
            "## Errors and warnings",
            "",
            "| severity | file | line | column | sourcedId | message |",
            "|---|---|---|---|---|---|",
        ]
        for issue in issues[:max_issues]:
            cells = [
                issue["severity"],
                issue["file"],
                str(issue["line"] or ""),
                issue["column"],
                issue["sourced_id"],
                issue["message"],
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if len(issues) > max_issues:
            lines.append(f"\n… and {len(issues) - max_issues} more (see the CSV report)")
    return "\n".join(lines) + "\n"


def spreadsheet_safe(value: object) -> str:
    text = "" if value is None else str(value)
    if text.startswith(_FORMULA_PREFIXES):
        return "'" + text
    return text


def to_csv(report: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["severity", "file", "line", "column", "sourcedId", "message"])
    for issue in report.get("issues") or []:
        writer.writerow(
            [
                spreadsheet_safe(issue["severity"]),
                spreadsheet_safe(issue["file"]),
                issue["line"] or "",
                spreadsheet_safe(issue["column"]),
                spreadsheet_safe(issue["sourced_id"]),
                spreadsheet_safe(issue["message"]),
            ]
        )
    # Then one `change` row per affected sourcedId: the file it comes from, and what the run
    # does (or, held or dry run, would do) to it.
    for entity, per in (report.get("affected") or {}).items():
        for action, ids in per.items():
            file = _ENTITY_FILES.get(entity, entity)
            for sourced_id in ids:
                writer.writerow(
                    ["change", file, "", "", spreadsheet_safe(sourced_id), f"{entity} {action}"]
                )
            missing = affected_total(report, entity, action) - len(ids)
            if missing > 0:  # an applied run's report keeps a sample only: say so, never hide it
                writer.writerow(
                    [
                        "change",
                        file,
                        "",
                        "",
                        "",
                        f"{entity} {action}: {missing} more not listed (the stored report keeps "
                        f"{len(ids)})",
                    ]
                )
    return buffer.getvalue()


def affected_total(report: dict[str, Any], entity: str, action: str) -> int:
    """How many records the run affects for one entity and action: the report's counts (always
    complete), not the length of the listed sample."""
    listed = len((report.get("affected") or {}).get(entity, {}).get(action) or [])
    counted = ((report.get("counts") or {}).get(entity) or {}).get(action)
    return max(listed, int(counted)) if isinstance(counted, int | float) else listed


def affected_ids(
    changes: dict[str, Any], limit: int | None = MAX_LISTED_IDS
) -> dict[str, dict[str, list[str]]]:
    """sourcedIds per entity and action of a plan's changes; at most `limit` per action
    (None: every one)."""
    out: dict[str, dict[str, list[str]]] = {}
    for entity, frame in changes.items():
        if frame is None or frame.empty:
            continue
        per: dict[str, list[str]] = {}
        for action, group in frame.groupby("action", sort=True)["sourcedId"]:
            ids = group if limit is None else group.head(limit)
            per[str(action)] = ids.tolist()
        out[entity] = per
    return out


def with_every_affected_id(
    report: dict[str, Any], changes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The report with every affected sourcedId of its plan when `changes` (the stored plan) is
    given; `affected_complete` says whether the lists are complete."""
    if changes:
        return {**report, "affected": affected_ids(changes, limit=None), "affected_complete": True}
    complete = all(
        len(ids) >= affected_total(report, entity, action)
        for entity, per in (report.get("affected") or {}).items()
        for action, ids in per.items()
    )
    return {**report, "affected_complete": complete}
