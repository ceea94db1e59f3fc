"""The SQLite roster store holds names and emails: its file, -wal and -shm are owner-only."""

import stat
from pathlib import Path

import sqlalchemy as sa

from capti_pipeline.lib.store import create_store_engine, migrate


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_store_is_owner_only(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    database = folder / "roster.sqlite3"
    engine = create_store_engine(f"sqlite:///{database}")
    try:
        migrate(engine)
        with engine.connect() as conn:  # WAL mode: -wal and -shm exist while connected
            conn.execute(sa.text("select 1"))
            files = sorted(p.name for p in folder.iterdir())
            assert files == ["roster.sqlite3", "roster.sqlite3-shm", "roster.sqlite3-wal"]
            assert {name: _mode(folder / name) for name in files} == dict.fromkeys(files, 0o600)
        assert _mode(folder) == 0o700
    finally:
        engine.dispose()


def test_an_existing_readable_store_is_made_owner_only(tmp_path: Path) -> None:
    database = tmp_path / "roster.sqlite3"
    engine = create_store_engine(f"sqlite:///{database}")
    migrate(engine)
    engine.dispose()
    for part in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        if part.exists():
            part.chmod(0o644)
    engine = create_store_engine(f"sqlite:///{database}")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        for part in tmp_path.iterdir():
            assert _mode(part) == 0o600, part.name
    finally:
        engine.dispose()
