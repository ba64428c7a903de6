"""``appliance export`` and ``queue``: a DICOM file-set on a USB stick, and its queue."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.cli.common import load_config, open_store, table
from appliance.errors import MediaError
from appliance.media.exporter import Selection, SelectionMode, export
from appliance.reports import progress_printer
from appliance.store.queue import ExportQueue


def cmd_export(args: argparse.Namespace) -> int:
    """Export to a USB target; print the report; 0 if it finished, 1 otherwise."""
    if (args.study or args.series) and args.mode is not None:
        args.parser.error("--study/--series cannot be combined with --queued or --all")
    if args.study or args.series:
        selection = Selection.explicit(tuple(args.study or ()), tuple(args.series or ()))
    else:
        selection = Selection(args.mode or SelectionMode.POLICY)
    cfg = load_config(args)
    store = open_store(args, cfg)
    try:
        report = export(Path(args.to), store, cfg, selection, progress=progress_printer(sys.stderr))
    finally:
        store.close(clean=False)
    print(report.render(), flush=True)
    return 0 if report.ok else 1


def cmd_forward_queue(args: argparse.Namespace) -> int:
    """List the forwarding queue (one line per destination, and what is set aside), or put
    what was set aside back in it."""
    from appliance.jobs.forwarder import forward_lines

    store = open_store(args)
    try:
        if args.action == "retry":
            n = store.index.forward_requeue(args.destination)
            print(f"{n} object(s) set aside are queued again" + (f" for {args.destination}" if args.destination else "")
                  + "; the destination is tried at once")
            return 0
        lines = forward_lines(store)
        if args.destination:
            lines = [line for line in lines if line.startswith(f"{args.destination}:")]
        print("\n".join(lines) if lines else "nothing has been queued for forwarding")
        for s in store.index.forward_states():
            if args.destination in (None, s.destination) and s.set_aside:
                for uid, reason in store.index.forward_set_aside_items(s.destination):
                    print(f"  set aside for {s.destination}: {uid}: {reason}")
        return 0
    finally:
        store.close(clean=False)


def cmd_queue(args: argparse.Namespace) -> int:
    """Add to, remove from or list the export queue."""
    if args.forward:
        return cmd_forward_queue(args)
    if args.action == "retry":
        raise MediaError("retry is for the forwarding queue: appliance queue retry --forward [DESTINATION]")
    store = open_store(args)
    state = ExportQueue(store.data_dir)
    try:
        if args.action == "ls":
            rows = [(q.uid, q.level, q.added_at) for q in state.entries()]
            print(table(["UID", "LEVEL", "QUEUED AT"], rows) if rows else "the export queue is empty")
            return 0
        for uid in args.uids:
            if args.action == "add":
                level = store.level_of(uid)
                if level is None:
                    raise MediaError(f"no stored study or series has UID {uid}; 'appliance ls' lists them")
                print(f"queued {level} {uid}" if state.add(uid, level) else f"{uid} was already queued")
            elif not state.remove(uid):
                raise MediaError(f"{uid} is not in the export queue; 'appliance queue ls' lists it")
            else:
                print(f"removed {uid} from the export queue")
        return 0
    finally:
        state.close()
        store.close(clean=False)


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = subparsers.add_parser("export", help="write studies as a DICOM file-set (with DICOMDIR) to a USB stick")
    s.add_argument("--to", required=True, metavar="TARGET",
                   help="a mounted folder, a USB partition's block device (e.g. /dev/sda1) or a FAT image file")
    s.add_argument("--study", action="append", metavar="UID", help="export this study (repeatable)")
    s.add_argument("--series", action="append", metavar="UID", help="export this series (repeatable)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--queued", action="store_const", const=SelectionMode.QUEUE, dest="mode",
                   help="export the export queue (even if it is empty)")
    g.add_argument("--all", action="store_const", const=SelectionMode.ALL, dest="mode",
                   help="export every stored study")
    s.set_defaults(func=cmd_export, mode=None, parser=s)

    q = subparsers.add_parser("queue", help="the USB export queue (add, rm, ls); --forward: the forwarding queue")
    qs = q.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("add", "queue studies or series (by UID) for the next export"),
                         ("rm", "remove studies or series from the queue")):
        a = qs.add_parser(action, help=text)
        a.add_argument("uids", nargs="+", metavar="UID")
        a.set_defaults(forward=False)
    a = qs.add_parser("ls", help="list the queue (--forward: per destination, with what is set aside)")
    a.add_argument("--forward", action="store_true", help="the forwarding queue")
    a.add_argument("destination", nargs="?", metavar="DESTINATION", help="with --forward: only this destination")
    a = qs.add_parser("retry", help="--forward: queue again what a destination refused for good (set aside)")
    a.add_argument("--forward", action="store_true", required=True, help="the forwarding queue")
    a.add_argument("destination", nargs="?", metavar="DESTINATION", help="only this destination")
    q.set_defaults(func=cmd_queue)
