"""Every `capti-sync` failure is one clear line and exit 1, never a traceback (unless --debug);
a not-ready run prints its state and reason only; a refused run's errors are listed once."""

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from capti_pipeline_tests.defs.conftest import ProjectHome
from capti_pipeline_tests.fixtures.deliveries import baseline
from capti_pipeline_tests.support.harness import CaptiEnv


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def unreachable_store(project_home: ProjectHome) -> tuple[ProjectHome, int]:
    port = _closed_port()
    project_home.env["CAPTI_DATABASE_URL"] = f"postgresql+psycopg://capti@127.0.0.1:{port}/roster"
    return project_home, port


@pytest.mark.parametrize("args", [("status",), ("run", "X"), ("report", "X"), ("district", "list")])
def test_unreachable_roster_store_is_one_line(unreachable_store, args: tuple[str, ...]) -> None:
    home, port = unreachable_store
    done = home.cli(*args)
    assert done.returncode == 1
    assert done.stdout == ""
    assert (
        done.stderr
        == f"capti-sync: roster store unreachable: connection refused at 127.0.0.1:{port}\n"
    )


def test_debug_shows_the_traceback(unreachable_store) -> None:
    home, _ = unreachable_store
    done = home.cli("--debug", "status")
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "OperationalError" in done.stderr


def test_an_unexpected_error_is_one_line_naming_the_command(project_home: ProjectHome) -> None:
    not_a_folder = project_home.root / "dagster_home_is_a_file"
    not_a_folder.write_text("")
    project_home.env["DAGSTER_HOME"] = str(not_a_folder / "home")
    done = project_home.cli("status")
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith("capti-sync: status failed: NotADirectoryError: ")
    assert "--debug" in line and "Traceback" not in done.stderr

    project_home.env["CAPTI_LOG_LEVEL"] = "DEBUG"  # the traceback is there when asked for
    assert "Traceback (most recent call last)" in project_home.cli("status").stderr


def test_adding_a_district_whose_folder_does_not_exist_fails(project_home: ProjectHome) -> None:
    missing = project_home.root / "no" / "such" / "folder"
    done = project_home.cli("district", "add", "d1", "--source", str(missing))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (
        f"capti-sync: source folder {missing} does not exist; create it (or fix --source) and "
        "add the district again\n"
    )
    a_file = project_home.root / "file.csv"
    a_file.write_text("x")
    done = project_home.cli("district", "add", "d1", "--source", str(a_file))
    assert done.returncode == 1 and "is not a folder" in done.stderr
    listed = project_home.cli("district", "list")
    assert (listed.returncode, listed.stdout) == (0, "")


def test_a_not_ready_run_prints_its_state_and_reason_only(project_home: ProjectHome) -> None:
    project_home.env.pop("CAPTI_LOG_LEVEL")  # the default console level, as operators run it
    drop = project_home.root / "drop"
    drop.mkdir()
    assert project_home.cli("district", "add", "d1", "--source", str(drop)).returncode == 0
    done = project_home.cli("run", "d1")
    assert (done.returncode, done.stderr) == (0, "")
    [line] = done.stdout.splitlines()
    assert line.startswith("d1 run ")
    assert line.endswith(
        f": not_ready — no delivery in {drop} yet: the folder is empty. no changes "
        "(0 errors, 0 warnings)"
    )


def test_a_failed_step_names_its_cause(
    capti_env: CaptiEnv, run_cli: Callable[..., tuple[int, str]], tmp_path: Path
) -> None:
    capti_env.register("blocked", baseline().write(tmp_path / "drop"))
    (capti_env.root / "staging").write_text("in the way")  # the hand-over folder cannot exist
    code, out = run_cli("run", "blocked")
    assert code == 1
    [summary] = out.splitlines()
    assert ": failed — " in summary
    assert "step oneroster_delivery failed: NotADirectoryError: " in summary
    assert "Error occurred while" not in out and "Traceback" not in out


def test_a_refused_run_lists_each_error_once(
    capti_env: CaptiEnv, run_cli: Callable[..., tuple[int, str]], tmp_path: Path
) -> None:
    capti_env.register(
        "refused", baseline().drop_column("users.csv", "givenName").write(tmp_path / "drop")
    )
    code, out = run_cli("run", "refused")
    assert code == 2
    lines = out.splitlines()
    assert lines[0].endswith(
        ": refused — delivery refused: 1 file-level error in users.csv. no changes "
        "(1 errors, 0 warnings)"
    )
    assert lines[1:] == [
        "  ERROR users.csv column givenName: missing required column(s) for OneRoster 1.1: "
        "givenName",
        "  → nothing was applied; fix the delivery and run again",
    ]
