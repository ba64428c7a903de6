"""``appliance import``: every DICOM object of a CD, an ISO image or a folder into the store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.cli.common import load_config, open_store
from appliance.media.importer import (
    DEFAULT_MAX_OBJECT_MB,
    keep_report,
    run_import,
)
from appliance.reports import progress_printer
from appliance.store.ingest import Ingest
from appliance.store.retention import Retention

#: Exit codes of ``appliance import`` (2 is the CLI's usage error).
EXIT_OK, EXIT_FAILED, EXIT_PARTIAL = 0, 1, 3


def cmd_import(args: argparse.Namespace) -> int:
    """Import a CD and print the report. Exit 0 if every DICOM object was stored (or already
    was), 3 if some were and others were refused or unreadable, 1 if none was."""
    cfg = load_config(args)
    store = open_store(args, cfg)
    store.set_forwarding(cfg.forward)
    try:
        report = run_import(
            Path(args.source),
            Ingest(store, cfg.store,
                   make_room=Retention(store, cfg.retention, cfg.store.min_free_mb * 2**20).make_room),
            eject_after=cfg.media.eject_after_import if args.eject is None else args.eject,
            progress=progress_printer(sys.stderr),
            max_object_bytes=args.max_object_mb * 2**20,
        )
    finally:
        store.close(clean=False)
    print(report.render(), flush=True)
    print(f"report kept in {keep_report(report, store.data_dir / 'imports')}")
    if report.ok:
        return EXIT_OK
    return EXIT_PARTIAL if report.partial else EXIT_FAILED


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = subparsers.add_parser(
        "import", help="store every DICOM object on a CD (ISO image, optical drive or mounted folder)"
    )
    s.add_argument("source", metavar="SOURCE", help="ISO image file, optical drive (e.g. /dev/sr0) or folder")
    tray = s.add_mutually_exclusive_group()
    tray.add_argument("--eject", dest="eject", action="store_true", default=None,
                       help="open the tray afterwards (default: [media] eject_after_import, true)")
    tray.add_argument("--no-eject", dest="eject", action="store_false",
                       help="leave the disc in the drive afterwards")
    s.add_argument("--max-object-mb", type=int, default=DEFAULT_MAX_OBJECT_MB, metavar="MB",
                   help=f"refuse objects larger than this (default {DEFAULT_MAX_OBJECT_MB})")
    s.set_defaults(func=cmd_import)
