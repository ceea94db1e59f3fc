"""`capti-sync`: the operator CLI. Every command calls the same functions as Dagster does.

Exit codes of `run`: 0 applied / nothing to do / dry run / delivery not ready yet,
2 delivery refused by validation (nothing applied), 3 held by a safety rule (nothing applied),
1 any other failure.
"""

import argparse
import getpass
import json
import os
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from capti_pipeline import config, service
from capti_pipeline.lib import operations, safety, sync
from capti_pipeline.lib import report as rp
from capti_pipeline.lib import store as st
from capti_pipeline.lib.intake import IntakeError


class UsageError(Exception):
    pass


def _actor(args: argparse.Namespace) -> str:
    return getattr(args, "by", None) or getpass.getuser()


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False, default=str))


def _print_outcome(outcome: service.SyncOutcome) -> None:
    report = outcome.report
    print(rp.summary_line(report))
    for hold in report.get("holds") or []:
        print(f"  HOLD {hold['message']}")
    errors = [i for i in report.get("issues") or [] if i["severity"] == "error"]
    for issue in errors[:20]:
        where = issue["file"] + (f" line {issue['line']}" if issue["line"] else "")
        column = f" column {issue['column']}" if issue["column"] else ""
        ident = f" [{issue['sourced_id']}]" if issue["sourced_id"] else ""
        print(f"  ERROR {where}{column}{ident}: {issue['message']}")
    if len(errors) > 20:
        print(f"  … {len(errors) - 20} more errors: capti-sync report {report['district']}")
    hints = {
        rp.HELD: f"inspect with `capti-sync report {report['district']}`, then "
        f"`capti-sync approve {report['district']}` or `capti-sync discard {report['district']}`",
        rp.REFUSED: "nothing was applied; fix the delivery and run again",
    }
    if outcome.state in hints:
        print(f"  → {hints[outcome.state]}")


# --- commands --------------------------------------------------------------------------------


def cmd_district_add(args: argparse.Namespace) -> int:
    district = service.register_district(
        args.district_id,
        args.source,
        name=args.name,
        higher_ed=args.higher_ed,
        sftp_key=args.sftp_key,
        known_hosts=args.known_hosts,
        password_env=args.password_env,
    )
    kind = "Higher-Ed " if district.higher_ed else ""
    print(f"registered {kind}district {district.id} (source {district.source_url})")
    return 0


def cmd_district_remove(args: argparse.Namespace) -> int:
    service.remove_district(args.district_id)
    print(f"district {args.district_id} removed from syncing (its roster is kept)")
    return 0


def cmd_district_list(args: argparse.Namespace) -> int:
    with service.engine().connect() as conn:
        districts = st.list_districts(conn)
    for d in districts:
        flags = [
            f
            for f, on in (
                ("paused", d.paused),
                ("adds-only", d.adds_only),
                ("higher-ed", d.higher_ed),
            )
            if on
        ]
        print(f"{d.id}\t{d.state}\t{d.source_url}\t{','.join(flags)}")
    return 0


def cmd_district_set(args: argparse.Namespace) -> int:
    values: dict[str, Any] = {}
    if args.thresholds is not None:
        try:
            update = json.loads(args.thresholds)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--thresholds is not valid JSON: {exc}") from exc
        with service.engine().connect() as conn:
            current = st.get_district(conn, args.district_id).thresholds
        try:  # merged into the district's settings; null removes a key
            values["thresholds"] = safety.merge_thresholds(current, update)
        except safety.ThresholdsError as exc:
            raise UsageError(f"--thresholds refused, nothing changed: {exc}") from exc
    if args.adds_only is not None:
        values["adds_only"] = args.adds_only == "on"
    if args.watch_uploads is not None:
        values["watch_uploads"] = args.watch_uploads == "on"
    if args.name is not None:
        values["name"] = args.name
    if not values:
        raise UsageError(
            "nothing to set (use --thresholds, --adds-only, --watch-uploads or --name)"
        )
    with service.engine().begin() as conn:
        st.get_district(conn, args.district_id)
        st.upsert_district(conn, args.district_id, **values)
    print(f"district {args.district_id} updated: {', '.join(values)}")
    if "thresholds" in values:
        print(f"thresholds now: {json.dumps(values['thresholds'], sort_keys=True)}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    outcome = service.run_district_sync(
        args.district_id, dry_run=args.dry_run, trigger=f"cli:{_actor(args)}"
    )
    _print_outcome(outcome)
    return outcome.exit_code


