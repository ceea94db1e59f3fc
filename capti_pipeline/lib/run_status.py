"""Reconcile the roster store's run records with how the Dagster run actually ended."""

from dataclasses import dataclass

from sqlalchemy.engine import Engine

from capti_pipeline.lib import report as rp
from capti_pipeline.lib import store as st


@dataclass(frozen=True)
class RecordedFailure:
    district_id: str
    reason: str
    notify: bool


def record_dagster_failure(engine: Engine, run_id: str, message: str) -> RecordedFailure | None:
    """Mark a run that died while 'running' as failed; outcomes already recorded are kept."""
    with engine.begin() as conn:
        run = st.get_run(conn, run_id)
        if run is None:
            return None
        if run.state != "running":
            return RecordedFailure(run.district_id, run.reason or run.state, notify=False)
        reason = f"run failed: {message}"[:2000]
        report = rp.build_report(
            district_id=run.district_id, run_id=run_id, state=rp.FAILED, issues=[], reason=reason
        )
        st.record_run_end(conn, run_id, state=rp.FAILED, reason=reason, report=report)
    return RecordedFailure(run.district_id, reason, notify=True)
