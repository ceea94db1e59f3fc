"""District-scale benchmark of the nightly roster sync.

    python -m capti_pipeline.bench --students 10000 100000 [--database sqlite|postgres|both]
                                   [--out docs/benchmarks.md | results.json]

For each database and size it generates a district with the project's generator (about six
enrollments per student), writes it as a OneRoster 1.1 delivery folder, registers it, and measures:

* ``floor``: parsing the same CSVs with ``pandas.read_csv(dtype=str, keep_default_na=False)``;
* ``first``: the first import into an empty store;
* ``nochange``: a nightly re-run of the very same delivery;
* ``change``: a nightly run after ``generator.change_fraction(d, 0.01, seed)`` (1 % of the users
  archived, moved or renamed).

Every sync goes through ``service.run_district_sync`` -- the Dagster ``roster_sync_job`` executed
in process against the instance in ``DAGSTER_HOME``, exactly what ``capti-sync run`` does.

Each measurement runs in its own fresh Python process (spawned by this one), so its peak RSS is the
kernel's high-water mark of that process (``os.wait4`` → ``ru_maxrss``), not polluted by the
generator or by earlier phases. Wall time is taken inside the child around the measured call
(interpreter start-up and imports excluded; they are reported separately for the tiny district).
Between syncs a separate child fingerprints every roster table and counts the rows that actually
changed (inserted, deleted, or any stored value other than bookkeeping columns different), which
is compared with the ``rows_written`` the apply reports.

The per-run fixed overhead is measured on a tiny district (first import, then a no-change run),
both as the ``run_district_sync`` call and as a whole cold process.

The stability window (``CAPTI_STABILITY_WINDOW_MS``, 2 s by default: a deliberate wait for uploads
to settle) is set to 0 here; it is not processing cost.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Memory and checkpoint spacing of a server sized for district-scale loads (deploy/README.md);
# PostgreSQL's defaults (128 MB of shared buffers, a checkpoint per GB of WAL) are for laptops.
BENCH_POSTGRES_SETTINGS = {
    "shared_buffers": "2GB",
    "max_wal_size": "8GB",
    "checkpoint_timeout": "30min",
    "wal_buffers": "64MB",
    "maintenance_work_mem": "512MB",
}
DISTRICT_ID = "bench-district"
SEED = 7
CHANGE_FRACTION = 0.01
TINY_STUDENTS = 50
PHASES = ("first", "nochange", "change")
# The floor is measured before the syncs and after them.
FLOOR_RUNS_BEFORE, FLOOR_RUNS_AFTER = 3, 2
_GIB = 1024**3


# ------------------------------------------------------------------------------------------------
# Child processes (one per measurement)
# ------------------------------------------------------------------------------------------------


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    kind = spec["kind"]
    if kind == "floor":
        return _child_floor(spec)
    if kind == "register":
        from capti_pipeline import service

        service.register_district(DISTRICT_ID, spec["source"], name="Benchmark district")
        return {}
    if kind == "sync":
        return _child_sync(spec)
    if kind == "snapshot":
        return _child_snapshot(spec)
    raise ValueError(f"unknown child kind {kind!r}")


def _child_floor(spec: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    started, cpu = time.perf_counter(), time.process_time()
    rows = 0
    for path in sorted(Path(spec["source"]).glob("*.csv")):
        rows += len(pd.read_csv(path, dtype=str, keep_default_na=False))
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
        "rows": rows,
    }


def _child_sync(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    import dagster as dg

    # definitions: what run_district_sync imports lazily, so its import is not timed.
    from capti_pipeline import definitions, service

    del definitions

    imports = time.perf_counter() - started
    instance = service.dagster_instance()
    started, cpu = time.perf_counter(), time.process_time()
    outcome = service.run_district_sync(DISTRICT_ID, trigger="bench", instance=instance)
    seconds = time.perf_counter() - started
    cpu_seconds = time.process_time() - cpu
    steps: dict[str, float] = {}
    begun: dict[str, float] = {}
    events = instance.all_logs(
        outcome.run_id,
        of_type={
            dg.DagsterEventType.STEP_START,
            dg.DagsterEventType.STEP_SUCCESS,
            dg.DagsterEventType.STEP_FAILURE,
        },
    )
    for entry in events:
        event = entry.dagster_event
        if event is None or entry.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            begun[entry.step_key] = entry.timestamp
        elif entry.step_key in begun:
            steps[entry.step_key] = entry.timestamp - begun[entry.step_key]
    report = outcome.report
    return {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "imports_seconds": imports,
        "state": outcome.state,
        "reason": report.get("reason"),
        "rows_written": int(report.get("rows_written") or 0),
        "counts": report.get("counts") or {},
        "holds": report.get("holds") or [],
        "steps": steps,
    }


# Columns that are bookkeeping, not roster content: a write that only changes them is no change.
_SNAPSHOT_SKIP = {"id", "district_id", "created_run", "updated_run"}


def _child_snapshot(spec: dict[str, Any]) -> dict[str, Any]:
    """Fingerprint every roster row and count the rows that differ from the previous snapshot.

    Runs with PYTHONHASHSEED=0, so Python's tuple hash of a row's stored values is the same in
    every snapshot child.
    """
    import numpy as np
    import pandas as pd

    from capti_pipeline.lib import store as st
    from capti_pipeline.resources import store_engine

    engine = store_engine(os.environ["CAPTI_DATABASE_URL"])
    folder = Path(spec["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    tables = {**st.ROSTER_TABLES, "memberships": st.memberships}
    changed: dict[str, int] = {}
    for name, table in tables.items():
        keys = (
            ["user_sourced_id", "location_sourced_id"] if name == "memberships" else ["sourced_id"]
        )
        values = [c.name for c in table.c if c.name not in _SNAPSHOT_SKIP and c.name not in keys]
        key_sql = " || char(31) || ".join(keys) if len(keys) > 1 else keys[0]
        if engine.dialect.name == "postgresql":
            key_sql = " || chr(31) || ".join(keys) if len(keys) > 1 else keys[0]
        mark = "?" if engine.dialect.paramstyle == "qmark" else "%s"
        sql = f"SELECT {key_sql}, {', '.join(values)} FROM {table.name} WHERE district_id = {mark}"
        key_parts: list[np.ndarray] = []
        hash_parts: list[np.ndarray] = []
        with engine.connect() as conn:
            cursor = conn.connection.driver_connection.cursor()
            cursor.execute(sql, (DISTRICT_ID,))
            while rows := cursor.fetchmany(500_000):
                key_parts.append(np.array([row[0] for row in rows], dtype=object))
                hash_parts.append(np.fromiter((hash(row[1:]) for row in rows), np.int64, len(rows)))
            cursor.close()
        after = pd.DataFrame(
            {
                "key": pd.array(np.concatenate(key_parts) if key_parts else [], dtype="str"),
                "h": np.concatenate(hash_parts) if hash_parts else np.array([], np.int64),
            }
        )
        path = folder / f"{name}.parquet"
        if path.exists():
            before = pd.read_parquet(path)
            merged = before.merge(after, on="key", how="outer", suffixes=("_b", "_a"))
            differs = merged["h_b"].isna() | merged["h_a"].isna() | merged["h_b"].ne(merged["h_a"])
            changed[name] = int(differs.sum())
        else:
            changed[name] = len(after)  # against an empty store
        after.to_parquet(path, index=False)
    return {"changed": changed}


# ------------------------------------------------------------------------------------------------
# Parent: spawn children, collect results
# ------------------------------------------------------------------------------------------------


def _spawn(spec: dict[str, Any], env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; adds its peak RSS and whole-process wall time."""
    result_path = workdir / f".child-{os.getpid()}-{time.monotonic_ns()}.json"
    spec = {**spec, "result_path": str(result_path)}
    # Earlier work's dirty pages (a delivery just generated, the previous sync's files) are
    # written back first, so this measurement does not compete with their write-back.
    os.sync()
    started = time.perf_counter()
    if spec["kind"] == "snapshot":
        env = {**env, "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "capti_pipeline.bench", "--child", json.dumps(spec)], env=env
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(
            f"benchmark child {spec['kind']} failed with exit code {proc.returncode}"
        )
    result = json.loads(result_path.read_text())
    result_path.unlink()
    # ru_maxrss is in KiB on Linux.
    result["peak_rss_bytes"] = int(usage.ru_maxrss) * 1024
    result["process_seconds"] = elapsed
    return result


def _environment(root: Path, database_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "CAPTI_DATA_DIR": str(root / "data"),
            "CAPTI_DATABASE_URL": database_url,
            "DAGSTER_HOME": str(root / "dagster_home"),
            "CAPTI_STABILITY_WINDOW_MS": "0",
            "CAPTI_RETRY_WAIT_MS": "0",
            "CAPTI_WEBHOOK_URL": "",
            "CAPTI_LOG_LEVEL": "ERROR",
        }
    )
    return env


