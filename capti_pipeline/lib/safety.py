"""Safety rules that hold a plan for a human instead of applying it.

Thresholds are set per entity and action, as a percentage of the current active roster and/or an
absolute count; a plan over any of them is held. Defaults follow Clever's holds: more than 10 %
archived or more than 75 % updated of any entity. A district's own settings override them, e.g.
`{"users": {"archive": {"percent": 5, "count": 200}}, "*": {"update": {"percent": 50}}}`.
A first import (nothing active yet for that entity) is never held.

The shape is checked (validate_thresholds) when an operator sets it and again before every run:
entities users, enrollments, classes, locations or "*"; actions create, update, archive, restore;
limits {"percent": >= 0, "count": >= 0}; top-level "shrink_percent" 0-100 tunes the completeness
rule. Settings are merged into the district's existing ones (merge_thresholds), null removes a key.
"""

import math
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


ENTITY_KEYS = (*ENTITIES, "*")
LIMIT_KEYS = ("percent", "count")
SHRINK_KEY = "shrink_percent"
_EXAMPLE = '{"users": {"archive": {"percent": 5, "count": 200}}}'


class ThresholdsError(ValueError):
    """Thresholds that do not have the documented shape; the message names the bad key."""


def _quoted(keys: tuple[str, ...]) -> str:
    return ", ".join(f'"{k}"' for k in keys)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def validate_thresholds(value: Any, *, allow_null: bool = False) -> None:
    """Raise ThresholdsError naming the first key that does not fit the documented shape.

    `allow_null`: an update given to merge_thresholds, where null means "remove this key".
    """

    def null_ok(item: Any) -> bool:
        return allow_null and item is None

    if not isinstance(value, dict):
        raise ThresholdsError(f"thresholds must be a JSON object like {_EXAMPLE}, not {value!r}")
    for key, per in value.items():
        if key == SHRINK_KEY:
            if null_ok(per):
                continue
            if not _is_number(per) or not 0 <= float(per) <= 100:
                raise ThresholdsError(
                    f'"{SHRINK_KEY}" must be a number from 0 to 100 (percent), not {per!r}'
                )
            continue
        if key not in ENTITY_KEYS:
            raise ThresholdsError(
                f'unknown key "{key}": expected an entity ({_quoted(ENTITY_KEYS)}) '
                f'or "{SHRINK_KEY}"'
            )
        if null_ok(per):
            continue
        if not isinstance(per, dict):
            raise ThresholdsError(
                f'"{key}" must be an object of actions, e.g. {{"archive": {{"percent": 5}}}}, '
                f"not {per!r}"
            )
        for action, limits in per.items():
            if action not in ACTIONS:
                raise ThresholdsError(
                    f'unknown action "{action}" in "{key}": expected one of {_quoted(ACTIONS)}'
                )
            if null_ok(limits):
                continue
            if not isinstance(limits, dict):
                raise ThresholdsError(
                    f'"{key}.{action}" must be an object like {{"percent": 5, "count": 200}}, '
                    f"not {limits!r}"
                )
            for limit, number in limits.items():
                if limit not in LIMIT_KEYS:
                    raise ThresholdsError(
                        f'unknown limit "{limit}" in "{key}.{action}": expected '
                        f"{_quoted(LIMIT_KEYS)}"
                    )
                if null_ok(number):
                    continue
                if not _is_number(number) or float(number) < 0:
                    raise ThresholdsError(
                        f'"{key}.{action}.{limit}" must be a number >= 0, not {number!r}'
                    )


def merge_thresholds(current: dict[str, Any] | None, update: dict[str, Any]) -> dict[str, Any]:
    """The district's thresholds with `update` merged in, key by key at every level; a null
    value removes that key (and an entity or action left empty disappears, so the defaults
    apply to it again). `update` is validated first; the result is validated too."""
    validate_thresholds(update, allow_null=True)

    def merge(base: Any, new: dict[str, Any]) -> dict[str, Any]:
        out = dict(base) if isinstance(base, dict) else {}
        for key, value in new.items():
            if value is None:
                out.pop(key, None)
            elif isinstance(value, dict):
                merged = merge(out.get(key), value)
                if merged:
                    out[key] = merged
                else:
                    out.pop(key, None)
            else:
                out[key] = value
        return out

    merged = merge(current or {}, update)
    try:
        validate_thresholds(merged)
    except ThresholdsError as exc:  # a bad key left over from before, not in this update
        raise ThresholdsError(
            f"the district's stored thresholds are invalid: {exc} (set it again, or remove it "
            "with null)"
        ) from None
    return merged


def shrink_percent(overrides: dict[str, Any] | None) -> float:
    """The completeness rule's shrink limit of a district (validated)."""
    validate_thresholds(overrides or {})
    return float((overrides or {}).get(SHRINK_KEY, DEFAULT_SHRINK_PERCENT))


def effective_thresholds(
    overrides: dict[str, Any] | None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Defaults, then the district's `*` entries, then its per-entity entries.

    Raises ThresholdsError for malformed settings (stored before they were validated, or
    edited by hand): a run fails with that reason instead of crashing half-way."""
    validate_thresholds(overrides or {})
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
            elif absolute is not None and count > float(absolute):
                holds.append(
                    Hold(
                        "threshold",
                        entity,
                        action,
                        count,
                        f"{absolute:g} records",
                        f"{entity} {action}: {count} exceeds the limit of {absolute:g} records",
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
