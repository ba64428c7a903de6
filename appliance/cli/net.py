"""``appliance echo`` and ``send``: the client AE (ELEKTA_CLIENT) from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from appliance import tls
from appliance.config import DESTINATION_TLS, Config, Destination
from appliance.conformance import CLIENT_AE_TITLE, DEFAULT_CLIENT_PDU, MIN_PDU
from appliance.errors import ConfigError
from appliance.net.sender import (
    DEFAULT_CALLED_AE,
    DEFAULT_ECHO_TIMEOUT,
    DEFAULT_SEND_TIMEOUT,
    ClientSettings,
    check_peer,
    echo,
    max_pdu_problem,
    plan_send,
    send,
)
from appliance.reports import item_printer


def max_pdu(text: str) -> int:
    """``-pdu``'s value: 0 (no limit) or MIN_PDU to MAX_PDU bytes; else a usage error (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number of bytes") from None
    problem = max_pdu_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def seconds(text: str) -> float:
    """``--timeout``'s type: a usage error (exit 2, like ``-pdu``) unless 0 < S <= 3600."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"timeout {text} s is out of range; use 1 to 3600 seconds")
    return value


def client_options(p: argparse.ArgumentParser, timeout: float) -> None:
    """Add the options every command that calls a remote AE shares (``echo``, ``send``,
    ``rt-export``): our AE title, the called AE title, our max PDU and the timeout."""
    p.add_argument("-aet", "--aetitle", dest="aet", default=CLIENT_AE_TITLE, metavar="AET",
                   help=f"our (calling) AE title (default {CLIENT_AE_TITLE})")
    p.add_argument("-aec", "--call", dest="aec", metavar="AET",
                   help=f"the peer's (called) AE title (default {DEFAULT_CALLED_AE}, or the destination's)")
    p.add_argument("-pdu", "--max-pdu", dest="pdu", type=max_pdu, default=DEFAULT_CLIENT_PDU, metavar="BYTES",
                   help=f"max PDU we receive, {MIN_PDU} or more, 0 for no limit (default {DEFAULT_CLIENT_PDU})")
    p.add_argument("--timeout", type=seconds, default=timeout, metavar="S",
                   help=f"seconds to wait for connection, association and each response (default {timeout:g})")


def tls_option(p: argparse.ArgumentParser) -> None:
    """``--tls MODE`` of ``echo`` and ``send``."""
    p.add_argument("--tls", choices=DESTINATION_TLS, metavar="MODE",
                   help="plain, tls (verify the peer against [tls] ca_certificates) or mutual (and present our "
                        "certificate); default plain, or the destination's")


def secured(args: argparse.Namespace, cfg: Config, peer: Destination,
            settings: ClientSettings) -> tuple[Destination, ClientSettings]:
    """``peer`` with ``--tls`` if given, and ``settings`` with ``[tls]`` if the peer uses TLS."""
    if getattr(args, "tls", None):
        peer = dataclasses.replace(peer, tls=args.tls)
    if peer.tls == "plain":
        return peer, settings
    from appliance.cli.common import data_dir

    return peer, dataclasses.replace(settings, tls=tls.credentials(cfg.tls, data_dir(args)))


def quiet_pynetdicom(args: argparse.Namespace) -> None:
    """Silence pynetdicom below -d: we report failures ourselves in one line, its ERROR lines would repeat them."""
    if args.verbosity < 2:
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def peer_from(cfg: Config, name: str | None, aec: str | None, host: str | None, port: int | None) -> Destination:
    """The peer to call: the config file's destination ``name`` (its AE title unless -aec), else HOST PORT."""
    if name:
        dest = cfg.destinations.get(name)
        if dest is None:
            known = ", ".join(sorted(cfg.destinations)) or "none are configured"
            raise ConfigError(f"no destination '{name}' in the config file ([destinations.NAME]; known: {known})")
        return Destination(aec or dest.ae_title, dest.host, dest.port, dest.tls)
    assert host is not None and port is not None  # the parser checked
    return Destination(aec or DEFAULT_CALLED_AE, host, port)


def cmd_echo(args: argparse.Namespace) -> int:
    """Send a C-ECHO and print one line: success with the round-trip time, or what went wrong."""
    quiet_pynetdicom(args)
    from appliance.cli.common import load_config

    peer = Destination(args.aec or DEFAULT_CALLED_AE, args.host, args.port)
    settings = ClientSettings(args.aet, args.pdu, args.timeout)
    if args.tls and args.tls != "plain":
        peer, settings = secured(args, load_config(args), peer, settings)
    print(echo(peer, settings))
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    """Export the requested studies and series; print each object's result and a summary."""
    parser: argparse.ArgumentParser = args.send_parser
    if not (args.study or args.series):
        parser.error("give at least one --study UID or --series UID")
    if args.to and (args.host or args.port is not None):
        parser.error("give either HOST PORT or --to DESTINATION, not both")
    if not args.to and (args.host is None or args.port is None):
        parser.error("give HOST PORT, or --to DESTINATION from the config file")
    quiet_pynetdicom(args)
    from appliance.cli.common import load_config, open_store

    cfg = load_config(args)
    peer = peer_from(cfg, args.to, args.aec, args.host, args.port)
    peer, settings = secured(args, cfg, peer, ClientSettings(args.aet, args.pdu, args.timeout))
    settings.check()
    check_peer(peer)
    store = open_store(args, cfg)
    try:
        plan = plan_send(store, studies=args.study, series=args.series)
        for r in plan.refused:
            print(f"refused   {r}", flush=True)
        report = send(store, plan, peer, settings, progress=item_printer(sys.stdout))
    finally:
        store.close(clean=False)
    print(report.summary())
    return 0 if report.ok else 1


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    e = subparsers.add_parser("echo", help="check a DICOM peer with C-ECHO (Verification, Implicit VR LE)")
    client_options(e, DEFAULT_ECHO_TIMEOUT)
    tls_option(e)
    e.add_argument("host", metavar="HOST")
    e.add_argument("port", type=int, metavar="PORT")
    e.set_defaults(func=cmd_echo)

    s = subparsers.add_parser(
        "send", help="export studies or series (3D volumes with their RT objects) to a DICOM peer (C-STORE)",
        usage="appliance send [-aet AET] [-aec AET] [-pdu BYTES] [--timeout S] [--tls MODE] "
              "(HOST PORT | --to DESTINATION) (--study UID | --series UID)...",
    )
    client_options(s, DEFAULT_SEND_TIMEOUT)
    tls_option(s)
    s.add_argument("--to", metavar="DESTINATION", help="a destination named in the config file")
    s.add_argument("--study", action="append", default=[], metavar="UID", help="export this study")
    s.add_argument("--series", action="append", default=[], metavar="UID", help="export this series")
    s.add_argument("host", nargs="?", metavar="HOST")
    s.add_argument("port", nargs="?", type=int, metavar="PORT")
    s.set_defaults(func=cmd_send, send_parser=s)