def cmd_snapshot(args: argparse.Namespace) -> int:
    _print_json(sync.snapshot(service.engine(), args.district_id))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    service.reconcile_dead_runs()  # a run whose process died must not show as running
    with service.engine().begin() as conn:
        operations.resume_expired_pauses(conn, now)
        if args.district_id:
            districts = [st.get_district(conn, args.district_id)]
        else:
            districts = st.list_districts(conn)
        rows = [operations.district_status(conn, d, now) for d in districts]
        if args.district_id:
            rows[0]["import_requests"] = [
                operations.request_view(conn, r)
                for r in operations.recent_requests(conn, args.district_id, limit=5)
            ]
    if args.json:
        _print_json(rows if not args.district_id else rows[0])
        return 0
    if not rows:
        print("no districts registered (capti-sync district add ID --source PATH)")
        return 0
    for row in rows:
        flags = []
        if row["paused"]:
            until = f" until {row['paused_until']}" if row["paused_until"] else ""
            flags.append(
                f"PAUSED{until}" + (f" ({row['pause_reason']})" if row["pause_reason"] else "")
            )
        if row["held"]:
            flags.append("HELD")
        if row["adds_only"]:
            flags.append("adds-only")
        nxt = row["next_scheduled_run"]
        nxt_text = (
            datetime.fromisoformat(nxt).astimezone(operations.EASTERN).strftime("%Y-%m-%d %H:%M %Z")
            if nxt
            else "none (paused)"
        )
        print(f"{row['district']}: {row['state']}" + (f" [{' '.join(flags)}]" if flags else ""))
        print(
            f"  last run: {row['last_run_id'] or '-'} ({row['last_run_state'] or '-'}), finished {row['last_finished_at'] or '-'}, result {row['last_result'] or '-'}"
        )
        if row["detail"]:
            print(f"  detail: {row['detail']}")
        counts = row["counts"] or {}
        changed = {e: {a: n for a, n in per.items() if n} for e, per in counts.items()}
        changed = {e: per for e, per in changed.items() if per}
        print(f"  counts: {json.dumps(changed) if changed else 'no changes'}")
        if row["held"]:
            print(
                f"  held plan: run {row['held_run_id']} ({row['held_reason']}); capti-sync "
                f"report {row['district']} --run {row['held_run_id']}, then approve or discard"
            )
        print(f"  next scheduled run: {nxt_text}")
        for request in row.get("import_requests") or (
            [row["last_import_request"]] if row["last_import_request"] else []
        ):
            detail = f" ({request['detail']})" if request["detail"] else ""
            print(
                f"  import-now #{request['id']} by {request['requested_by']} at {request['requested_at']}: {request['status']}{detail}"
            )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    with service.engine().connect() as conn:
        st.get_district(conn, args.district_id)
        run = st.get_run(conn, args.run) if args.run else st.latest_run(conn, args.district_id)
    if run is None or run.district_id != args.district_id:
        raise UsageError(
            f"no run {'#' + args.run if args.run else 'yet'} for district {args.district_id}"
        )
    report = run.report or rp.build_report(
        district_id=run.district_id,
        run_id=run.run_id,
        state=run.state,
        issues=[],
        reason=run.reason,
    )
    report = {**report, "state": run.state, "reason": run.reason or report.get("reason")}
    if args.format in ("json", "csv"):
        # Every affected sourcedId: a held or dry-run plan is stored whole (the report keeps a
        # sample of 200 per action).
        changes = None
        if run.state in (rp.HELD, rp.DRY_RUN):
            changes = sync.load_plan(service.engine(), run).changes
        report = rp.with_every_affected_id(report, changes)
    if args.format == "json":
        _print_json(report)
    elif args.format == "csv":
        sys.stdout.write(rp.to_csv(report))
    else:
        sys.stdout.write(rp.to_markdown(report))
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    report = sync.approve_held_plan(
        service.engine(), args.district_id, service.new_run_id(), _actor(args)
    )
    print(rp.summary_line(report))
    return 0


def cmd_discard(args: argparse.Namespace) -> int:
    held = sync.discard_held_plan(service.engine(), args.district_id, _actor(args))
    print(f"discarded the held plan of run {held.run_id}; the roster is unchanged")
    return 0


def cmd_undo(args: argparse.Namespace) -> int:
    report = sync.undo_runs(
        service.engine(), args.district_id, args.run, service.new_run_id(), _actor(args)
    )
    print(rp.summary_line(report))
    return 0