class _Postgres:
    """The test suite's throwaway cluster (initdb + pg_ctl, durability off), started on demand."""

    def __init__(self) -> None:
        self.server: Any = None

    def url(self, name: str) -> str:
        if self.server is None:
            try:
                from capti_pipeline_tests.support import postgres as pg
            except ImportError as exc:  # the test extras are not installed
                raise SystemExit(f"--database postgres needs the dev extras ({exc})") from exc
            bindir = pg.find_postgres_bindir()
            if bindir is None:
                raise SystemExit("--database postgres: PostgreSQL server binaries not found")
            self.server = pg.start_postgres(bindir, BENCH_POSTGRES_SETTINGS)
        return self.server.create_database(name)

    def stop(self) -> None:
        if self.server is not None:
            from capti_pipeline_tests.support import postgres as pg

            pg.stop_postgres(self.server)
            self.server = None


def _database_url(database: str, root: Path, postgres: _Postgres, label: str) -> str:
    if database == "sqlite":
        return f"sqlite:///{root / 'roster.sqlite3'}"
    return postgres.url(f"bench_{label}_{int(time.time())}")


def bench_size(
    students: int,
    database: str,
    workdir: Path,
    postgres: _Postgres,
    *,
    phases: tuple[str, ...] = PHASES,
    seed: int = SEED,
    log: Any = print,
) -> dict[str, Any]:
    """Generate one district, then measure the floor and the asked phases against one store."""
    from capti_pipeline.lib import generator as gen

    root = workdir / f"{database}-{students}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    source = root / "source"
    started = time.perf_counter()
    district = gen.generate_district(
        gen.DistrictSpec(district_id=DISTRICT_ID, students=students, seed=seed)
    )
    gen.write_delivery(district, source)
    generated = time.perf_counter() - started
    rows = {name: len(frame) for name, frame in district.frames.items()}
    size_bytes = sum(p.stat().st_size for p in source.glob("*.csv"))
    log(
        f"[{database} {students}] generated {rows.get('users', 0)} users, "
        f"{rows.get('enrollments', 0)} enrollments ({size_bytes / 1e6:.0f} MB) in {generated:.1f}s"
    )
    env = _environment(root, _database_url(database, root, postgres, str(students)))
    out: dict[str, Any] = {
        "students": students,
        "database": database,
        "rows": rows,
        "delivery_bytes": size_bytes,
        "generate_seconds": generated,
        "floor": [],
        "phases": {},
    }

    def floor() -> None:
        result = _spawn({"kind": "floor", "source": str(source)}, env, root)
        out["floor"].append(result)
        log(
            f"[{database} {students}] floor {result['seconds']:.2f}s (CPU {result['cpu_seconds']:.2f}s)"
        )

    def snapshot() -> dict[str, int]:
        return _spawn({"kind": "snapshot", "folder": str(root / "snapshot")}, env, root)["changed"]

    def sync(phase: str) -> None:
        result = _spawn({"kind": "sync"}, env, root)
        changed = snapshot()
        result["rows_changed"] = sum(changed.values())
        result["rows_changed_by_table"] = changed
        out["phases"][phase] = result
        log(
            f"[{database} {students}] {phase}: {result['seconds']:.2f}s (CPU "
            f"{result['cpu_seconds']:.2f}s), state {result['state']}, "
            f"peak RSS {result['peak_rss_bytes'] / _GIB:.2f} GiB, rows written "
            f"{result['rows_written']}, rows changed {result['rows_changed']}"
        )
        if result["holds"]:
            log(f"[{database} {students}] {phase} HELD: {result['reason']}")

    for _ in range(FLOOR_RUNS_BEFORE):
        floor()
    _spawn({"kind": "register", "source": str(source)}, env, root)
    snapshot()
    wanted = [p for p in PHASES if p in phases]
    if wanted:
        sync("first")
    if "nochange" in wanted:
        sync("nochange")
    if "change" in wanted:
        changed = gen.change_fraction(district, CHANGE_FRACTION, seed)
        del district
        gen.write_delivery(changed, source)
        del changed
        sync("change")
    for _ in range(FLOOR_RUNS_AFTER):
        floor()
    # The median of the floor runs: one parse of a gigabyte varies by a third from run to run
    # on this kind of machine (page cache, memory reclaim), so neither extreme is "the" floor.
    out["floor_seconds"] = statistics.median(f["seconds"] for f in out["floor"])
    out["floor_cpu_seconds"] = statistics.median(f["cpu_seconds"] for f in out["floor"])
    out["floor_range_seconds"] = [
        min(f["seconds"] for f in out["floor"]),
        max(f["seconds"] for f in out["floor"]),
    ]
    for result in out["phases"].values():
        result["ratio"] = result["seconds"] / out["floor_seconds"]
        # CPU seconds of the process (all its threads): steadier than wall time when other jobs
        # share the machine.
        result["cpu_ratio"] = result["cpu_seconds"] / out["floor_cpu_seconds"]
    return out


