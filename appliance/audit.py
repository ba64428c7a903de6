"""The audit trail: who sent, took, deleted or changed what, as JSON lines on the data partition.

One event per line in ``DATA_DIR/audit/audit.jsonl``, appended with ``O_APPEND`` (one
``write`` per event, so processes writing at once never interleave within a line), rotated
at :data:`MAX_BYTES` into ``audit.jsonl.1`` ... ``.N`` (:data:`KEEP` files). The fields follow
the DICOM audit message schema (PS3.15 A.5, IHE ATNA), flattened for reading with ``jq``:

``time``                 when (ISO 8601, UTC)
``event``                the DICOM EventID's meaning, e.g. "DICOM Instances Transferred"
``event_code``           its code (DCM), e.g. "110104"
``action``               C(reate) R(ead) U(pdate) D(elete) E(xecute)
``outcome``              0 success, 4 minor failure, 8 serious failure, 12 major failure
``outcome_text``         what happened, in words, when not plain success
``participants``         who: ``{"ae", "address", "user", "role", "requestor"}`` (role: "source",
                         "destination", "application")
``studies``              what: ``{"study_uid", "objects"}`` per study (participant objects)
``detail``               anything else a reader needs, in words

Writing the trail never stops what it records: a failure to write is logged once (the
journal then has it) and the appliance goes on.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

#: Size at which the trail is rotated, and how many old files are kept.
MAX_BYTES = 10 * 2**20
KEEP = 10
FOLDER = "audit"
NAME = "audit.jsonl"

#: DICOM EventIDs (PS3.16 CID 400 Audit Event ID): (code, meaning).
EVENTS: dict[str, tuple[str, str]] = {
    "transfer": ("110104", "DICOM Instances Transferred"),
    "export": ("110106", "Export"),
    "import": ("110107", "Import"),
    "deleted": ("110105", "DICOM Study Deleted"),
    "association": ("110129", "Network Entry"),  # an association opened or refused
    "config": ("110127", "Application Activity"),  # a configuration change (event type: config)
    "login": ("110114", "User Authentication"),
    "security": ("110113", "Security Alert"),
}

SUCCESS, MINOR, SERIOUS, MAJOR = 0, 4, 8, 12

_lock = threading.Lock()
_warned = False


@dataclass(frozen=True)
class Participant:
    """Who took part: an AE at an address, or a person at the console, or the appliance itself."""

    role: str  # "source", "destination", "application", "person"
    ae: str = ""
    address: str = ""
    user: str = ""
    requestor: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in (("role", self.role), ("ae", self.ae), ("address", self.address),
                                  ("user", self.user), ("requestor", self.requestor)) if v}


@dataclass(frozen=True)
class Event:
    """One audit event (see the module's description for the fields)."""

    kind: str  # a key of EVENTS
    action: str
    outcome: int = SUCCESS
    outcome_text: str = ""
    participants: tuple[Participant, ...] = ()
    studies: tuple[tuple[str, int], ...] = ()
    detail: str = ""
    time: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds"))

    def to_dict(self) -> dict[str, Any]:
        code, meaning = EVENTS[self.kind]
        d: dict[str, Any] = {"time": self.time, "event": meaning, "event_code": code, "action": self.action,
                             "outcome": self.outcome}
        if self.outcome_text:
            d["outcome_text"] = self.outcome_text
        if self.participants:
            d["participants"] = [p.to_dict() for p in self.participants]
        if self.studies:
            d["studies"] = [{"study_uid": uid, "objects": n} for uid, n in self.studies]
        if self.detail:
            d["detail"] = self.detail
        return d


def studies_of(pairs: Iterable[tuple[str, str]]) -> tuple[tuple[str, int], ...]:
    """Count (study UID, anything) pairs per study, e.g. (study, SOP Instance UID) of objects sent."""
    counts: dict[str, int] = {}
    for study, _ in pairs:
        counts[study] = counts.get(study, 0) + 1
    return tuple(sorted(counts.items()))


def shell_user() -> str:
    """Who runs this process, as the trail names a person at a shell (a user name, or the uid)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def config_changed(data_dir: Path, what: str, by: Participant) -> None:
    """Record a configuration change ``what`` ("scp.port = 11113"), made by ``by``; the
    value of a key named like a secret (password, secret, private) is not written."""
    if any(word in what.lower() for word in ("password", "secret", "private")):
        what = what.split("=")[0] + "= (not recorded)"
    record(data_dir, Event("config", "U", participants=(by,), detail=f"configuration changed: {what[:2000]}"))


def record(data_dir: Path, event: Event, *, max_bytes: int = MAX_BYTES) -> None:
    """Append ``event`` to the trail under ``data_dir`` (never raises); the file is rotated
    once it holds ``max_bytes``."""
    global _warned
    line = (json.dumps(event.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    folder = data_dir / FOLDER
    try:
        with _lock:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / NAME
            _rotate_if_full(folder, path, max_bytes)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
    except OSError as exc:
        if not _warned:
            _warned = True
            log.error("cannot write the audit trail in %s (%s); events are logged here instead", folder,
                      exc.strerror)
        log.warning("audit: %s", line.decode().strip())


def _rotate_if_full(folder: Path, path: Path, max_bytes: int) -> None:
    try:
        if path.stat().st_size < max_bytes:
            return
    except FileNotFoundError:
        return
    with _folder_lock(folder):
        try:
            if path.stat().st_size < max_bytes:
                return  # another process rotated it meanwhile
        except FileNotFoundError:
            return
        for n in range(KEEP - 1, 0, -1):
            older = folder / f"{NAME}.{n}"
            if older.exists():
                os.replace(older, folder / f"{NAME}.{n + 1}")
        (folder / f"{NAME}.{KEEP}").unlink(missing_ok=True)
        os.replace(path, folder / f"{NAME}.1")


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    fd = os.open(folder / ".rotate.lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read(data_dir: Path, limit: int = 100) -> list[dict[str, Any]]:
    """The last ``limit`` events, oldest first (from the current file and the rotated ones)."""
    folder = data_dir / FOLDER
    files = [folder / NAME] + [folder / f"{NAME}.{n}" for n in range(1, KEEP + 1)]
    out: list[dict[str, Any]] = []
    for path in files:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        events = []
        for line in lines:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        out = events + out
        if len(out) >= limit:
            break
    return out[-limit:]


def line(e: dict[str, Any]) -> str:
    """One event in words, for the console and ``appliance audit``."""
    who = ", ".join(
        " ".join(x for x in (p.get("role", ""), p.get("ae", ""), f"at {p['address']}" if p.get("address") else "",
                             p.get("user", "")) if x) for p in e.get("participants", []))
    what = ", ".join(f"study {s['study_uid']} ({s['objects']})" for s in e.get("studies", [])[:3])
    if len(e.get("studies", [])) > 3:
        what += f" and {len(e['studies']) - 3} more"
    outcome = "" if e.get("outcome", 0) == 0 else f" FAILED({e.get('outcome')}): {e.get('outcome_text', '')}"
    parts = [e.get("time", "")[:19].replace("T", " "), e.get("event", "?"), e.get("action", "")]
    return " ".join(parts) + (f"; {who}" if who else "") + (f"; {what}" if what else "") + \
        (f"; {e['detail']}" if e.get("detail") else "") + outcome
