"""``appliance audit``: the audit trail, in words or as JSON lines."""

from __future__ import annotations

import argparse
import json

from appliance import audit
from appliance.cli.common import data_dir


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the last events of the audit trail, oldest first."""
    events = audit.read(data_dir(args), args.n)
    if args.event:
        events = [e for e in events if args.event.lower() in str(e.get("event", "")).lower()]
    if not events:
        print("the audit trail is empty")
        return 0
    for e in events:
        print(json.dumps(e, ensure_ascii=False) if args.json else audit.line(e))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    s = subparsers.add_parser("audit", help="the audit trail: transfers, exports, deletions, changes, logins")
    s.add_argument("-n", type=int, default=50, metavar="N", help="the last N events (default 50)")
    s.add_argument("--event", metavar="TEXT", help="only events whose name contains TEXT, e.g. deleted")
    s.add_argument("--json", action="store_true", help="one JSON object per line, as stored")
    s.set_defaults(func=cmd_audit)
