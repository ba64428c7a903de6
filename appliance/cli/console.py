"""``appliance console``, ``network`` and ``service-password``: the serial console's menu, the
network settings, and the service password kept on the data partition."""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from appliance.cli.common import data_dir
from appliance.ops.configservice import SOCKET_NAME, ConfigFile, runtime_dir
from appliance.ops.console import Console
from appliance.ops.console.screen import JOURNAL_COMMAND, SHADOW
from appliance.ops.consolesettings import ConsoleSettings


def _settings(args: argparse.Namespace) -> ConsoleSettings:
    return ConsoleSettings(ConfigFile(Path(args.config) if args.config else None),
                    runtime_dir(args.runtime_dir) / SOCKET_NAME)


def cmd_console(args: argparse.Namespace) -> int:
    """Run the menu on stdin/stdout (the serial line) until the input ends."""
    if args.verbosity < 2:  # the console says what failed in words; pynetdicom's lines would garble the screen
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    _journal_what_is_done()
    log_file = args.log_file or os.environ.get("APPLIANCE_LOG_FILE")
    console = Console(
        sys.stdin, sys.stdout, _settings(args),
        data_dir=data_dir(args),
        networkd_dir=Path(args.networkd_dir) if args.networkd_dir else None,
        systemctl=shlex.split(args.systemctl),
        log_file=Path(log_file) if log_file else None,
        journal=None if args.no_journal else JOURNAL_COMMAND,
        live_network=args.live_network,
        shadow=SHADOW if args.service_password else None,
    )
    return console.run()


#: The system log's socket (journald listens on it on the box); APPLIANCE_SYSLOG_SOCKET names another.
SYSLOG_SOCKET = "/dev/log"


def _journal_what_is_done() -> None:
    """What a person does at the console (a deletion, a protection, a send started) is logged
    at INFO by the library; the console's own stderr is the serial screen, which shows only
    warnings. Send INFO to the system log too, so the journal keeps who deleted what and when."""
    import logging.handlers

    socket_path = os.environ.get("APPLIANCE_SYSLOG_SOCKET", SYSLOG_SOCKET)
    if not os.path.exists(socket_path):
        return
    try:
        handler = logging.handlers.SysLogHandler(address=socket_path)
    except OSError:
        return
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("appliance-console: %(name)s: %(message)s"))
    app = logging.getLogger("appliance")
    app.addHandler(handler)
    if app.getEffectiveLevel() > logging.INFO:
        # INFO reaches the system log; the serial screen's handler keeps its own level.
        for h in logging.getLogger().handlers:
            if h.level == logging.NOTSET:
                h.setLevel(logging.getLogger().getEffectiveLevel())
        app.setLevel(logging.INFO)


def cmd_network(args: argparse.Namespace) -> int:
    """Show the interfaces, or write and apply the [network] setting of the config file."""
    from appliance.adapters import network

    if args.action == "show":
        st = network.state()
        print("\n".join(network.render_state(st, 1000)))
        for r in st.routes:
            print(f"route: {r}")
        return 0
    n = _settings(args).current().network
    directory = Path(args.networkd_dir) if args.networkd_dir else network.DEFAULT_NETWORKD_DIR
    print(f"written {network.write_networkd(n, directory)}: {network.describe(n)}")
    if args.live:
        print(f"applied now: {network.apply_live(n)}")
    return 0


def cmd_service_password(args: argparse.Namespace) -> int:
    """Bring root's password and the one kept on the data partition together (at start and stop)."""
    from appliance.ops.servicepassword import sync

    print(sync(data_dir(args), Path(args.shadow)))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--runtime-dir", metavar="DIR",
                        help="where the running appliance's config socket is (default /run/appliance)")
    common.add_argument("--networkd-dir", metavar="DIR",
                        help="where the systemd-networkd file goes (default /etc/systemd/network)")

    s = subparsers.add_parser("console", parents=[common], help="the configuration menu for the serial console")
    s.add_argument("--systemctl", default="systemctl", metavar="CMD",
                   help="what Reboot and Shut down run, with 'reboot'/'poweroff' added (default systemctl)")
    s.add_argument("--log-file", metavar="FILE", help="the log the Log screen shows when there is no journal "
                   "(default $APPLIANCE_LOG_FILE)")
    s.add_argument("--no-journal", action="store_true", help="do not read the journal; show --log-file")
    s.add_argument("--no-live-network", dest="live_network", action="store_false",
                   help="only write the network file, do not change the interfaces now (e.g. on a laptop)")
    s.add_argument("--service-password", action="store_true",
                   help="at start, offer to set root's password if it has none (the box's first boot)")
    s.set_defaults(func=cmd_console)

    s = subparsers.add_parser("network", parents=[common], help="show the interfaces, or apply [network]")
    sub = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("show", help="each interface's state, MAC and addresses, and the routes")
    a = sub.add_parser("apply", help="write the systemd-networkd file from [network] and apply it now")
    a.add_argument("--no-live", dest="live", action="store_false", help="only write the file")
    s.set_defaults(func=cmd_network)

    s = subparsers.add_parser("service-password",
                              help="keep root's password on the data partition, or restore it from there "
                                   "(appliance-service-password.service: an update keeps the service shell's password)")
    sub = s.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("sync", help="the newer of /etc/shadow's and the kept one wins; say what was done")
    s.add_argument("--shadow", default=str(SHADOW), help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_service_password)
