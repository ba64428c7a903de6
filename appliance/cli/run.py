"""``appliance run``: the supervisor (SCP, config service, media watcher) in the foreground."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance.cli.common import data_dir
from appliance.ops.configservice import ConfigFile, runtime_dir
from appliance.ops.supervisor import Supervisor


def cmd_run(args: argparse.Namespace) -> int:
    """Run the appliance: SCP, config service, media watcher, until SIGTERM."""
    cfile = ConfigFile(Path(args.config) if args.config else None)
    sup = Supervisor(cfile, data_dir(args), runtime_dir(args.runtime_dir), media=args.media,
                     verbosity=args.verbosity)
    return sup.run()


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = subparsers.add_parser("run", help="run the appliance: Storage SCP, config service, CD/USB jobs")
    s.add_argument("--runtime-dir", metavar="DIR",
                   help="where the config service's socket goes (default $RUNTIME_DIRECTORY or /run/appliance)")
    s.add_argument("--no-media", dest="media", action="store_false",
                   help="do not watch for CDs and USB sticks (e.g. on a developer's machine)")
    s.set_defaults(func=cmd_run)