def cmd_import_now(args: argparse.Namespace) -> int:
    with service.engine().begin() as conn:
        request = operations.request_import(conn, args.district_id, _actor(args), datetime.now(UTC))
    if request.state == "refused":
        print(f"import-now #{request.id} refused: {request.detail}")
        return 1
    print(
        f"import-now #{request.id} queued for district {args.district_id}; the import_now_sensor starts it"
    )
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    until = date.fromisoformat(args.until) if args.until else None
    with service.engine().begin() as conn:
        operations.pause(conn, args.district_id, until, args.reason)
    print(f"district {args.district_id} paused" + (f" until {until} (Eastern)" if until else ""))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    with service.engine().begin() as conn:
        operations.resume(conn, args.district_id)
    print(f"district {args.district_id} resumed")
    return 0


def cmd_duplicates(args: argparse.Namespace) -> int:
    with service.engine().begin() as conn:
        st.get_district(conn, args.district_id)
        if args.allow:
            for sourced_id in args.allow:
                conn.execute(
                    st.duplicate_decisions.delete().where(
                        st.duplicate_decisions.c.district_id == args.district_id,
                        st.duplicate_decisions.c.sourced_id == sourced_id,
                    )
                )
                conn.execute(
                    st.duplicate_decisions.insert().values(
                        district_id=args.district_id, sourced_id=sourced_id, decision="separate"
                    )
                )
            print(f"will create as separate accounts on the next run: {', '.join(args.allow)}")
            return 0
        run = st.latest_run(
            conn, args.district_id, states=[rp.APPLIED, rp.NO_CHANGES, rp.HELD, rp.DRY_RUN]
        )
    found = (run.report.get("possible_duplicates") if run else None) or []
    if not found:
        print("no possible duplicates in the latest run")
    for item in found:
        print(f"{item['sourcedId']}\tmatches {item['matches']}\tsame {item['field']}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from capti_pipeline.lib.generator import DistrictSpec, generate_district, write_delivery

    district = generate_district(
        DistrictSpec(district_id=args.district_id, students=args.students, seed=args.seed)
    )
    path = write_delivery(district, Path(args.out))
    print(f"wrote a OneRoster 1.1 delivery for {args.students} students to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capti-sync", description="Operate Capti's nightly roster sync."
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the Python traceback of an unexpected error (also CAPTI_LOG_LEVEL=DEBUG)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    district = sub.add_parser("district", help="register, list, change or remove districts")
    dsub = district.add_subparsers(dest="district_command", required=True)
    add = dsub.add_parser("add", help="register a district and its partition")
    add.add_argument("district_id")
    add.add_argument(
        "--source", required=True, help="a local folder, or sftp://user@host:port/path"
    )
    add.add_argument("--name")
    add.add_argument(
        "--higher-ed", action="store_true", help="label admins Location Admin / Super Admin"
    )
    add.add_argument("--sftp-key", help="private key file for SFTP")
    add.add_argument("--known-hosts", help="known_hosts file with the server's host key")
    add.add_argument(
        "--password-env", help="NAME of an environment variable holding an SFTP password"
    )
    add.set_defaults(func=cmd_district_add)
    remove = dsub.add_parser("remove", help="stop syncing a district and delete its partition")
    remove.add_argument("district_id")
    remove.set_defaults(func=cmd_district_remove)
    dlist = dsub.add_parser("list", help="list registered districts")
    dlist.set_defaults(func=cmd_district_list)
    dset = dsub.add_parser("set", help="change a district's settings")
    dset.add_argument("district_id")
    dset.add_argument(
        "--thresholds",
        help='JSON merged into the district\'s thresholds, e.g. \'{"users": {"archive": '
        '{"percent": 5}}}\'; null removes a key (\'{"users": {"archive": null}}\')',
    )
    dset.add_argument(
        "--adds-only", choices=["on", "off"], help="apply creates only (summer rollover)"
    )
    dset.add_argument(
        "--watch-uploads",
        choices=["on", "off"],
        help="also sync when a new complete upload arrives",
    )
    dset.add_argument("--name")
    dset.set_defaults(func=cmd_district_set)

    run = sub.add_parser("run", help="run the sync for one district now (through Dagster)")
    run.add_argument("district_id")
    run.add_argument(
        "--dry-run", action="store_true", help="compute and store the plan and report only"
    )
    run.set_defaults(func=cmd_run)

    snap = sub.add_parser("snapshot", help="print the district's roster as JSON")
    snap.add_argument("district_id")
    snap.set_defaults(func=cmd_snapshot)

    status = sub.add_parser("status", help="sync status of every district (or one)")
    status.add_argument("district_id", nargs="?")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    report = sub.add_parser("report", help="a run's report (latest by default)")
    report.add_argument("district_id")
    report.add_argument("--run")
    report.add_argument("--format", choices=["md", "json", "csv"], default="md")
    report.set_defaults(func=cmd_report)

    for name, func, text in (
        ("approve", cmd_approve, "apply exactly the held plan"),
        ("discard", cmd_discard, "drop the held plan; the roster stays as it is"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("district_id")
        p.add_argument("--by", help="who decides (default: the current user)")
        p.set_defaults(func=func)

    undo = sub.add_parser(
        "undo", help="return the roster to its state before a run (later runs are reverted too)"
    )
    undo.add_argument("district_id")
    undo.add_argument("--run", required=True)
    undo.add_argument("--by")
    undo.set_defaults(func=cmd_undo)

    now = sub.add_parser(
        "import-now", help="ask for a sync now, as the admin page's Import Now button"
    )
    now.add_argument("district_id")
    now.add_argument("--by")
    now.set_defaults(func=cmd_import_now)

    pause = sub.add_parser("pause", help="pause a district's syncs")
    pause.add_argument("district_id")
    pause.add_argument("--until", help="YYYY-MM-DD (Eastern); resumes automatically")
    pause.add_argument("--reason")
    pause.set_defaults(func=cmd_pause)
    resume = sub.add_parser("resume", help="resume a paused district")
    resume.add_argument("district_id")
    resume.set_defaults(func=cmd_resume)

    dups = sub.add_parser(
        "duplicates", help="list possible duplicates, or allow them as separate accounts"
    )
    dups.add_argument("district_id")
    dups.add_argument("--allow", nargs="+", metavar="SOURCED_ID")
    dups.set_defaults(func=cmd_duplicates)

    demo = sub.add_parser("demo-data", help="write a generated OneRoster 1.1 delivery")
    demo.add_argument("--out", required=True)
    demo.add_argument("--students", type=int, default=500)
    demo.add_argument("--district-id", default="demo-district")
    demo.add_argument("--seed", type=int, default=7)
    demo.set_defaults(func=cmd_demo_data)
    return parser


def _first_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0].strip() if lines else ""


def _store_failure(exc: Exception) -> str:
    """One line naming what went wrong with the roster store (never its password)."""
    import sqlalchemy as sa

    url = os.environ.get("CAPTI_DATABASE_URL", "")
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return f"roster store URL CAPTI_DATABASE_URL is not a valid SQLAlchemy URL ({exc})"
    where = f"{parsed.host}:{parsed.port or ''}".rstrip(":") if parsed.host else parsed.database
    if not isinstance(exc, sa.exc.DBAPIError):
        return f"roster store error ({parsed.drivername} at {where}): {_first_line(exc)}"
    detail = " ".join(str(exc.orig).split()) if exc.orig is not None else _first_line(exc)
    lowered = detail.lower()
    for needle, what in (
        ("connection refused", "connection refused"),
        ("could not translate host name", "unknown host"),
        ("name or service not known", "unknown host"),
        ("timeout expired", "connection timed out"),
        ("timed out", "connection timed out"),
        ("no route to host", "no route to host"),
        ("unable to open database file", "cannot open the SQLite file"),
    ):
        if needle in lowered:
            return f"roster store unreachable: {what} at {where}"
    if "password authentication failed" in lowered or "authentication failed" in lowered:
        return f"roster store refused the login of user {parsed.username} at {where}"
    if isinstance(exc, sa.exc.OperationalError):
        return f"roster store unreachable at {where}: {detail}"
    return f"roster store error at {where}: {type(exc.orig).__name__}: {detail}"


def main(argv: list[str] | None = None) -> int:
    """Run one command; every failure ends as one line on stderr and exit 1 (``--debug`` or
    CAPTI_LOG_LEVEL=DEBUG re-raises unexpected errors with their traceback)."""
    import sqlalchemy as sa

    config.apply_defaults()
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("CAPTI_LOG_LEVEL", "").upper() == "DEBUG"
    try:
        return int(args.func(args))
    except (
        UsageError,
        st.UnknownDistrictError,
        st.StalePlanError,
        sync.NothingHeldError,
        sync.UndoError,
        service.RunInProgressError,
        IntakeError,
        ValueError,
    ) as exc:
        print(f"capti-sync: {exc}", file=sys.stderr)
        return 1
    except sa.exc.SQLAlchemyError as exc:
        if debug:
            raise
        print(f"capti-sync: {_store_failure(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("capti-sync: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        command = " ".join(c for c in (args.command, getattr(args, "district_command", None)) if c)
        print(
            f"capti-sync: {command} failed: {type(exc).__name__}: {_first_line(exc)} "
            "(capti-sync --debug ... shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
