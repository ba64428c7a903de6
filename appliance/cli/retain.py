"""``appliance delete``, ``protect`` and ``retention``: freeing space by hand and by policy."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from appliance.cli.common import load_config, open_store, table
from appliance.errors import ApplianceError

if TYPE_CHECKING:
    from appliance.store.store import Store


def _studies(store: Store, args: argparse.Namespace) -> tuple[list[str], str]:
    """The studies named by ``--study`` and ``--patient``, and how to call them."""
    uids = list(args.study or [])
    names = [f"study {u}" for u in uids]
    for pid in args.patient or []:
        found = store.studies_of_patient(pid)
        if not found:
            raise ApplianceError(f"no stored study belongs to a patient with Patient ID '{pid}'")
        uids += found
        names.append(f"patient {pid} ({len(found)} stud{'y' if len(found) == 1 else 'ies'})")
    return uids, ", ".join(names)


def _confirm(prompt: str) -> bool:
    if not sys.stdin.isatty():
        raise ApplianceError("deleting needs a confirmation: add --yes (no terminal to ask on)")
    answer = input(f"{prompt}\nType yes to delete: ")
    return answer.strip().lower() == "yes"


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete studies, series or a patient's studies: index rows and files together."""
    cfg = load_config(args)
    store = open_store(args, cfg)
    quiet = cfg.retention.quiet_minutes * 60 if args.quiet_minutes is None else args.quiet_minutes * 60
    if not (args.study or args.series or args.patient):
        raise ApplianceError("say what to delete: --study UID, --series UID or --patient ID")
    if args.series and (args.study or args.patient):
        raise ApplianceError("delete series, or studies and patients, in one command; not both")
    try:
        if args.series:
            found = {uid: s for uid in args.series if (s := store.series(uid)) is not None}
            what = ", ".join(f"series {s}" for s in args.series)
            if not found:
                raise ApplianceError(f"nothing to delete: {what} is not stored")
            n = sum(s.instances for s in found.values())
            if not args.yes and not _confirm(f"Delete {what}: {n} object(s)?"):
                print("nothing deleted")
                return 1
            report = store.delete_series(list(found), quiet_seconds=quiet, reason="asked on the command line")
        else:
            uids, what = _studies(store, args)
            usage = store.study_usage(uids)
            if not usage:
                raise ApplianceError(f"nothing to delete: {what} is not stored")
            if not args.yes:
                lines = [f"  {u.study_uid}  patient {u.patient_id or '(no ID)'} {u.patient_name}  "
                         f"{u.study_date or '-'}  {u.instances} object(s), {u.bytes / 1e6:.1f} MB" for u in usage]
                if not _confirm(f"Delete {what}:\n" + "\n".join(lines)):
                    print("nothing deleted")
                    return 1
            report = store.delete_studies(uids, what=what, quiet_seconds=quiet, reason="asked on the command line")
    finally:
        store.close(clean=False)
    print(report.render())
    return 0 if not report.kept else 3


def cmd_protect(args: argparse.Namespace) -> int:
    """Protect studies from deletion and retention, or lift the protection; list protections."""
    store = open_store(args)
    try:
        uids, what = _studies(store, args)
        if not uids:
            marks = [m for m in store.marks.get().values() if m.protected]
            usage = {u.study_uid: u for u in store.study_usage([m.study_uid for m in marks])}
            print(table(["STUDY", "PATIENT", "DATE"],
                        [(m.study_uid, usage[m.study_uid].patient_id if m.study_uid in usage else "(not stored)",
                          usage[m.study_uid].study_date if m.study_uid in usage else "") for m in marks])
                  if marks else "no study is protected")
            return 0
        known = {u.study_uid for u in store.study_usage(uids)}
        unknown = [u for u in uids if u not in known]
        if unknown:
            raise ApplianceError(f"not stored: study {', '.join(unknown)}")
        store.marks.protect(uids, not args.off)
    finally:
        store.close(clean=False)
    print(f"{what}: {'no longer protected' if args.off else 'protected from deletion and retention'}")
    return 0


def cmd_retention(args: argparse.Namespace) -> int:
    """Show the retention policy, what it would delete and why others are kept; --run runs it now."""
    from appliance.store.retention import Retention, disk, last_report, marks

    cfg = load_config(args)
    store = open_store(args, cfg)
    try:
        r = cfg.retention
        min_free = cfg.store.min_free_mb * 2**20
        retention = Retention(store, r, min_free)
        if args.run:
            if not r.enabled:
                raise ApplianceError("retention is off; set retention.enabled = true in the config file "
                                     "(or on the console) first")
            report = retention.run("asked on the command line")
            for uid, patient, last, size, why in report.deleted:
                print(f"deleted  {uid}  patient {patient or '(no ID)'}  last object {last[:16]}  "
                      f"{size / 1e6:.1f} MB  ({why})")
            print(report.summary())
            if report.problem:
                print(f"PROBLEM: {report.problem}")
            return 1 if report.problem else 0
        d = disk(store.objects)
        m = marks(r, d, min_free)
        print(f"retention: {'on' if r.enabled else 'off'}; policy {r.policy.value}; high-water {r.high_water}, "
              f"low-water {r.low_water}" + (f", max age {r.max_age_days} days" if r.max_age_days else "")
              + f"; studies rest {r.quiet_minutes:g} min after their last object")
        print(f"disk:      {d.percent():.0f}% used ({d.used / 1e9:.2f} of {d.total / 1e9:.2f} GB); retention "
              f"starts at {d.percent(m.high):.0f}%, stops at {d.percent(m.low):.0f}%; storing stops below "
              f"{min_free / 1e6:.0f} MB free")
        if m.note:
            print(f"note:      {m.note}")
        previous = last_report(store.data_dir)
        if previous is not None:
            print(f"last run:  {previous.at} ({previous.trigger}): {previous.summary()}")
            if previous.problem:
                print(f"PROBLEM:   {previous.problem}")
        rows = [(u.study_uid, u.patient_id, u.last_received[:16].replace("T", " "), f"{u.bytes / 1e6:.1f}",
                 why or "may be deleted") for u, why in retention.eligibility(store.study_usage())]
        if rows:
            print(table(["STUDY (oldest first)", "PATIENT", "LAST OBJECT (UTC)", "MB", "RETENTION"], rows))
    finally:
        store.close(clean=False)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = subparsers.add_parser("delete", help="delete studies, series or a patient's studies")
    g = s.add_argument_group("what (one or more)")
    g.add_argument("--study", action="append", metavar="UID", help="a Study Instance UID")
    g.add_argument("--series", action="append", metavar="UID", help="a Series Instance UID")
    g.add_argument("--patient", action="append", metavar="ID", help="every study of this Patient ID")
    s.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    s.add_argument("--quiet-minutes", type=float, metavar="M",
                   help="keep studies that received an object in the last M minutes "
                        "(default: retention.quiet_minutes, 10)")
    s.set_defaults(func=cmd_delete)

    s = subparsers.add_parser("protect", help="protect studies from deletion and retention (no argument: list)")
    s.add_argument("--study", action="append", metavar="UID")
    s.add_argument("--patient", action="append", metavar="ID")
    s.add_argument("--off", action="store_true", help="lift the protection")
    s.set_defaults(func=cmd_protect)

    s = subparsers.add_parser("retention", help="show the retention policy and what it would delete")
    s.add_argument("--run", action="store_true", help="run retention once now")
    s.set_defaults(func=cmd_retention)
