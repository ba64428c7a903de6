"""A receiver that stores nothing: our acceptor with every data set dropped.

``scripts/bench-scp --floor`` runs it beside ours and DCMTK's storescp, to measure what the
sender, loopback and our protocol code cost on their own. It speaks the same upper layer
and DIMSE as ``appliance scp`` (it *is* :class:`appliance.net.acceptor.Acceptor`), answers
every C-STORE with Success as soon as the last fragment is in, and writes nothing per
object, so that ours minus the sink is what storing costs. On SIGTERM it writes the number
of data sets it received to ``<data-dir>/received`` and exits 0.

    python -m bench.sink --data-dir DIR [--aet AET] [--pdu N] [--max-associations N] PORT
"""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import cast

from appliance.config import ScpConfig
from appliance.conformance import DEFAULT_MAX_ASSOCIATIONS, DEFAULT_SCP_AE_TITLE, Status
from appliance.net.acceptor import Acceptor
from appliance.store.ingest import IncomingObject, Outcome

#: Where the sink leaves its count, under --data-dir.
COUNT_FILE = "received"


class Dropped:
    """What the acceptor streams a data set into: its size is counted, its bytes dropped."""

    def __init__(self, sink: Sink, sop_instance_uid: str) -> None:
        self.sink = sink
        self.sop_instance_uid = sop_instance_uid
        self.size = 0

    def write(self, data: memoryview) -> None:
        self.size += len(data)

    def finish(self) -> Outcome:
        with self.sink.lock:
            self.sink.received += 1
        return Outcome(Status.SUCCESS, "received and dropped", self.sop_instance_uid)

    def settle(self) -> None:
        pass

    def discard(self) -> None:
        pass


class Sink:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received = 0

    def open_stream(self, ts: str, sop_class_uid: str, sop_instance_uid: str, calling_ae: str) -> IncomingObject:
        return cast(IncomingObject, Dropped(self, sop_instance_uid))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.sink", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--aet", default=DEFAULT_SCP_AE_TITLE)
    p.add_argument("--pdu", type=int, default=65536)
    p.add_argument("--max-associations", type=int, default=DEFAULT_MAX_ASSOCIATIONS)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("port", type=int)
    args = p.parse_args(argv)
    sink = Sink()
    settings = ScpConfig(
        ae_title=args.aet,
        max_pdu=args.pdu,
        max_associations=args.max_associations,
        check_called_ae=True,
    )
    acceptor = Acceptor(settings, sink.open_stream)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    acceptor.listen(args.bind, args.port)
    stop.wait()
    acceptor.stop(5.0)
    (args.data_dir / COUNT_FILE).write_text(f"{sink.received}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
