"""The apply step's concurrency pool, and creating its limit before runs race for it."""

import logging

import dagster as dg

# Caps concurrent write transactions on the roster store (limit: `concurrency.pools` in
# dagster.yaml).
APPLY_POOL = "roster_db"

log = logging.getLogger(__name__)


def ensure_pools(instance: dg.DagsterInstance) -> None:
    """Create the apply step's pool limit now, from one process. Dagster creates it lazily on
    the first claim, and two runs doing that at once on PostgreSQL can fail one of them
    (an IntegrityError handled inside an aborted transaction). Called wherever districts
    become runnable: registration, the discovery sensor, the schedule, `capti-sync run`."""
    storage = instance.event_log_storage
    try:
        if APPLY_POOL not in storage.get_concurrency_keys():
            storage.initialize_concurrency_limit_to_default(APPLY_POOL)
    except Exception:  # only a head start; the run's own claim still works
        log.debug("could not initialise pool %s", APPLY_POOL, exc_info=True)
