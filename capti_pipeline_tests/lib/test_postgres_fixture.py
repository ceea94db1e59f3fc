"""The throwaway PostgreSQL fixture works, and Dagster instances run on it (incl. deploy/dagster.yaml)."""

import importlib
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from capti_pipeline_tests.support import postgres as pg_support
from capti_pipeline_tests.support.postgres import PostgresServer

DEPLOY_DAGSTER_YAML = Path(__file__).resolve().parents[2] / "deploy" / "dagster.yaml"


# ##### HELPERS


@contextmanager
def _engine(url: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


@contextmanager
def _instance_from_yaml(home: Path, config: dict[str, Any]) -> Iterator[dg.DagsterInstance]:
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        yield instance
    finally:
        instance.dispose()


# ##### TESTS


@pytest.mark.postgres
def test_cluster_accepts_sqlalchemy_connections(
    postgres_server: PostgresServer,
    postgres_url: str,
    record_property: Callable[[str, object], None],
) -> None:
    record_property("postgres_startup_seconds", round(postgres_server.startup_seconds, 3))
    assert postgres_url.startswith(
        f"postgresql+psycopg://capti@127.0.0.1:{postgres_server.port}/test_"
    )
    with _engine(postgres_url) as engine, engine.connect() as conn:
        assert conn.execute(sa.text("select current_user")).scalar_one() == "capti"
        assert conn.execute(sa.text("show server_encoding")).scalar_one() == "UTF8"
        assert conn.execute(sa.text("show fsync")).scalar_one() == "off"


@pytest.mark.postgres
def test_transactions_commit_and_roll_back(postgres_url: str) -> None:
    with _engine(postgres_url) as engine:
        with engine.begin() as conn:
            conn.execute(sa.text("create table district (id text primary key, name text not null)"))
            conn.execute(sa.text("insert into district values ('d1', 'Committed')"))

        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.text("insert into district values ('d2', 'Rolled back')"))
            conn.execute(sa.text("insert into district values ('d1', 'duplicate key')"))

        with engine.connect() as conn:
            conn.execute(sa.text("insert into district values ('d3', 'never committed')"))
            conn.rollback()
            ids = conn.execute(sa.text("select id from district order by id")).scalars().all()
        assert ids == ["d1"]


@pytest.mark.postgres
def test_each_test_database_is_fresh_and_separate(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    other_url = postgres_server.create_database(f"other_{uuid.uuid4().hex[:12]}")
    assert other_url != postgres_url
    with _engine(postgres_url) as engine, engine.begin() as conn:
        conn.execute(sa.text("create table only_here (x int)"))
    with _engine(other_url) as engine, engine.connect() as conn:
        assert not sa.inspect(conn).has_table("only_here")
    with pytest.raises(ValueError, match="database name"):
        postgres_server.create_database('bad"; drop database postgres; --')


@pytest.mark.postgres
def test_dagster_instance_on_postgres_persists_dynamic_partitions(
    postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dbname = f"dagster_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(dbname)
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    config = {
        "storage": postgres_server.dagster_storage_config(dbname),
        "telemetry": {"enabled": False},
    }

    with _instance_from_yaml(home, config) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        instance.add_dynamic_partitions("districts", ["district-b", "district-a"])
        assert instance.has_dynamic_partition("districts", "district-a")

    # A second, independent instance reads the keys back from PostgreSQL.
    with _instance_from_yaml(home, config) as instance:
        assert sorted(instance.get_dynamic_partitions("districts")) == ["district-a", "district-b"]


@pytest.mark.postgres
def test_deploy_dagster_yaml_loads_on_postgres(
    postgres_server: PostgresServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy/dagster.yaml is valid Dagster 1.13 instance config with the intended queue limits."""
    config = yaml.safe_load(DEPLOY_DAGSTER_YAML.read_text())
    assert config["run_launcher"]["class"] == "DockerRunLauncher"
    try:
        importlib.import_module(config["run_launcher"]["module"])
        has_launcher_module = True
    except ImportError:
        has_launcher_module = False
    if not has_launcher_module:
        # dagster-docker is only installed in the deployed images; validate everything else.
        del config["run_launcher"]

    dbname = f"deploy_{uuid.uuid4().hex[:12]}"
    postgres_server.create_database(dbname)
    monkeypatch.setenv("DAGSTER_PG_USERNAME", postgres_server.user)
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", "ignored-under-trust-auth")
    monkeypatch.setenv("DAGSTER_PG_HOST", postgres_server.host)
    monkeypatch.setenv("DAGSTER_PG_DB", dbname)
    monkeypatch.setenv("DAGSTER_PG_PORT", str(postgres_server.port))
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))

    with _instance_from_yaml(home, config) as instance:
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        if has_launcher_module:
            assert type(instance.run_launcher).__name__ == "DockerRunLauncher"

        concurrency = instance.get_concurrency_config()
        run_queue = concurrency.run_queue_config
        assert run_queue is not None
        assert run_queue.max_concurrent_runs >= 1
        assert run_queue.tag_concurrency_limits == [
            {"key": "dagster/partition", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
        ]
        assert concurrency.pool_config.default_pool_limit == 2

        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_max_resume_run_attempts == 0
        assert instance.run_retries_enabled
        assert instance.run_retries_max_retries == 1
        assert not instance.run_retries_retry_on_asset_or_op_failure
        assert not instance.telemetry_enabled

        instance.add_dynamic_partitions("districts", ["d1"])
        assert instance.get_dynamic_partitions("districts") == ["d1"]


# ##### MISSING BINARIES: skip locally, fail in CI (no cluster needed)


def test_missing_binaries_skip_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not found"):
        pg_support.skip_or_fail("PostgreSQL server binaries not found")


def test_missing_binaries_fail_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        pg_support.skip_or_fail("PostgreSQL server binaries not found")