def bench_overhead(workdir: Path, database: str, postgres: _Postgres) -> dict[str, Any]:
    """Fixed per-run cost: a tiny district, first import then no-change re-run."""
    result = bench_size(TINY_STUDENTS, database, workdir, postgres, log=lambda _m: None)
    first, nochange = result["phases"]["first"], result["phases"]["nochange"]
    return {
        "students": TINY_STUDENTS,
        "database": database,
        "first_seconds": first["seconds"],
        "nochange_seconds": nochange["seconds"],
        "change_seconds": result["phases"]["change"]["seconds"],
        "imports_seconds": nochange["imports_seconds"],
        "cold_process_seconds": nochange["process_seconds"],
        "peak_rss_bytes": nochange["peak_rss_bytes"],
    }


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import pandas as pd
    import pyarrow as pa
    import sqlalchemy as sa

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / _GIB, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "pandas": pd.__version__,
        "pyarrow": pa.__version__,
        "sqlalchemy": sa.__version__,
        "sqlite": __import__("sqlite3").sqlite_version,
    }


def _fmt_ratio(written: int, changed: int) -> str:
    if changed == 0:
        return "n/a (0 / 0)" if written == 0 else f"n/a ({written} / 0)"
    return f"{written / changed:.2f}"


def results_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| database | students | enrollments | phase | wall s | x floor | CPU s | CPU x floor "
        "| peak RSS GiB | state | rows written | rows changed | written / changed |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for result in results:
        enrollments = result["rows"].get("enrollments", 0)
        label = f"| {result['database']} | {result['students']:,} | {enrollments:,} "
        floor_rss = min(f["peak_rss_bytes"] for f in result["floor"]) / _GIB
        low, high = result.get("floor_range_seconds") or (result["floor_seconds"],) * 2
        runs = len(result["floor"])
        lines.append(
            f"{label}| floor (read_csv; median of {runs}, {low:.2f} to {high:.2f}) | "
            f"{result['floor_seconds']:.2f} | 1.00 | "
            f"{result['floor_cpu_seconds']:.2f} | 1.00 | {floor_rss:.2f} | | | | |"
        )
        for phase in PHASES:
            p = result["phases"].get(phase)
            if p is None:
                continue
            lines.append(
                f"{label}| {_PHASE_LABELS[phase]} | {p['seconds']:.2f} | {p['ratio']:.2f} | "
                f"{p['cpu_seconds']:.2f} | {p['cpu_ratio']:.2f} | {p['peak_rss_bytes'] / _GIB:.2f} | {p['state']} | {p['rows_written']:,} | "
                f"{p['rows_changed']:,} | {_fmt_ratio(p['rows_written'], p['rows_changed'])} |"
            )
    return "\n".join(lines)


