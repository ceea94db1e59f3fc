"""Safety rules that hold a plan for a human instead of applying it.

Thresholds are set per entity and action, as a percentage of the current active roster and/or an
absolute count; a plan over any of them is held. Defaults follow Clever's holds: more than 10 %
archived or more than 75 % updated of any entity. A district's own settings override them, e.g.
`{"users": {"archive": {"percent": 5, "count": 200}}, "*": {"update": {"percent": 50}}}`.
A first import (nothing active yet for that entity) is never held.
"""

from dataclasses import asdict, dataclass
from typing import Any

from capti_pipeline.lib.diff import ACTIONS, Plan
from capti_pipeline.lib.resolve import ENTITIES

DEFAULT_THRESHOLDS: dict[str, dict[str, dict[str, float]]] = {
    "*": {"archive": {"percent": 10.0}, "update": {"percent": 75.0}},
}
DEFAULT_SHRINK_PERCENT = 50.0
_CHECKED_FILES = ("orgs.csv", "users.csv", "classes.csv", "enrollments.csv", "roles.csv")


@dataclass(frozen=True)
class Hold:
    rule: str  # threshold | completeness
    entity: str
    action: str
    count: int
    limit: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def effective_thresholds(
    overrides: dict[str, Any] | None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Defaults, then the district's `*` entries, then its per-entity entries."""
    merged: dict[str, dict[str, dict[str, float]]] = {}
    layers = [DEFAULT_THRESHOLDS, overrides or {}]
    for entity in ENTITIES:
        per: dict[str, dict[str, float]] = {}
        for layer in layers:
            for key in ("*", entity):
                for action, limits in (layer.get(key) or {}).items():
                    if action in ACTIONS:
                        per[action] = dict(limits)
        merged[entity] = per
    return merged


def check_thresholds(
    plan: Plan, active_counts: dict[str, int], overrides: dict[str, Any] | None = None
) -> list[Hold]:
    holds: list[Hold] = []
    counts = plan.counts()
    for entity, per in effective_thresholds(overrides).items():
        current = active_counts.get(entity, 0)
        if current == 0:
            continue  # first import of this entity
        for action, limits in per.items():
            count = counts.get(entity, {}).get(action, 0)
            if count == 0:
                continue
            percent = limits.get("percent")
            absolute = limits.get("count")
            share = 100.0 * count / current
            if percent is not None and share > float(percent):
                holds.append(
                    Hold(
                        "threshold",
                        entity,
                        action,
                        count,
                        f"{percent:g}%",
                        f"{entity} {action}: {count} of {current} active ({share:.1f}%) exceeds "
                        f"the {percent:g}% limit",
                    )
                )
            elif absolute is not None and count > int(absolute):
                holds.append(
                    Hold(
                        "threshold",
                        entity,
                        action,
                        count,
                        f"{int(absolute)} records",
                        f"{entity} {action}: {count} exceeds the limit of {int(absolute)} records",
                    )
                )
    return holds


def check_completeness(
    rows_read: dict[str, int],
    modes: dict[str, str],
    last_rows_read: dict[str, int] | None,
    shrink_percent: float = DEFAULT_SHRINK_PERCENT,
) -> list[Hold]:
    """Compare the delivery's files and row counts with the last applied delivery."""
    if not last_rows_read:
        return []
    # A delta package legitimately declares unchanged files absent; a full (bulk) snapshot that
    # lacks a file the last one had is the classic broken export, so only bulk packages hold.
    bulk_package = "delta" not in {modes.get(f) for f in _CHECKED_FILES}
    holds: list[Hold] = []
    for file in _CHECKED_FILES:
        before = last_rows_read.get(file)
        if not before:
            continue
        mode = modes.get(file, "absent")
        if mode == "delta":
            continue
        now = rows_read.get(file)
        if now is None or mode == "absent":
            if not bulk_package:
                continue
            holds.append(
                Hold(
                    "completeness",
                    file,
                    "missing",
                    0,
                    "file required",
                    f"{file} is missing but the last applied delivery had it ({before} rows)",
                )
            )
            continue
        shrink = 100.0 * (before - now) / before
        if shrink > shrink_percent:
            holds.append(
                Hold(
                    "completeness",
                    file,
                    "shrank",
                    now,
                    f"{shrink_percent:g}% shrink",
                    f"{file} shrank from {before} to {now} rows ({shrink:.0f}% fewer), more than "
                    f"{shrink_percent:g}%",
                )
            )
    return holds
