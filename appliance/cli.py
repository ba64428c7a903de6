"""The ``appliance`` command: one entry point, one subcommand per task.

Exit codes: 0 success, 1 an :class:`ApplianceError` (printed as one line), 2 usage.
Command-line flags override the config file, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import errno
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from appliance import __version__, config, logs
from appliance.conformance import SOP_CLASS_LABELS, TRANSFER_SYNTAX_NAMES, SOPClass
from appliance.errors import ApplianceError

Handler = Callable[[argparse.Namespace], int]

#: Environment variable: the pid of the ``appliance run`` that started this SCP.
SUPERVISOR_PID = "APPLIANCE_SUPERVISOR_PID"

#: Subcommands that other modules add, each with its module. A module has
#: ``add_commands(subparsers)``, whose handlers take the parsed arguments (with ``config``,
#: ``data_dir``, ``verbosity``) and return an exit code; use :func:`load_config` and
#: :func:`open_store` from here. To run one command only its module is imported: every SCP
#: start runs ``appliance scp``, and the serial console ``appliance console``, and neither
#: should wait for the exporter or the RT code to load (seconds on the box's slow start).
COMMANDS: dict[str, str] = {
    "import": "appliance.media.importer",
    "echo": "appliance.net.sender",
    "send": "appliance.net.sender",
    "export": "appliance.media.exporter",
    "queue": "appliance.media.exporter",
    "rt-export": "appliance.rt.rtexport",
    "config": "appliance.ops.configservice",
    "status": "appliance.ops.configservice",
    "run": "appliance.ops.supervisor",
    "console": "appliance.ops.console",
    "network": "appliance.ops.console",
}


def data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir:
        return Path(args.data_dir)
    return Path(os.environ.get("APPLIANCE_DATA_DIR", str(config.DEFAULT_DATA_DIR)))


def load_config(args: argparse.Namespace) -> config.Config:
    return config.load(Path(args.config) if args.config else None)


def open_store(args: argparse.Namespace, cfg: config.Config | None = None):  # type: ignore[no-untyped-def]
    from appliance.store.store import Store

    cfg = cfg or load_config(args)
    return Store(data_dir(args), slice_tolerance_mm=cfg.store.slice_tolerance_mm)


# -- scp ---------------------------------------------------------------------------


def _orphaned(supervisor: str | None) -> bool:
    """True when the ``appliance run`` that started this SCP (pid ``supervisor``) has died,
    even by SIGKILL: an orphan would go on serving the port with settings nobody manages.
    (``PR_SET_PDEATHSIG`` cannot serve: it fires when the spawning *thread* ends, and the
    config service spawns SCPs from short-lived request threads.)"""
    return supervisor is not None and str(os.getppid()) != supervisor


def cmd_scp(args: argparse.Namespace) -> int:
    """Run the Storage SCP in the foreground until SIGTERM or SIGINT."""
    supervisor = os.environ.get(SUPERVISOR_PID) if args.listen_fd is not None else None
    from appliance.store.ingest import Ingest
    from appliance.net.scp import StorageServer

    cfg = config.with_overrides(
        load_config(args),
        ae_title=args.aet,
        port=args.port or None,
        max_pdu=args.pdu,
        max_associations=args.max_associations,
        bind=args.bind,
    )
    if args.port == 0:  # any free port: for tests and benchmarks
        cfg = dataclasses.replace(cfg, scp=dataclasses.replace(cfg.scp, port=0))
    store = open_store(args, cfg)
    store.open_for_service()
    sock = None
    if args.listen_fd is not None:  # a listening socket handed over by ``appliance run``
        import socket

        sock = socket.socket(fileno=args.listen_fd)
    server = StorageServer(cfg.scp, Ingest(store, cfg.store), sock=sock)
    try:
        where = server.start()
    except PermissionError:
        store.close()
        raise ApplianceError(
            f"port {cfg.scp.port} needs root or CAP_NET_BIND_SERVICE; use a port above 1023, e.g. 11112"
        ) from None
    except OSError as exc:
        store.close()
        if exc.errno == errno.EADDRINUSE:
            raise ApplianceError(f"port {cfg.scp.port} is already in use by another program") from None
        raise ApplianceError(f"cannot listen on {cfg.scp.bind}:{cfg.scp.port}: {exc.strerror}") from None

    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    from appliance.adapters.systemd import Notifier

    notifier = Notifier()
    notifier.ready(f"listening {where.ae_title}:{where.port}")
    host = "127.0.0.1" if where.host in ("0.0.0.0", "::") else where.host
    print(
        f"Storage SCP {where.ae_title} listening on {where.host}:{where.port}, store in {store.data_dir}\n"
        f"Try it: echoscu -aec {where.ae_title} {host} {where.port}",
        file=sys.stderr,
        flush=True,
    )
    from appliance.net.scp import serve_until_stopped

    serve_until_stopped(server, store.data_dir, notifier.send, stop, lambda: _orphaned(supervisor))
    notifier.stopping("stopping: finishing associations in flight")
    server.stop()
    store.close(clean=True)
    return 0


# -- ls, locate, reindex -----------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[("" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    def line(r: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _verdict(ok: int | None, reason: str | None) -> str:
    if ok is None:
        return "-"
    return ("3D ok: " if ok else "not 3D: ") + (reason or "")


def cmd_ls(args: argparse.Namespace) -> int:
    """Print the stored studies, series or instances."""
    store = open_store(args)
    store.update_verdicts()
    rows: list[tuple[object, ...]]
    if args.level == "series":
        rows = [
            (s.series_uid, s.study_uid, s.modality, s.series_number, s.instances,
             _verdict(s.volume_ok, s.volume_reason))
            for s in store.series_listing()
        ]
        out = _table(["SERIES UID", "STUDY UID", "MODALITY", "NUMBER", "INSTANCES", "3D VERDICT"], rows)
    elif args.level == "instances":
        rows = [
            (i.sop_instance_uid, i.series_uid, _label(i.sop_class_uid),
             TRANSFER_SYNTAX_NAMES.get(i.transfer_syntax, i.transfer_syntax), i.size,
             i.received_at, i.calling_ae or i.origin, i.flags or "")
            for i in store.instance_listing()
        ]
        out = _table(["SOP INSTANCE UID", "SERIES UID", "CLASS", "TRANSFER SYNTAX", "BYTES", "RECEIVED",
                      "FROM", "FLAGS"], rows)
    else:
        rows = [
            (st.patient_id, st.patient_name, st.study_uid, st.study_date, st.series, st.instances, st.last_received)
            for st in store.study_listing()
        ]
        out = _table(["PATIENT ID", "PATIENT NAME", "STUDY UID", "DATE", "SERIES", "INSTANCES",
                      "LAST RECEIVED"], rows)
    print(out)
    store.close(clean=False)
    return 0


def _label(uid: str) -> str:
    try:
        return SOP_CLASS_LABELS[SOPClass(uid)]
    except ValueError:
        return uid


def cmd_locate(args: argparse.Namespace) -> int:
    """Print the stored file of a SOP Instance UID; exit 1 if it is not stored."""
    store = open_store(args)
    path = store.locate(args.uid)
    store.close(clean=False)
    if path is None:
        print(f"no stored object has SOP Instance UID {args.uid}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    """Rebuild the index from the stored files. On a full or failing disk this stops with one
    line saying whether the old index was kept or must be rebuilt again (exit 1)."""
    from appliance.errors import StoreDiskError, StoreFullError

    try:
        store = open_store(args)
    except (StoreFullError, StoreDiskError) as exc:
        remedy = "Free space" if isinstance(exc, StoreFullError) else "Check the disk"
        raise type(exc)(f"{exc}; nothing was changed. {remedy}, then run 'appliance reindex' again") from exc
    try:
        n = store.reindex()
    finally:
        store.close(clean=False)
    print(f"reindexed {n} stored object(s) under {store.data_dir}")
    return 0


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
    """The parser of every command, or, given one of :data:`COMMANDS`, of the built-in
    commands and that one only (so only its module is imported)."""
    p = argparse.ArgumentParser(prog="appliance", description="DICOM storage appliance")
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    _global_options(p)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("scp", help="run the Storage SCP (C-ECHO, C-STORE)")
    s.add_argument("-aet", "--aetitle", dest="aet", metavar="AET", help="our AE title (default ELEKTA_STORAGE)")
    s.add_argument("-pdu", "--max-pdu", dest="pdu", type=int, metavar="BYTES", help="max PDU we receive")
    s.add_argument("--max-associations", type=int, metavar="N", help="simultaneous associations (default 5)")
    s.add_argument("--bind", metavar="ADDR", help="address to listen on (default 0.0.0.0)")
    s.add_argument("port", nargs="?", type=int, metavar="PORT", help="TCP port (default 104; 0 picks a free one)")
    s.add_argument("--listen-fd", type=int, metavar="FD",
                   help="serve this inherited listening socket instead of binding (used by 'appliance run')")
    s.set_defaults(func=cmd_scp)

    s = sub.add_parser("ls", help="list stored studies, series or instances")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--studies", action="store_const", const="studies", dest="level")
    g.add_argument("--series", action="store_const", const="series", dest="level")
    g.add_argument("--instances", action="store_const", const="instances", dest="level")
    s.set_defaults(func=cmd_ls, level="studies")

    s = sub.add_parser("locate", help="print the stored file of a SOP Instance UID")
    s.add_argument("uid", metavar="SOP_INSTANCE_UID")
    s.set_defaults(func=cmd_locate)

    s = sub.add_parser("reindex", help="rebuild the index from the stored files")
    s.set_defaults(func=cmd_reindex)

    if command in COMMANDS:
        modules = [COMMANDS[command]]
    elif command in sub.choices:
        modules = []
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
