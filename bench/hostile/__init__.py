"""Hostile and heavy peers for a running Storage SCP, over real TCP.

Used by ``tests/test_soak.py`` (one behaviour per test) and ``scripts/soak`` (all of them in
the background of real DCMTK senders). Each generator talks to a :class:`Target` (host,
port, AE title), is bounded in time and in count, and is deterministic given its arguments
(``fuzz`` draws every case from ``random.Random`` seeded with ``seed`` and the case number,
so any case can be replayed alone). They report what the SCP did (answered, refused,
aborted, closed, stayed silent) and assert nothing: judging is the caller's business.

* :func:`connect_flood`: bare TCP connects, held open, never associating.
* :func:`slow_peers`: peers trickling one byte a second, before associating (an
  A-ASSOCIATE-RQ) or inside an association (a P-DATA-TF).
* :func:`command_bomb`, :func:`header_bomb`, :func:`memory_bombs`: a DIMSE command that
  never ends (P-DATA fragments without the last-fragment bit), and A-ASSOCIATE-RQ headers
  announcing large PDUs that never come.
* :func:`fuzz`: mutated A-ASSOCIATE-RQ / P-DATA-TF / A-RELEASE-RQ PDUs (bit flips,
  truncation, lying lengths, random PDU types, inserted and random bytes), each on its own
  connection, with a short read of the answer.
* :func:`hostile_store`: C-STOREs of objects whose SOP Instance UID holds byte 0xFF or ends
  in a newline, and one with unknown two-letter VRs sent twice (the second is a duplicate).
* :func:`echo_ok`, :func:`store_ok`: DCMTK ``echoscu``/``storescu`` round trips, timed;
  :func:`proc_stats`: descriptors, threads and memory of a process, from ``/proc``.

The PDUs are written by hand after PS3.8 9.3 (A-ASSOCIATE-RQ 9.3.2, P-DATA-TF 9.3.5,
A-RELEASE-RQ 9.3.6) and the commands after PS3.7 9.3.1/9.3.5, so that a generator can send
exactly the bytes it means to, including wrong ones.

The modules: :mod:`bench.hostile.wire` (PDUs, commands, answers, raw associations),
:mod:`bench.hostile.peers` (flood, slow peers, memory bombs), :mod:`bench.hostile.payloads`
(fuzz, hostile values), :mod:`bench.hostile.checks` (``/proc`` and DCMTK round trips); their
names are all here, so callers write ``hostile.X``.
"""

from bench.hostile.checks import (  # noqa: F401
    ProcStats,
    RoundTrip,
    echo_ok,
    fresh_copy,
    open_files,
    proc_stats,
    store_ok,
    store_status,
)
from bench.hostile.payloads import (  # noqa: F401
    FuzzCase,
    FuzzReport,
    HostileResult,
    fuzz,
    fuzz_cases,
    hostile_objects,
    hostile_store,
)
from bench.hostile.peers import (  # noqa: F401
    BombReport,
    FloodReport,
    SlowPeer,
    command_bomb,
    connect_flood,
    header_bomb,
    memory_bombs,
    slow_peers,
)
from bench.hostile.wire import (  # noqa: F401
    A_RELEASE_RQ,
    ABORT,
    ASSOCIATE_AC,
    ASSOCIATE_RJ,
    ASSOCIATE_RQ,
    CALLING_AE,
    CLIENT_MAX_PDU,
    IMPLEMENTATION_UID,
    P_DATA_TF,
    PDU_NAMES,
    RELEASE_RP,
    RELEASE_RQ,
    Answer,
    Association,
    Target,
    associate,
    associate_rq,
    close_quietly,
    command,
    command_status,
    connect,
    echo_rq,
    ensure_fds,
    insecure_tls,
    p_data,
    pdu,
    peer_gone,
    read_answer,
    store_rq,
    try_associate,
)
