"""Embedded defaults for the environment variables the product reads.

Everything is configured through environment variables (read by Dagster resources via
`dg.EnvVar`). When one is unset, the embedded default below applies: a local data folder beside
the checkout holding the SQLite roster store, landing copies and the Dagster home.
"""

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_data_dir() -> Path:
    return PROJECT_ROOT / ".capti"


def apply_defaults() -> None:
    """Fill in unset variables so every process (CLI, webserver, daemon, run workers) agrees."""
    data_dir = Path(os.environ.setdefault("CAPTI_DATA_DIR", str(default_data_dir())))
    os.environ.setdefault("CAPTI_DATABASE_URL", f"sqlite:///{data_dir / 'roster.sqlite3'}")
    os.environ.setdefault("CAPTI_WEBHOOK_URL", "")
    os.environ.setdefault("CAPTI_UI_BASE_URL", "http://127.0.0.1:3000")
    os.environ.setdefault("CAPTI_STABILITY_WINDOW_MS", "2000")
    os.environ.setdefault("CAPTI_RETRY_WAIT_MS", "30000")
    os.environ.setdefault("CAPTI_ZIP_MAX_ENTRIES", "64")
    os.environ.setdefault("CAPTI_ZIP_MAX_UNCOMPRESSED_BYTES", str(20 * 1024**3))


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or default_data_dir() / "dagster_home")


apply_defaults()
