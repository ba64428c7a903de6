"""Forwarding: sending what the ``[[forward]]`` rules queued to its destinations.

The queue is in the index (``forward_queue``): an object is queued in the same transaction
that indexes it (:meth:`appliance.store.store.Store.commit`), so an acknowledged object
that matches a rule is in the queue after any crash. :class:`Forwarder` (run by
``appliance run``) drains it: per destination, in arrival order, one association at a
time, up to :data:`BATCH_OBJECTS` objects (or :data:`BATCH_BYTES`) per association. Each
stored file is sent as it is stored, byte for byte (in its own transfer syntax; converted to
Implicit VR Little Endian only if the destination accepts no other), read while the
destination works on the object before; an entry leaves the queue only when the destination
acknowledged the object, in its own transaction before the next object is sent, so a
destination killed mid-association or a box cut off mid-send re-sends exactly what was not
acknowledged (at most the one object in flight).

The SCP and a CD import queue in other processes: a write to the index wakes the forwarder
(:mod:`appliance.jobs.changes`), which then reads the entries queued since its last look;
the whole queue is looked at every :data:`POLL` seconds as well. An association stays open
:data:`LINGER` seconds for what is queued next, so a series arriving an image at a time is
forwarded as it arrives over one association (one audit event, one log line).

- No association, or one that breaks: the destination waits, with exponential backoff
  and jitter (:data:`BACKOFF_BASE` doubling up to :data:`BACKOFF_MAX`), its backlog kept.
- Out of Resources (0xA7xx), Cannot Understand (0xC0xx is permanent, see below), 0xA9xx
  and other failures that may pass: the object is tried again later, at most
  :data:`MAX_ATTEMPTS` times, then set aside.
- Refused for good (SOP class not supported 0x0122, not authorized 0x0124, 0xCxxx, no
  acceptable transfer syntax): the object is set aside with the reason and no longer blocks
  the queue; ``appliance queue retry --forward`` puts it back.
- A backlog above a rule's cap is reported; the oldest are dropped only if the rule says
  ``drop_oldest``, each drop logged.

A study whose objects have all left the queue is recorded as delivered (retention may then
delete it, see :mod:`appliance.store.retention`).
"""

from __future__ import annotations

import logging
import random
import struct
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Callable

from appliance import audit, tls
from appliance.config import Config, Destination
from appliance.conformance import SOPClass, TransferSyntax
from appliance.dicom.transcode import TranscodeError, body_to_implicit_le
from appliance.errors import ApplianceError, StoreError
from appliance.jobs import changes
from appliance.net.requester import (
    Association,
    AssociationLost,
    FramedDataSet,
    associate,
    stored_data_set,
)
from appliance.net.sender import ClientSettings
from appliance.reports import sop_class_label
from appliance.store.index import ForwardItem
from appliance.store.store import Store

log = logging.getLogger(__name__)

#: At most this many objects, and this many bytes, per association.
BATCH_OBJECTS = 500
BATCH_BYTES = 2 * 10**9
#: Seconds a destination waits after its first failure; doubled per failure in a row, up to BACKOFF_MAX.
BACKOFF_BASE = 5.0
BACKOFF_MAX = 3600.0
#: Tries of an object refused with a status that may pass, before it is set aside.
MAX_ATTEMPTS = 20
#: Seconds between two looks at the whole queue (what is due after a wait: a destination's
#: backoff, a series' stable_after, objects set aside that were queued again).
POLL = 0.2
#: Seconds at least between two looks at whether anything was queued (the id of the last
#: entry). The Storage SCP and a CD import queue what they store in other processes: a write
#: to the index wakes the forwarder (inotify, :mod:`appliance.jobs.changes`), or without
#: inotify it looks this often.
WATCH = 0.01
#: Seconds an association stays open once its destination has nothing due, for what is
#: queued next (a scanner sends a series an image at a time): one association, not one per
#: image. It still ends after BATCH_OBJECTS objects or BATCH_BYTES.
LINGER = 2.0
#: Bytes a read buffer keeps between objects (an association has two): one grown by a
#: larger object is cut back once that object is sent.
KEEP_BUFFER = 64 * 2**20
#: Seconds between two checks of the backlog caps.
CAP_INTERVAL = 30.0

