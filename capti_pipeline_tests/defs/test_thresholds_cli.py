"""`capti-sync district set ID --thresholds JSON`: the documented shape is enforced, settings are
merged (null removes a key), and malformed stored thresholds fail a run clearly instead of
crashing it. Through the CLI in this process and real Dagster runs."""

import json
from collections.abc import Callable

import pytest

from capti_pipeline.lib import store as st
from capti_pipeline_tests.support.harness import EDFI, CaptiEnv

Cli = Callable[..., tuple[int, str]]


def stored(env: CaptiEnv, district_id: str = "edfi") -> dict:
    with env.engine().connect() as conn:
        return st.get_district(conn, district_id).thresholds


@pytest.fixture
def edfi(capti_env: CaptiEnv) -> CaptiEnv:
    capti_env.register("edfi", EDFI)
    return capti_env


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ('{"user": {"archive": {"percent": 5}}}', 'unknown key "user"'),
        ('{"users": {"archives": {"percent": 5}}}', 'unknown action "archives" in "users"'),
        ('{"users": {"archive": 5}}', '"users.archive" must be an object'),
        ('{"users": {"archive": {"pct": 5}}}', 'unknown limit "pct" in "users.archive"'),
        ('{"*": {"update": {"percent": -1}}}', '"*.update.percent" must be a number >= 0'),
        ('{"users": {"archive": {"count": "200"}}}', '"users.archive.count" must be a number'),
        ('{"users": {"archive": {"count": true}}}', '"users.archive.count" must be a number'),
        ('{"users": {"archive": {"percent": NaN}}}', '"users.archive.percent" must be a number'),
        ('{"shrink_percent": 150}', '"shrink_percent" must be a number from 0 to 100'),
        ('{"users": [5]}', '"users" must be an object of actions'),
        ("[1, 2]", "thresholds must be a JSON object"),
        ("{users: 1}", "--thresholds is not valid JSON"),
    ],
)
def test_malformed_thresholds_are_refused_naming_the_key(
    edfi: CaptiEnv, run_cli: Cli, value: str, named: str
) -> None:
    code, out = run_cli(
        "district", "set", "edfi", "--thresholds", '{"users": {"create": {"count": 9}}}'
    )
    assert code == 0, out
    code, out = run_cli("district", "set", "edfi", "--thresholds", value)
    assert code == 1
    assert named in out, out
    assert "Traceback" not in out
    assert stored(edfi) == {"users": {"create": {"count": 9}}}  # nothing changed


def test_thresholds_are_merged_and_null_removes_a_key(edfi: CaptiEnv, run_cli: Cli) -> None:
    def set_(value: str) -> dict:
        code, out = run_cli("district", "set", "edfi", "--thresholds", value)
        assert code == 0, out
        shown = json.loads(out.split("thresholds now: ", 1)[1])
        assert shown == stored(edfi)
        return shown

    set_('{"users": {"archive": {"percent": 5, "count": 200}}}')
    assert set_('{"users": {"archive": {"count": 300}}}') == {
        "users": {"archive": {"percent": 5, "count": 300}}
    }
    assert set_('{"*": {"update": {"percent": 50}}, "shrink_percent": 30}') == {
        "users": {"archive": {"percent": 5, "count": 300}},
        "*": {"update": {"percent": 50}},
        "shrink_percent": 30,
    }
    assert set_('{"users": {"archive": {"count": null}}, "shrink_percent": null}') == {
        "users": {"archive": {"percent": 5}},
        "*": {"update": {"percent": 50}},
    }
    assert set_('{"users": {"archive": null}}') == {"*": {"update": {"percent": 50}}}
    assert set_('{"*": null}') == {}
    # --adds-only alone leaves the thresholds as they are.
    set_('{"classes": {"create": {"count": 1000}}}')
    code, out = run_cli("district", "set", "edfi", "--adds-only", "on")
    assert code == 0, out
    assert stored(edfi) == {"classes": {"create": {"count": 1000}}}


def test_a_bad_key_stored_before_is_named_until_it_is_fixed(edfi: CaptiEnv, run_cli: Cli) -> None:
    with edfi.engine().begin() as conn:  # written by an older version, or by hand
        st.upsert_district(conn, "edfi", thresholds={"users": {"archive": 5}})
    code, out = run_cli(
        "district", "set", "edfi", "--thresholds", '{"*": {"update": {"percent": 9}}}'
    )
    assert code == 1 and "stored thresholds are invalid" in out and '"users.archive"' in out
    code, out = run_cli(
        "district", "set", "edfi", "--thresholds", '{"users": {"archive": {"percent": 20}}}'
    )
    assert code == 0, out
    assert stored(edfi) == {"users": {"archive": {"percent": 20}}}


@pytest.mark.parametrize(
    "malformed",
    [
        {"users": {"archive": 5}},
        {"users": {"archive": {"percent": "five"}}},
        {"shrink_percent": "half"},
        ["users"],
    ],
)
def test_malformed_stored_thresholds_fail_the_run_clearly(
    edfi: CaptiEnv, run_cli: Cli, status_json: Callable[..., dict], malformed: object
) -> None:
    with edfi.engine().begin() as conn:
        st.upsert_district(conn, "edfi", thresholds=malformed)
    code, out = run_cli("run", "edfi")
    assert code == 1, out
    assert "edfi has invalid thresholds" in out and "nothing applied" in out, out
    assert "Traceback" not in out and "TypeError" not in out and "AttributeError" not in out
    shown = status_json("edfi")
    assert (shown["state"], shown["running"]) == ("failed", False)
    assert "invalid thresholds" in shown["detail"]
    assert edfi.snapshot("edfi")["users"] == []  # nothing applied

    # Fixed through the CLI (a stored value that is not even an object is replaced whole).
    code, out = run_cli(
        "district", "set", "edfi", "--thresholds", '{"users": null, "shrink_percent": null}'
    )
    assert code == 0, out
    code, out = run_cli("run", "edfi")
    assert code == 0 and ": applied." in out, out