_PHASE_LABELS = {"first": "first import", "nochange": "no-change nightly", "change": "1 % change"}


def steps_table(results: list[dict[str, Any]]) -> str:
    from capti_pipeline.defs.assets import roster_sync_assets  # heavy: only when rendering

    steps = tuple(asset.key.to_user_string() for asset in roster_sync_assets)
    lines = [
        "| database | students | phase | " + " | ".join(steps) + " |",
        "|---|---:|---|" + "---:|" * len(steps),
    ]
    for result in results:
        for phase in PHASES:
            p = result["phases"].get(phase)
            if p is None:
                continue
            cells = " | ".join(f"{p['steps'][s]:.2f}" if s in p["steps"] else "-" for s in steps)
            lines.append(
                f"| {result['database']} | {result['students']:,} | {_PHASE_LABELS[phase]} | {cells} |"
            )
    return "\n".join(lines)


def merge_payloads(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of the benchmark as one payload (results and overheads in order)."""
    return {
        **payloads[-1],
        "runs": [
            run
            for payload in payloads
            for run in payload.get("runs")
            or [{"measured_at": payload["measured_at"], "command": payload["command"]}]
        ],
        "results": [r for payload in payloads for r in payload["results"]],
        "overhead": [o for payload in payloads for o in payload.get("overhead", [])],
    }


def to_markdown(payload: dict[str, Any]) -> str:
    machine = payload["machine"]
    runs = payload.get("runs") or [
        {"measured_at": payload["measured_at"], "command": payload["command"]}
    ]
    parts = [
        "## Measured results",
        "",
        *(
            f"- {run['measured_at']}: `python -m capti_pipeline.bench {run['command']}`"
            for run in runs
        ),
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM, "
        f"{machine['os']}; Python {machine['python']}, pandas {machine['pandas']}, pyarrow "
        f"{machine['pyarrow']}, SQLAlchemy {machine['sqlalchemy']}, SQLite {machine['sqlite']}.",
        "",
        results_table(payload["results"]),
        "",
        "Seconds per Dagster step (from the run's event log):",
        "",
        steps_table(payload["results"]),
    ]
    for overhead in payload.get("overhead", []):
        parts += [
            "",
            f"Fixed overhead ({overhead['database']}, {overhead['students']} students): first "
            f"import {overhead['first_seconds']:.2f} s, no-change run "
            f"{overhead['nochange_seconds']:.2f} s, 1 % change {overhead['change_seconds']:.2f} s "
            f"(the `run_district_sync` call); a whole cold process (interpreter, imports, run) "
            f"{overhead['cold_process_seconds']:.2f} s, of which imports "
            f"{overhead['imports_seconds']:.2f} s; peak RSS "
            f"{overhead['peak_rss_bytes'] / 2**20:.0f} MiB.",
        ]
    return "\n".join(parts) + "\n"


_MARK_BEGIN = "<!-- bench:results:begin -->"
_MARK_END = "<!-- bench:results:end -->"


def write_output(path: Path, payload: dict[str, Any]) -> None:
    """JSON for *.json; otherwise the results section of a Markdown file (kept text around it)."""
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return
    section = f"{_MARK_BEGIN}\n{to_markdown(payload)}{_MARK_END}"
    text = path.read_text() if path.exists() else ""
    if _MARK_BEGIN in text and _MARK_END in text:
        head, rest = text.split(_MARK_BEGIN, 1)
        tail = rest.split(_MARK_END, 1)[1]
        text = head + section + tail
    else:
        text = (text.rstrip() + "\n\n" if text else "# Benchmarks\n\n") + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def run(
    students: list[int],
    databases: list[str],
    workdir: Path,
    *,
    phases: tuple[str, ...] = PHASES,
    overhead: bool = True,
    command: str = "",
    log: Any = print,
) -> dict[str, Any]:
    postgres = _Postgres()
    results: list[dict[str, Any]] = []
    overheads: list[dict[str, Any]] = []
    try:
        for database in databases:
            if overhead:
                overheads.append(bench_overhead(workdir, database, postgres))
                o = overheads[-1]
                log(
                    f"[{database}] fixed overhead: first {o['first_seconds']:.2f}s, no-change "
                    f"{o['nochange_seconds']:.2f}s, cold process {o['cold_process_seconds']:.2f}s"
                )
            for size in students:
                results.append(
                    bench_size(size, database, workdir, postgres, phases=phases, log=log)
                )
    finally:
        postgres.stop()
    return {
        "measured_at": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": command,
        "machine": machine_description(),
        "results": results,
        "overhead": overheads,
        "self_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m capti_pipeline.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--students", type=int, nargs="+", default=[10_000])
    parser.add_argument("--database", choices=("sqlite", "postgres", "both"), default="sqlite")
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=PHASES,
        default=list(PHASES),
        help="which syncs to measure (the floor is always measured)",
    )
    parser.add_argument("--out", type=Path, help="docs/benchmarks.md (results section) or *.json")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--no-overhead", action="store_true", help="skip the tiny-district run")
    parser.add_argument(
        "--render",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="measure nothing: write --out from earlier JSON outputs (merged in order)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        if not args.out:
            parser.error("--render needs --out")
        write_output(args.out, merge_payloads([json.loads(p.read_text()) for p in args.render]))
        print(f"results written to {args.out}")
        return 0
    if args.child:
        spec = json.loads(args.child)
        result = _child(spec)
        Path(spec["result_path"]).write_text(json.dumps(result))
        return 0
    databases = ["sqlite", "postgres"] if args.database == "both" else [args.database]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="capti-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    try:
        payload = run(
            args.students,
            databases,
            workdir,
            phases=tuple(args.phases),
            overhead=not args.no_overhead,
            command=command,
        )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(results_table(payload["results"]))
    if args.out:
        write_output(args.out, payload)
        print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