_UNCOMPRESSED = {TransferSyntax.IMPLICIT_LE, TransferSyntax.EXPLICIT_LE, TransferSyntax.EXPLICIT_BE}


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def backoff(failures: int, rng: random.Random | None = None, *, first: float = BACKOFF_BASE,
            most: float = BACKOFF_MAX) -> float:
    """Seconds to wait after ``failures`` failures in a row: doubling from ``first`` up to
    ``most``, times a jitter of 0.5 to 1.5 so that boxes do not retry in step."""
    base: float = min(first * 2.0 ** max(failures - 1, 0), most)
    return base * (0.5 + (rng or random).random())


def _permanent(status: int) -> bool:
    """True for a refusal that will not pass by trying again."""
    return status in (0x0122, 0x0124) or (status & 0xF000) == 0xC000


@dataclass
class BatchResult:
    """What one association with a destination did."""

    sent: int = 0
    bytes: int = 0
    retried: int = 0
    set_aside: int = 0
    dropped: int = 0
    error: str = ""
    #: (study UID, SOP Instance UID) of each object the destination took.
    taken: list[tuple[str, str]] = field(default_factory=list)

    def add(self, other: BatchResult) -> None:
        """Count ``other``'s objects in this one too (an association's several batches)."""
        self.sent += other.sent
        self.bytes += other.bytes
        self.retried += other.retried
        self.set_aside += other.set_aside
        self.dropped += other.dropped
        self.error = other.error or self.error
        self.taken += other.taken


@dataclass
class _Open:
    """An association kept open for the next batch of its destination."""

    assoc: Association
    peer: Destination
    #: The presentation contexts it proposed (a batch needing others opens a new one).
    proposed: frozenset[tuple[str, tuple[str, ...]]]
    #: Seconds spent sending its batches (not waiting between them).
    busy: float = 0.0
    #: What it has done so far, over its batches.
    done: BatchResult = field(default_factory=BatchResult)
    #: The studies it sent objects of, each with when the last batch that did started.
    studies: dict[str, str] = field(default_factory=dict)
    #: The two buffers its objects are read into, in turn (see _Reads).
    buffers: tuple[bytearray, bytearray] = field(default_factory=lambda: (bytearray(), bytearray()))


