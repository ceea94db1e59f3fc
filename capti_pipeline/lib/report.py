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

MAX_LISTED_IDS = 200
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
                shown = ", ".join(ids[:50])
                more = f" … (+{len(ids) - 50})" if len(ids) > 50 else ""
                lines.append(f"- {entity} {action} ({len(ids)}): {shown}{more}")
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
    return buffer.getvalue()


def affected_ids(
    changes: dict[str, Any], limit: int = MAX_LISTED_IDS
) -> dict[str, dict[str, list[str]]]:
    out: dict[str, dict[str, list[str]]] = {}
    for entity, frame in changes.items():
        if frame is None or frame.empty:
            continue
        per: dict[str, list[str]] = {}
        for action, group in frame.groupby("action", sort=True)["sourcedId"]:
            per[str(action)] = group.head(limit).tolist()
        out[entity] = per
    return out
