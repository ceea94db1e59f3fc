"""Helpers for driving the schedule, sensors and CLI against a real (throwaway) Dagster instance."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from capti_pipeline import cli
from capti_pipeline.resources import Notifier, RosterStore
from capti_pipeline_tests.support.harness import CaptiEnv

SAMPLES = Path(__file__).resolve().parents[3] / "shared" / "oneroster-samples"
EDFI = SAMPLES / "Ed-Fi-Exchange-OSS__LMS-Toolkit" / "oneroster-1.1"


def sensor_resources(env: CaptiEnv) -> dict[str, object]:
    return {
        "roster_store": RosterStore(database_url=env.database_url),
        "notifier": Notifier(webhook_url="", ui_base_url=""),
    }


def apply_partition_requests(instance: dg.DagsterInstance, result: object) -> None:
    """What the sensor daemon does with a SensorResult's dynamic partition requests."""
    if not isinstance(result, dg.SensorResult):
        return
    for request in result.dynamic_partitions_requests or []:
        if isinstance(request, dg.AddDynamicPartitionsRequest):
            instance.add_dynamic_partitions(request.partitions_def_name, request.partition_keys)
        else:
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)


def run_requests(result: object) -> list[dg.RunRequest]:
    if isinstance(result, dg.SensorResult):
        return list(result.run_requests or [])
    if isinstance(result, dg.SkipReason):
        return []
    raise AssertionError(f"unexpected sensor result {result!r}")


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """`capti-sync ARGS` in this process (same env as capti_env): (exit code, stdout+stderr)."""

    def invoke(*args: str) -> tuple[int, str]:
        capsys.readouterr()
        code = cli.main(list(args))
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return invoke


@pytest.fixture
def status_json(run_cli: Callable[..., tuple[int, str]]) -> Callable[..., Any]:
    def status(*district: str) -> Any:
        code, out = run_cli("status", *district, "--json")
        assert code == 0, out
        return json.loads(out)

    return status