class Forwarder:
    """Drains the forwarding queue of ``store`` with the destinations of ``settings()``
    (read for every batch, so a config change applies at once), until :meth:`stop`."""

    def __init__(self, store: Store, settings: Callable[[], Config],
                 client: ClientSettings | None = None, poll: float = POLL,
                 backoff_first: float = BACKOFF_BASE, backoff_most: float = BACKOFF_MAX, watch: float = WATCH,
                 linger: float = LINGER) -> None:
        self.store = store
        self.backoff_first = backoff_first
        self.backoff_most = backoff_most
        self.settings = settings
        self.client = client or ClientSettings()
        self.poll = poll
        self.watch = watch
        self.linger = linger
        #: Set when something is due for a destination whose thread is running (it may linger).
        self._more: dict[str, threading.Event] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}
        self._loop_thread: threading.Thread | None = None
        self._changes: changes.FolderWatch | None = None
        self._over_cap: dict[str, str] = {}
        #: What each destination is doing now, e.g. "sending 12 of 300".
        self.activity: dict[str, str] = {}

    def start(self) -> None:
        self._changes = changes.watch(self.store.index.path.parent)
        self._loop_thread = threading.Thread(target=self._loop, name="forwarder", daemon=True)
        self._loop_thread.start()

    def wake(self) -> None:
        """Look at the whole queue now (something was queued, or a destination is free)."""
        self._wake.set()
        watching = self._changes
        if watching is not None:
            watching.poke()

    def stop(self, grace: float = 30.0) -> None:
        """Stop after the objects being sent now (each association is released)."""
        self._stop.set()
        self.wake()
        with self._lock:
            for more in self._more.values():
                more.set()
        if self._loop_thread is not None:
            self._loop_thread.join(grace)
        with self._lock:
            threads = list(self._running.values())
        for t in threads:
            t.join(grace)
        watching = self._changes
        if watching is not None and not (self._loop_thread and self._loop_thread.is_alive()):
            self._changes = None
            watching.close()  # a sending thread that still wakes the loop pokes nothing now

    def over_cap(self) -> dict[str, str]:
        """The destinations whose backlog is above a rule's cap, with what the box does about it."""
        return dict(self._over_cap)

    # -- the loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        """Look whether anything was queued since the last look, and start the destinations
        it is due for, whenever the index is written (at most every ``watch`` seconds); look
        at the whole queue every ``poll`` seconds or when woken. The queue is the only state:
        a look missed costs time, never an object."""
        index = self.store.index
        last_cap = last_full = last_look = 0.0
        seen = 0
        while not self._stop.is_set():
            rest = last_look + self.watch - time.monotonic()
            if rest > 0 and self._stop.wait(rest):
                break
            try:
                now = last_look = time.monotonic()
                if now - last_cap >= CAP_INTERVAL:
                    last_cap = now
                    self.enforce_caps()
                top = index.forward_last_id()
                if self._wake.is_set() or now - last_full >= self.poll or top < seen:
                    self._wake.clear()
                    last_full = now
                    names = index.forward_due(time.time())
                elif top != seen:  # queued since the last look: only those entries are read
                    names = index.forward_due(time.time(), since=seen)
                else:
                    names = []
                seen = top
                for name in names:
                    self._start(name)
            except StoreError as exc:
                log.error("forwarding: cannot read the queue: %s", exc)
            except Exception:  # noqa: BLE001 - a bug must not end forwarding; the next round retries
                log.exception("forwarding: unexpected error")
            watching = self._changes
            if watching is None:
                self._wake.wait(self.watch)
            else:
                watching.wait(last_full + self.poll - time.monotonic())

    def _start(self, name: str) -> None:
        """Start sending to ``name`` unless it is being sent to."""
        with self._lock:
            if name in self._running:
                self._more[name].set()
                return
            self._more.setdefault(name, threading.Event())
            t = threading.Thread(target=self._drain, args=(name,), name=f"forward-{name}", daemon=True)
            self._running[name] = t
        try:
            t.start()
        except BaseException:
            with self._lock:
                del self._running[name]
            raise

    def _drain(self, name: str) -> None:
        """Send batches to ``name`` while it has due objects and answers."""
        more = self._more[name]
        kept: _Open | None = None
        try:
            while not self._stop.is_set():
                more.clear()
                batch = self.store.index.forward_batch(name, time.time(), BATCH_OBJECTS, BATCH_BYTES)
                if not batch:
                    self.activity.pop(name, None)
                    if kept is not None and more.wait(self.linger) and not self._stop.is_set():
                        continue
                    return
                result, kept = self._send(name, batch, kept)
                if result.error:
                    return
        except Exception:  # noqa: BLE001 - logged; the loop starts the destination again
            log.exception("forwarding to %s failed unexpectedly", name)
        finally:
            if kept is not None:
                self._end(name, kept)
            self.activity.pop(name, None)
            with self._lock:
                if self._running.get(name) is threading.current_thread():
                    del self._running[name]
            self.wake()  # a look at what was queued after its last one, while it still ran

    # -- one association -----------------------------------------------------------------

    def send_batch(self, name: str, batch: list[ForwardItem]) -> BatchResult:
        """Send ``batch`` to destination ``name`` over one association; update the queue."""
        result, kept = self._send(name, batch, None)
        if kept is not None:
            self._end(name, kept)
        return result

    def _send(self, name: str, batch: list[ForwardItem], kept: _Open | None) -> tuple[BatchResult, _Open | None]:
        """Send ``batch`` to destination ``name`` over ``kept`` if it still fits (the same
        destination, the contexts the batch needs, within BATCH_OBJECTS and BATCH_BYTES),
        else over a new association; update the queue. Return what the batch did and the
        association, still open, unless it ended."""
        result = BatchResult()
        index = self.store.index
        cfg = self.settings()
        peer = cfg.destinations.get(name)
        started_at = _now_iso()
        if kept is not None and (kept.peer != peer or kept.done.sent >= BATCH_OBJECTS
                                 or kept.done.bytes >= BATCH_BYTES or not kept.assoc.still_open()):
            self._end(name, kept)
            kept = None
        if peer is None:
            self._destination_failed(name, f"destination {name} is no longer configured ([destinations.{name}]); "
                                           "its queue waits until it is configured again", result)
            return result, None
        gone = [i for i in batch if i.path is None]
        if gone:
            index.forward_drop([i.id for i in gone], name)
            log.info("forwarding to %s: %d queued object(s) are no longer stored (deleted); dropped from the queue",
                     name, len(gone))
            result.dropped += len(gone)
        items = [i for i in batch if i.path is not None][:_max_items(batch)]
        if not items:
            return result, kept
        contexts = _contexts(items)
        proposed = frozenset((a, tuple(ts)) for a, ts in contexts)
        if kept is not None and not proposed <= kept.proposed:
            self._end(name, kept)
            kept = None
        if kept is None:
            try:
                client = self.client
                if peer.tls != "plain":  # [tls] as the file says now; a self-signed pair of our own if none is given
                    client = replace(client, tls=tls.credentials(cfg.tls, self.store.data_dir))
                kept = _Open(associate(peer, client, contexts), peer, proposed)
            except ApplianceError as exc:
                self._destination_failed(name, str(exc), result)
                self._audit(name, peer, result)
                return result, None
        assoc = kept.assoc
        studies = {i.study_uid for i in items}
        t0 = time.monotonic()
        try:
            reads = _Reads(self.store, assoc, items, kept.buffers)
            for n, item in enumerate(items, 1):
                if self._stop.is_set():
                    break
                self.activity[name] = f"sending {n} of {len(items)} to {name}"
                if not self._send_one(assoc, name, peer, item, reads.take(n - 1), reads.next_after(n - 1), result):
                    break
        finally:
            kept.busy += time.monotonic() - t0
            kept.done.add(result)
            kept.studies.update(dict.fromkeys(studies, started_at))
            if not assoc.established or self._stop.is_set():
                self._end(name, kept)
                kept = None
        return result, kept

    def _end(self, name: str, kept: _Open) -> None:
        """Release the association (if it still stands), log and audit what it did, and
        record the studies it completed as delivered."""
        kept.assoc.release()
        done, seconds = kept.done, kept.busy
        if done.sent or done.set_aside or done.error:
            self._audit(name, kept.peer, done)
        self._record_delivered(name, kept.studies)
        if done.sent:
            log.info("forwarded %d object(s) (%.1f MB) to %s in %.1f s (%.1f MB/s)%s", done.sent, done.bytes / 1e6,
                     name, seconds, done.bytes / 1e6 / max(seconds, 1e-3),
                     f"; {done.set_aside} set aside, {done.retried} to retry" if done.set_aside or done.retried
                     else "")

    def _audit(self, name: str, peer: Destination, result: BatchResult) -> None:
        outcome = audit.SUCCESS if not (result.set_aside or result.error or result.retried) else \
            audit.SERIOUS if result.sent == 0 else audit.MINOR
        audit.record(self.store.data_dir, audit.Event(
            "transfer", "R", outcome=outcome,
            outcome_text=result.error or (f"{result.set_aside} set aside, {result.retried} to retry"
                                          if outcome else ""),
            participants=(audit.Participant("source", ae=self.client.calling_ae, requestor=True),
                          audit.Participant("destination", ae=peer.ae_title, address=f"{peer.host}:{peer.port}")),
            studies=audit.studies_of(result.taken),
            detail=f"forwarded {result.sent} object(s), {result.bytes / 1e6:.1f} MB, to {name}"))

    def _send_one(self, assoc: Association, name: str, peer: Destination, item: ForwardItem,
                  stored: FramedDataSet | Exception, read_next: Callable[[], None] | None,
                  result: BatchResult) -> bool:
        """Send one object as stored (or converted to Implicit VR LE if the destination
        accepts only that), ``stored`` as read (or why it could not be), reading the next
        object (``read_next``) while the destination works on it; update the queue. Return
        False if the association is gone."""
        index = self.store.index
        cls = str(item.sop_class_uid)
        if isinstance(stored, FileNotFoundError):
            index.forward_drop([item.id], name)
            result.dropped += 1
            return True
        if isinstance(stored, Exception):  # unreadable, or not Part 10
            index.forward_set_aside(item.id, f"cannot read the stored object: {stored}")
            result.set_aside += 1
            return True
        ts = stored.transfer_syntax
        body: bytes | memoryview | FramedDataSet = stored
        cx_id = assoc.context_for(cls, ts)
        if cx_id is None and ts in _UNCOMPRESSED:
            cx_id = assoc.context_for(cls, TransferSyntax.IMPLICIT_LE)
            if cx_id is not None:
                try:
                    body = body_to_implicit_le(stored_data_set(self.store.data_dir / str(item.path)).body, ts)
                except OSError as exc:
                    index.forward_set_aside(item.id, f"cannot read the stored object: {exc}")
                    result.set_aside += 1
                    return True
                except (TranscodeError, ValueError, struct.error) as exc:
                    index.forward_set_aside(item.id, f"cannot convert to Implicit VR LE: {exc}")
                    result.set_aside += 1
                    return True
        if cx_id is None:
            why = (f"{name} accepts no {sop_class_label(cls)} in this object's transfer syntax {ts}"
                   + ("" if ts in _UNCOMPRESSED else " (the box does not decompress)"))
            index.forward_set_aside(item.id, why)
            index.forward_note_error(name, why, _now_iso())
            result.set_aside += 1
            return True
        try:
            rsp = assoc.store(cx_id, item.sop_instance_uid, body, meanwhile=read_next)
        except AssociationLost as exc:
            log.debug("forwarding to %s: %s", name, exc)
            self._destination_failed(name, f"the association with {name} ({peer.ae_title}@{peer.host}:{peer.port}) "
                                           "ended without an answer (aborted, or a timeout); the rest waits", result)
            return False
        status, comment = rsp.status, rsp.comment
        if status == 0 or (status & 0xF000) == 0xB000 or status == 0x0107 or status == 0x0116:
            index.forward_sent(item.id, name, _now_iso())
            result.taken.append((item.study_uid, item.sop_instance_uid))
            result.sent += 1
            result.bytes += item.size
            return True
        why = f"{name} refused {sop_class_label(cls)} {item.sop_instance_uid} with status 0x{status:04X}" + (
            f" ({comment})" if comment else "")
        index.forward_note_error(name, why, _now_iso())
        if _permanent(status) or item.attempts + 1 >= MAX_ATTEMPTS:
            index.forward_set_aside(item.id, why + ("" if _permanent(status) else
                                                    f"; given up after {MAX_ATTEMPTS} tries"))
            log.error("forwarding: %s; set aside", why)
            result.set_aside += 1
        else:
            index.forward_retry(item.id, time.time() + backoff(item.attempts + 1, first=self.backoff_first,
                                                               most=self.backoff_most), why)
            log.warning("forwarding: %s; tried again later", why)
            result.retried += 1
        return True

    def _destination_failed(self, name: str, why: str, result: BatchResult) -> None:
        result.error = why
        failures, wait = self.store.index.forward_failed(
            name, why, _now_iso(), lambda n: backoff(n, first=self.backoff_first, most=self.backoff_most))
        log.log(logging.WARNING if failures == 1 else logging.INFO,
                "forwarding to %s: %s; trying again in %.0f s (failure %d in a row)", name, why, wait, failures)

    def _record_delivered(self, name: str, studies: dict[str, str]) -> None:
        """Studies none of whose objects wait any more are delivered (retention may delete
        them), as of when the last batch that sent objects of each started."""
        done: dict[str, list[str]] = {}
        for study, started_at in sorted(studies.items()):
            if self.store.index.forward_left_in_study(study) == 0:
                done.setdefault(started_at, []).append(study)
        for started_at, uids in done.items():
            try:
                self.store.marks.delivered(uids, f"forwarded to {name}", started_at)
            except StoreError as exc:
                log.warning("could not record which studies were forwarded (retention keeps them): %s", exc)

    # -- backlog caps -------------------------------------------------------------------

    def enforce_caps(self) -> None:
        """Report (and, if a rule says so, drop the oldest of) a backlog above a rule's cap."""
        cfg = self.settings()
        states = {s.destination: s for s in self.store.index.forward_states()}
        over: dict[str, str] = {}
        for rule in cfg.forward:
            if not rule.max_pending and not rule.max_pending_gb:
                continue
            for name in rule.to:
                st = states.get(name)
                if st is None:
                    continue
                excess_n = st.pending - rule.max_pending if rule.max_pending else 0
                excess_b = int(st.pending_bytes - rule.max_pending_gb * 1e9) if rule.max_pending_gb else 0
                if excess_n <= 0 and excess_b <= 0:
                    continue
                cap = " and ".join(x for x in (f"{rule.max_pending} objects" if rule.max_pending else "",
                                               f"{rule.max_pending_gb:g} GB" if rule.max_pending_gb else "") if x)
                if rule.drop_oldest:
                    ids = self.store.index.forward_oldest(name, max(excess_n, 0), max(excess_b, 0))
                    self.store.index.forward_drop(ids, name)
                    log.warning("forwarding to %s: %d object(s) waiting (%.1f MB), above the cap of %s: the %d "
                                "oldest were dropped from the queue (the rule says drop_oldest); they stay stored",
                                name, st.pending, st.pending_bytes / 1e6, cap, len(ids))
                else:
                    over[name] = (f"{st.pending} object(s) ({st.pending_bytes / 1e6:.0f} MB) wait for {name}, above "
                                  f"the cap of {cap}; nothing is dropped (drop_oldest is off)")
        for name, text in over.items():
            if self._over_cap.get(name) is None:
                log.error("forwarding: %s", text)
        self._over_cap = over


