"""The ``appliance`` command: one entry point, one subcommand per task, each added by a
module of this package (:data:`COMMANDS`). Library code never imports this package.

Exit codes: 0 success, 1 an :class:`ApplianceError` (printed as one line), 2 usage.
Command-line flags override the config file, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, NoReturn, Sequence

from appliance import __version__, config, logs
from appliance.errors import ApplianceError

Handler = Callable[[argparse.Namespace], int]

#: Every subcommand, with the module of ``appliance.cli`` that adds it. A module has
#: ``add_commands(subparsers)``, whose handlers take the parsed arguments (with ``config``,
#: ``data_dir``, ``verbosity``) and return an exit code (helpers in
#: :mod:`appliance.cli.common`). To run one command only its module is imported: every SCP
#: start runs ``appliance scp``, and the serial console ``appliance console``, and neither
#: should wait for the exporter or the RT code to load (seconds on the box's slow start).
COMMANDS: dict[str, str] = {
    "scp": "appliance.cli.store",
    "ls": "appliance.cli.store",
    "locate": "appliance.cli.store",
    "reindex": "appliance.cli.store",
    "delete": "appliance.cli.retain",
    "protect": "appliance.cli.retain",
    "retention": "appliance.cli.retain",
    "audit": "appliance.cli.audit",
    "import": "appliance.cli.cd",
    "echo": "appliance.cli.net",
    "send": "appliance.cli.net",
    "export": "appliance.cli.usb",
    "queue": "appliance.cli.usb",
    "rt-export": "appliance.cli.rt",
    "config": "appliance.cli.configure",
    "status": "appliance.cli.configure",
    "run": "appliance.cli.run",
    "console": "appliance.cli.console",
    "service-password": "appliance.cli.console",
    "network": "appliance.cli.console",
    "update": "appliance.cli.update",
}


# -- parser ------------------------------------------------------------------------


def _global_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=f"config file (default {config.DEFAULT_CONFIG_PATH} if present)")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"store and index folder (default $APPLIANCE_DATA_DIR or {config.DEFAULT_DATA_DIR})")
    verb = p.add_mutually_exclusive_group()
    verb.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity", default=0)
    verb.add_argument("-d", "--debug", action="store_const", const=2, dest="verbosity")


class _Probe(argparse.ArgumentParser):
    """A parser that raises instead of printing an error and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ValueError(message)


def command_of(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names (after the global options), or None."""
    probe = _Probe(add_help=False)
    _global_options(probe)
    probe.add_argument("command", nargs="?")
    try:
        known, _ = probe.parse_known_args(argv)
    except ValueError:  # a bad global option: the full parser reports it
        return None
    return known.command if isinstance(known.command, str) else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or, given one of :data:`COMMANDS`, of the commands of
    that one's module only (so only it is imported)."""
    p = argparse.ArgumentParser(prog="appliance", description="DICOM storage appliance")
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    _global_options(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    if command in COMMANDS:
        modules = [COMMANDS[command]]
    else:  # no command, or an unknown one: all of them, for the help and the error
        modules = list(dict.fromkeys(COMMANDS.values()))
    for name in modules:
        importlib.import_module(name).add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``appliance`` command; return its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(command_of(argv)).parse_args(argv)
    logs.setup(args.verbosity)
    handler: Handler = args.func
    try:
        return handler(args)
    except ApplianceError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
