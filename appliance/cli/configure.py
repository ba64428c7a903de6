"""``appliance config`` and ``status``: settings and health, through the running appliance or the file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import tomli_w

from appliance import audit, config
from appliance.cli.common import data_dir, open_store
from appliance.errors import ConfigError
from appliance.ops.configservice import (
    DEFAULT_RUNTIME_DIR,
    ConfigFile,
    _via_service,
    get_key,
)


def _file(args: argparse.Namespace) -> ConfigFile:
    return ConfigFile(Path(args.config) if args.config else None)


def _print_value(value: Any) -> None:
    if isinstance(value, dict):
        print(tomli_w.dumps(value), end="")
    elif isinstance(value, bool):
        print("true" if value else "false")
    elif isinstance(value, list):
        print(", ".join(str(v) for v in value))
    else:
        print(value)


def cmd_config(args: argparse.Namespace) -> int:
    """Show, get, set or validate settings, through the running service or in the file."""
    f = _file(args)
    if args.action == "show":
        _print_value(_via_service(args, "show", lambda: config.to_dict(f.load())))
    elif args.action == "get":
        _print_value(_via_service(args, "get", lambda: get_key(f.load(), args.key), key=args.key))
    elif args.action == "set":

        def offline() -> str:
            raw, _cfg = f.plan(args.key, args.value)
            f.write(raw)
            value = get_key(_cfg, args.key)
            # The running service records its own changes; this one is made to the file.
            audit.config_changed(data_dir(args), f"{args.key} = {value} (in {f.path}, while not running)",
                                 audit.Participant("person", user=f"{audit.shell_user()} (appliance config)"))
            return f"{args.key} = {value!r} written to {f.path}; it applies at the next start"

        print(_via_service(args, "set", offline, key=args.key, value=args.value))
    else:  # validate: the file, or whether KEY VALUE would be accepted
        if args.key is not None and args.value is None:
            raise ConfigError("validate KEY needs a VALUE too")

        def check() -> str:
            if args.key is None:
                f.load()
                return f"{f.path} is valid"
            f.plan(args.key, args.value)
            return f"{args.key} = {args.value} is valid"

        fields = {"key": args.key, "value": args.value} if args.key is not None else {}
        print(_via_service(args, "validate", check, **fields))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print health, counts, disk use and the last import and export; exit 1 when degraded."""
    from appliance.ops import health

    def offline() -> dict[str, Any]:
        store = open_store(args)
        try:
            return health.offline(store).to_dict()
        finally:
            store.close(clean=False)

    h = _via_service(args, "status", offline)
    if args.json:
        print(json.dumps(h, indent=1))
    else:
        print(health.Health.from_dict({k: v for k, v in h.items() if k != "children"}).render())
        for name, pid in (h.get("children") or {}).items():
            print(f"child:    {name} pid {pid}")
    return 0 if h.get("ok") else 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    rt = argparse.ArgumentParser(add_help=False)
    rt.add_argument("--runtime-dir", metavar="DIR",
                    help=f"where the running appliance's socket is (default {DEFAULT_RUNTIME_DIR})")

    s = subparsers.add_parser("config", parents=[rt], help="show, get, set or validate settings")
    sub = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("show", help="print the whole configuration in effect")
    g = sub.add_parser("get", help="print one setting, e.g. scp.port")
    g.add_argument("key", metavar="KEY")
    g = sub.add_parser("set", help="change one setting, e.g. scp.port 11112 (applies at once when running)")
    g.add_argument("key", metavar="KEY")
    g.add_argument("value", metavar="VALUE")
    g = sub.add_parser("validate", help="check the config file, or whether KEY VALUE would be accepted")
    g.add_argument("key", nargs="?", metavar="KEY")
    g.add_argument("value", nargs="?", metavar="VALUE")
    s.set_defaults(func=cmd_config)

    s = subparsers.add_parser("status", parents=[rt], help="print health, counts, disk use, last import/export")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.set_defaults(func=cmd_status)