class _Reads:
    """The stored files of one batch's objects, each read while the destination works on
    the one before (into the association's two buffers, in turn): what it cannot read is kept
    as the error, for :meth:`Forwarder._send_one` to deal with in its turn."""

    def __init__(self, store: Store, assoc: Association, items: list[ForwardItem],
                 buffers: tuple[bytearray, bytearray]) -> None:
        self.store = store
        self.assoc = assoc
        self.items = items
        self._buffers = buffers
        self._read: dict[int, FramedDataSet | Exception] = {}
        for done in buffers:  # the objects of the batch before are sent
            if len(done) > KEEP_BUFFER:
                del done[KEEP_BUFFER:]

    def _read_one(self, n: int) -> None:
        try:
            self._read[n] = self.assoc.read_stored(self.store.data_dir / str(self.items[n].path), self._buffers[n % 2])
        except (ValueError, OSError) as exc:
            self._read[n] = exc

    def take(self, n: int) -> FramedDataSet | Exception:
        """Object ``n`` as read (read now if it was not read ahead). The buffer of object
        ``n - 1``, sent by now, is cut back to KEEP_BUFFER if a large object grew it."""
        if n not in self._read:
            self._read_one(n)
        done = self._buffers[(n - 1) % 2]
        if n and len(done) > KEEP_BUFFER:
            del done[KEEP_BUFFER:]
        return self._read.pop(n)

    def next_after(self, n: int) -> Callable[[], None] | None:
        """What reads object ``n + 1`` (into the buffer ``n`` does not use), if there is one."""
        return (lambda: self._read_one(n + 1)) if n + 1 < len(self.items) else None


