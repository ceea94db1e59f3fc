"""`capti-sync snapshot`: an archived user was removed from its schools, so it shows no
locations; the store keeps the last ones, which a restore gives back."""

import sqlalchemy as sa

from capti_pipeline.lib import store as st
from capti_pipeline.lib.generator import remove_students
from capti_pipeline_tests.support.operator import NO_THRESHOLDS, deliver


def test_archived_users_show_no_locations_and_get_them_back_when_restored(hp_district, cli_run):
    env, district, _ = hp_district
    before = {u["sourcedId"]: u for u in env.snapshot("hp")["users"]}
    cli_run("district", "set", "hp", "--thresholds", NO_THRESHOLDS)
    night2, leavers = remove_students(district, 0.05, seed=2)
    deliver(env, night2, "hp")
    assert env.run("hp").state == "applied"
    users = {u["sourcedId"]: u for u in env.snapshot("hp")["users"]}
    assert leavers
    for sourced_id in leavers:
        assert users[sourced_id]["status"] == "archived"
        assert users[sourced_id]["locations"] == []  # removed from its schools
        assert before[sourced_id]["locations"]  # it had some
    with env.engine().connect() as conn:  # memberships ended; the store keeps the last schools
        ended = (
            conn.execute(
                sa.select(st.memberships.c.status).where(
                    st.memberships.c.district_id == "hp",
                    st.memberships.c.user_sourced_id == leavers[0],
                )
            )
            .scalars()
            .all()
        )
        stored = conn.execute(
            sa.select(st.users.c.locations).where(
                st.users.c.district_id == "hp", st.users.c.sourced_id == leavers[0]
            )
        ).scalar_one()
    assert ended and set(ended) == {"archived"}
    assert stored.split(",") == before[leavers[0]]["locations"]

    deliver(env, district, "hp")  # they come back: same accounts, same schools
    restored = env.run("hp")
    assert restored.report["counts"]["users"]["restore"] == len(leavers)
    users = {u["sourcedId"]: u for u in env.snapshot("hp")["users"]}
    for sourced_id in leavers:
        assert users[sourced_id] == before[sourced_id]
