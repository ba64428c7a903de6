"""``appliance scp``, ``ls``, ``locate`` and ``reindex``: the Storage SCP and the store."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import signal
import sys
import threading

from appliance import config
from appliance.cli.common import load_config, open_store, table
from appliance.conformance import TRANSFER_SYNTAX_NAMES
from appliance.errors import ApplianceError
from appliance.reports import sop_class_label


def _orphaned(supervisor: str | None) -> bool:
    """True when the ``appliance run`` that started this SCP (pid ``supervisor``) has died,
    even by SIGKILL: an orphan would go on serving the port with settings nobody manages.
    (``PR_SET_PDEATHSIG`` cannot serve: it fires when the spawning *thread* ends, and the
    config service spawns SCPs from short-lived request threads.)"""
    return supervisor is not None and str(os.getppid()) != supervisor


def cmd_scp(args: argparse.Namespace) -> int:
    """Run the Storage SCP in the foreground until SIGTERM or SIGINT."""
    supervisor = os.environ.get(config.SUPERVISOR_PID) if args.listen_fd is not None else None
    from appliance.net.qr import QueryRetrieveServer
    from appliance.net.scp import limit_malloc_arenas
    from appliance.store.ingest import Ingest

    limit_malloc_arenas()

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
    store.set_forwarding(cfg.forward)  # what the rules match is queued as it is stored
    store.open_for_service()
    import socket

    from appliance import tls
    from appliance.net.sender import ClientSettings

    sock = tls_sock = None
    if args.listen_fd is not None:  # a listening socket handed over by ``appliance run``
        sock = socket.socket(fileno=args.listen_fd)
    if args.tls_listen_fd is not None:  # and its DICOM TLS socket
        tls_sock = socket.socket(fileno=args.tls_listen_fd)
    context = None
    client = ClientSettings()
    try:
        if cfg.scp.tls_port or tls_sock is not None:
            context = tls.server_context(tls.credentials(cfg.tls, store.data_dir, cfg.scp.ae_title), cfg.peer)
        if any(d.tls != "plain" for d in cfg.destinations.values()):  # C-MOVE to them
            client = ClientSettings(tls=tls.credentials(cfg.tls, store.data_dir, cfg.scp.ae_title))
    except ApplianceError:
        store.close()
        raise
    from appliance.store.retention import Retention, RetentionWorker

    retention = Retention(store, cfg.retention, cfg.store.min_free_mb * 2**20)
    # The Storage Server, with Query/Retrieve when [qr] is enabled (beyond the statement).
    server = QueryRetrieveServer(cfg.scp, Ingest(store, cfg.store, make_room=retention.make_room), sock=sock,
                                 qr=cfg.qr, destinations=cfg.destinations, client=client)
    server.secure(context, tls_sock, cfg.peer)
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
            raise ApplianceError(f"port {cfg.scp.port} or the TLS port {cfg.scp.tls_port} is already in use by "
                                 "another program") from None
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
        f"Storage SCP {where.ae_title} listening on {where.host}:{where.port}"
        + (f" and DICOM TLS on {where.tls_port}" if where.tls_port else "") + f", store in {store.data_dir}\n"
        f"Try it: echoscu -aec {where.ae_title} {host} {where.port}",
        file=sys.stderr,
        flush=True,
    )
    from appliance.net.scp import serve_until_stopped

    worker = RetentionWorker(retention)
    worker.start()
    serve_until_stopped(server, store.data_dir, notifier.send, stop, lambda: _orphaned(supervisor))
    notifier.stopping("stopping: finishing associations in flight")
    worker.stop()
    server.stop()
    store.close(clean=True)
    return 0


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
        out = table(["SERIES UID", "STUDY UID", "MODALITY", "NUMBER", "INSTANCES", "3D VERDICT"], rows)
    elif args.level == "instances":
        rows = [
            (i.sop_instance_uid, i.series_uid, sop_class_label(i.sop_class_uid),
             TRANSFER_SYNTAX_NAMES.get(i.transfer_syntax, i.transfer_syntax), i.size,
             i.received_at, i.calling_ae or i.origin, i.flags or "")
            for i in store.instance_listing()
        ]
        out = table(["SOP INSTANCE UID", "SERIES UID", "CLASS", "TRANSFER SYNTAX", "BYTES", "RECEIVED",
                      "FROM", "FLAGS"], rows)
    else:
        rows = [
            (st.patient_id, st.patient_name, st.study_uid, st.study_date, st.series, st.instances, st.last_received)
            for st in store.study_listing()
        ]
        out = table(["PATIENT ID", "PATIENT NAME", "STUDY UID", "DATE", "SERIES", "INSTANCES",
                      "LAST RECEIVED"], rows)
    print(out)
    store.close(clean=False)
    return 0


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




def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    sub = subparsers
    s = sub.add_parser("scp", help="run the Storage SCP (C-ECHO, C-STORE)")
    s.add_argument("-aet", "--aetitle", dest="aet", metavar="AET", help="our AE title (default ELEKTA_STORAGE)")
    s.add_argument("-pdu", "--max-pdu", dest="pdu", type=int, metavar="BYTES", help="max PDU we receive")
    s.add_argument("--max-associations", type=int, metavar="N", help="simultaneous associations (default 5)")
    s.add_argument("--bind", metavar="ADDR", help="address to listen on (default 0.0.0.0)")
    s.add_argument("port", nargs="?", type=int, metavar="PORT", help="TCP port (default 104; 0 picks a free one)")
    s.add_argument("--listen-fd", type=int, metavar="FD",
                   help="serve this inherited listening socket instead of binding (used by 'appliance run')")
    s.add_argument("--tls-listen-fd", type=int, metavar="FD",
                   help="serve DICOM TLS on this inherited listening socket (used by 'appliance run')")
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