def _contexts(items: list[ForwardItem]) -> list[tuple[str, list[str]]]:
    """What one association proposes: each SOP class in each stored syntax and in Implicit
    VR LE, one context each, and Verification: a destination that refuses every storage
    context still associates, and each object is then set aside with the reason instead of
    the whole queue waiting."""
    pairs: dict[tuple[str, str], None] = {}
    for i in items:
        for ts in (str(i.transfer_syntax), str(TransferSyntax.IMPLICIT_LE)):
            pairs[(str(i.sop_class_uid), ts)] = None
    return [(cls, [ts]) for cls, ts in pairs] + [(str(SOPClass.VERIFICATION), [str(TransferSyntax.IMPLICIT_LE)])]


def _max_items(batch: list[ForwardItem]) -> int:
    """How many of ``batch`` fit one association's 128 presentation contexts (one per class
    and syntax, one per class in Implicit VR LE, and Verification)."""
    pairs: set[tuple[str, str]] = set()
    for n, i in enumerate(batch):
        pairs.update({(str(i.sop_class_uid), str(i.transfer_syntax)), (str(i.sop_class_uid), "implicit")})
        if len(pairs) > 127:
            return n
    return len(batch)


def forward_lines(store: Store) -> list[str]:
    """One line per destination for ``appliance queue ls --forward`` and status pages."""
    lines = []
    now = time.time()
    for s in store.index.forward_states():
        text = f"{s.destination}: {s.pending} waiting"
        if s.pending:
            text += f" ({s.pending_bytes / 1e6:.1f} MB"
            if s.oldest:
                age = datetime.now(timezone.utc) - datetime.fromisoformat(s.oldest)
                text += f", oldest {_age(age.total_seconds())}"
            text += ")"
        if s.set_aside:
            text += f", {s.set_aside} set aside (appliance queue ls --forward {s.destination})"
        text += f"; {s.sent} sent"
        if s.dropped:
            text += f", {s.dropped} dropped"
        if s.last_success:
            text += f"; last sent {s.last_success[:19].replace('T', ' ')} UTC"
        if s.last_error and (not s.last_success or (s.last_error_at or "") > s.last_success):
            text += f"; last error {str(s.last_error_at)[:19].replace('T', ' ')} UTC: {s.last_error}"
            if s.next_try > now:
                text += f" (next try in {s.next_try - now:.0f} s)"
        lines.append(text)
    return lines


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def problems(store: Store) -> list[str]:
    """What a person must know: destinations failing with objects waiting."""
    out = []
    for s in store.index.forward_states():
        failing = s.last_error and s.failures > 0 and s.pending
        if failing:
            out.append(f"forwarding to {s.destination} failing ({s.failures} tries): {s.last_error}; "
                       f"{s.pending} object(s) wait")
        if s.set_aside:
            out.append(f"forwarding to {s.destination}: {s.set_aside} object(s) set aside, refused for good; "
                       "see appliance queue ls --forward")
    return out


