"""Helpers and fixtures (a pytest plugin, see conftest) for end-to-end tests that drive the
operator CLI over generated deliveries."""

import csv
import io
from collections.abc import Callable
from pathlib import Path

import pytest

from capti_pipeline import cli
from capti_pipeline.lib import store as st
from capti_pipeline.lib.generator import (
    DistrictSpec,
    GeneratedDistrict,
    generate_district,
    write_delivery,
)
from capti_pipeline_tests.support.harness import CaptiEnv

Cli = Callable[..., tuple[int, str]]
# Only the completeness rule may hold (the thresholds would hold a cut users.csv on their own).
NO_THRESHOLDS = '{"*": {"archive": {"percent": 100}, "update": {"percent": 100}}}'
HP_SPEC = DistrictSpec(district_id="hp", students=240, students_per_school=80, seed=3)


@pytest.fixture
def cli_run(capsys: pytest.CaptureFixture[str]) -> Cli:
    return cli_runner(capsys)


@pytest.fixture
def hp_district(capti_env: CaptiEnv) -> tuple[CaptiEnv, GeneratedDistrict, Path]:
    """District "hp" (240 students in 3 schools) imported once: (env, district, drop folder)."""
    district = generate_district(HP_SPEC)
    folder = deliver(capti_env, district, "hp")
    capti_env.register("hp", folder)
    first = capti_env.run("hp")
    assert first.state == "applied", first.report
    return capti_env, district, folder


def cli_runner(capsys: pytest.CaptureFixture[str]) -> Cli:
    """`capti-sync ARGS` in this process: (exit code, stdout + stderr)."""

    def invoke(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = cli.main(list(args))
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return invoke


def deliver(env: CaptiEnv, district: GeneratedDistrict, name: str) -> Path:
    """Write the district's delivery into its drop folder (replacing the previous one)."""
    folder = env.root / "drop" / name
    if folder.exists():
        for path in folder.iterdir():
            path.unlink()
    return write_delivery(district, folder)


def keep_users(folder: Path, fraction: float) -> list[str]:
    """Cut users.csv to its first rows (a broken export); returns the sourcedIds cut off."""
    path = folder / "users.csv"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = max(1, int((len(lines) - 1) * fraction))
    path.write_text("".join(lines[: 1 + keep]), encoding="utf-8")
    cut = "".join(lines[0:1] + lines[1 + keep :])
    return [row["sourcedId"] for row in csv.DictReader(io.StringIO(cut))]


def run_record(env: CaptiEnv, run_id: str) -> st.RunRecord:
    with env.engine().connect() as conn:
        run = st.get_run(conn, run_id)
    assert run is not None
    return run
