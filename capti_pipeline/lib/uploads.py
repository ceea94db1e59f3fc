"""Decide when a watched district's new upload is complete enough to start a sync.

Used by the optional upload sensor: a delivery is taken when its listing (names, sizes, mtimes)
is the same on two consecutive observations, includes manifest.csv, and differs from the
listing that last started a run. The state lives in the sensor cursor (no sleeping in sensors).
"""

import hashlib
import json
from dataclasses import dataclass, field

Listing = dict[str, tuple[int, float]]


def listing_signature(listing: Listing) -> str:
    canonical = json.dumps(sorted((name, size, mtime) for name, (size, mtime) in listing.items()))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass
class WatchState:
    """Per district: the last observed listing and the listing that last started a run."""

    observed: dict[str, str] = field(default_factory=dict)
    launched: dict[str, str] = field(default_factory=dict)

    def to_cursor(self) -> str:
        return json.dumps({"observed": self.observed, "launched": self.launched}, sort_keys=True)

    @classmethod
    def from_cursor(cls, cursor: str | None) -> "WatchState":
        if not cursor:
            return cls()
        data = json.loads(cursor)
        return cls(dict(data.get("observed", {})), dict(data.get("launched", {})))


def ready_to_launch(state: WatchState, district_id: str, listing: Listing) -> str | None:
    """Record this observation; return the signature to launch for, or None to wait."""
    names = [name.lower() for name in listing]
    complete = "manifest.csv" in names or any(name.endswith(".zip") for name in names)
    if not complete:
        state.observed.pop(district_id, None)
        return None
    signature = listing_signature(listing)
    previous = state.observed.get(district_id)
    state.observed[district_id] = signature
    if previous != signature:
        return None  # changed since the last look (or first look): wait for it to settle
    if state.launched.get(district_id) == signature:
        return None  # this exact delivery already started a run
    state.launched[district_id] = signature
    return signature
