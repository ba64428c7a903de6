"""Retention: keep the data partition below a high-water mark by deleting whole studies,
least recently received first, down to a low-water mark; optionally, studies older than a
maximum age.

Only studies that are *safe to delete* go: not protected, not being received or exported,
not waiting in the forwarding queue, and (unless the policy is ``unconditional``)
delivered: every object exported to a USB stick, sent to a remote SCP, or forwarded by the
``[[forward]]`` rules that matched it, after it was last received. Deleting is
:func:`appliance.store.deletion.delete_studies`: crash-safe, one deletion at a time.

The SCP runs retention every :data:`INTERVAL` seconds and, before it answers a C-STORE
with Out of Resources, once more to make room (:meth:`Retention.make_room`). Each run's
outcome is kept in ``DATA_DIR/retention.json`` for ``appliance status``, the console and
the supervisor's ``STATUS=``: above the high-water mark with nothing eligible, the box
says so, with why, before the free-space watermark starts refusing objects.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.config import RetentionConfig, RetentionPolicy, parse_mark
from appliance.errors import StoreError
from appliance.store.deletion import DeletionRefused, why_kept
from appliance.store.index import StudyUsage
from appliance.store.marks import busy_studies

if TYPE_CHECKING:
    from appliance.store.store import Store

log = logging.getLogger(__name__)

#: Seconds between two periodic runs in the SCP.
INTERVAL = 60.0
STATUS_FILE = "retention.json"


@dataclass(frozen=True)
class Disk:
    """The data partition: its size and the space in use (what unprivileged writers cannot use), in bytes."""

    total: int
    used: int

    @property
    def free(self) -> int:
        return self.total - self.used

    def percent(self, used: int | None = None) -> float:
        return 100.0 * (self.used if used is None else used) / self.total if self.total else 0.0


def disk(path: Path) -> Disk:
    u = shutil.disk_usage(path)
    return Disk(u.total, u.total - u.free)


@dataclass(frozen=True)
class Marks:
    """The high- and low-water marks, as bytes used on the data partition."""

    high: int
    low: int
    #: Why the configured marks were lowered (they were above the free-space watermark), or "".
    note: str = ""


def marks(cfg: RetentionConfig, d: Disk, min_free: int) -> Marks:
    """The marks of ``cfg`` on disk ``d``; lowered so that retention starts before the
    free-space watermark (``min_free`` bytes) refuses objects."""

    def used(text: str, what: str) -> int:
        value, unit = parse_mark(text, what)
        return int(d.total * value / 100) if unit == "%" else int(value)

    high, low = used(cfg.high_water, "high_water"), used(cfg.low_water, "low_water")
    ceiling = d.total - min_free - d.total // 20  # 5 % of the partition before refusals start
    note = ""
    if high > ceiling:
        gap = max(high - low, d.total // 20)
        note = (f"the high-water mark {cfg.high_water} is above the point where storing stops "
                f"({min_free / 1e6:.0f} MB free); retention uses {100 * ceiling / d.total:.0f}% instead")
        high = max(ceiling, 0)
        low = max(min(low, high - gap), 0)
    return Marks(high, low, note)


@dataclass
class RetentionReport:
    """What one run of retention did and saw."""

    at: str
    trigger: str
    enabled: bool
    total: int = 0
    used_before: int = 0
    used_after: int = 0
    high: int = 0
    low: int = 0
    #: (study UID, patient, last received, bytes, why it went)
    deleted: list[tuple[str, str, str, int, str]] = field(default_factory=list)
    bytes_freed: int = 0
    #: How many studies were kept, by reason ("not yet exported or sent": 12, ...).
    kept: dict[str, int] = field(default_factory=dict)
    #: "" when all is well, else what a person must do, in words.
    problem: str = ""
    note: str = ""

    def summary(self) -> str:
        """One line: what was deleted, or that nothing needed to be."""
        if not self.enabled:
            return "retention is off"
        pct = 100 * self.used_after / self.total if self.total else 0.0
        head = (f"deleted {len(self.deleted)} stud{'y' if len(self.deleted) == 1 else 'ies'} "
                f"({self.bytes_freed / 1e6:.1f} MB)" if self.deleted else "nothing to delete")
        return (f"{head}; disk {pct:.0f}% used (high-water {100 * self.high / self.total:.0f}%, "
                f"low-water {100 * self.low / self.total:.0f}%)" if self.total else head)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RetentionReport:
        d = dict(d)
        d["deleted"] = [tuple(x) for x in d.get("deleted", [])]
        return cls(**d)


def last_report(data_dir: Path) -> RetentionReport | None:
    """The last run's report, or None (never ran, or unreadable)."""
    try:
        return RetentionReport.from_dict(json.loads((data_dir / STATUS_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


_NOT_DELIVERED = "not yet exported or sent"
_FORWARDING = "waiting to be forwarded"


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Retention:
    """Retention for ``store`` under ``cfg``, refusing objects below ``min_free`` bytes free.
    Safe to share between threads: one run at a time."""

    def __init__(self, store: Store, cfg: RetentionConfig, min_free: int) -> None:
        self.store = store
        self.cfg = cfg
        self.min_free = min_free
        self._lock = threading.Lock()
        self._last_problem = ""

    def eligibility(self, usage: list[StudyUsage]) -> list[tuple[StudyUsage, str | None]]:
        """Each study (oldest first) with why it must be kept now, or None if it may go."""
        marks_ = self.store.marks.get()
        busy = busy_studies(self.store.data_dir)
        forwarding = self.store.index.forward_studies()
        out = []
        for u in usage:
            m = marks_.get(u.study_uid)
            why = why_kept(u, protected=bool(m and m.protected), busy=u.study_uid in busy,
                           quiet_seconds=self.cfg.quiet_minutes * 60)
            if why is None and u.study_uid in forwarding:
                why = _FORWARDING
            if why is None and self.cfg.policy is RetentionPolicy.DELIVERED and not (
                    m and m.delivered_at and m.delivered_at >= u.last_received):
                why = _NOT_DELIVERED
            out.append((u, why))
        return out

    def make_room(self, needed: int) -> bool:
        """Called before a C-STORE is refused for space: run retention now (if it is on) to
        free ``needed`` bytes above the watermark; True if something was deleted."""
        if not self.cfg.enabled:
            return False
        return bool(self.run("storing an object needed space", needed).deleted)

    def run(self, trigger: str = "periodic", needed: int = 0) -> RetentionReport:
        """Run once: delete what is due, record and return the report."""
        with self._lock:
            report = self._run(trigger, needed)
        self._record(report)
        return report

    def _run(self, trigger: str, needed: int) -> RetentionReport:
        report = RetentionReport(at=_now().isoformat(timespec="seconds"), trigger=trigger, enabled=self.cfg.enabled)
        if not self.cfg.enabled:
            return report
        d = disk(self.store.objects)
        m = marks(self.cfg, d, self.min_free)
        report.total, report.used_before, report.used_after = d.total, d.used, d.used
        report.high, report.low, report.note = m.high, m.low, m.note
        refusing_at = d.total - self.min_free - needed
        over = d.used > m.high or d.used > refusing_at
        to_free = max(d.used - m.low, d.used - refusing_at) if over else 0
        cutoff = (_now() - timedelta(days=self.cfg.max_age_days)).isoformat(timespec="milliseconds") \
            if self.cfg.max_age_days else ""
        freed = 0
        for u, why in self.eligibility(self.store.study_usage()):
            too_old = bool(cutoff) and u.last_received < cutoff
            if why is not None:
                key = why if why in (_NOT_DELIVERED, _FORWARDING) else _short(why)
                report.kept[key] = report.kept.get(key, 0) + 1
                continue
            if not too_old and freed >= to_free:
                continue
            reason = (f"older than {self.cfg.max_age_days} days" if too_old and freed >= to_free else
                      f"disk {d.percent():.0f}% used, above the high-water mark {self.cfg.high_water}"
                      if d.used > m.high else "storing needed space")
            try:
                r = self.store.delete_studies([u.study_uid], quiet_seconds=self.cfg.quiet_minutes * 60,
                                              reason=f"retention, {reason}",
                                              what=f"study {u.study_uid} of patient {u.patient_id or '(no ID)'}")
            except DeletionRefused as exc:
                report.kept[_short(str(exc))] = report.kept.get(_short(str(exc)), 0) + 1
                continue
            except StoreError as exc:
                report.problem = f"retention could not delete study {u.study_uid}: {exc}"
                log.error("%s", report.problem)
                break
            freed += r.bytes_freed
            report.deleted.append((u.study_uid, u.patient_id, u.last_received, r.bytes_freed, reason))
        report.bytes_freed = freed
        after = disk(self.store.objects)
        report.used_after = min(after.used, d.used - freed)
        if not report.problem and report.used_after > m.high:
            kept = ", ".join(f"{n} {why}" for why, n in sorted(report.kept.items(), key=lambda kv: -kv[1]))
            report.problem = (
                f"the data partition is {100 * report.used_after / d.total:.0f}% full, above the retention "
                f"high-water mark ({100 * m.high / d.total:.0f}%), and no more studies may be deleted"
                + (f" ({kept})" if kept else " (no studies are stored)")
                + f". Storing stops when less than {self.min_free / 1e6:.0f} MB is free: export or send "
                "studies, remove protections, or delete studies by hand")
        return report

    def _record(self, report: RetentionReport) -> None:
        if report.deleted:
            for uid, patient, last, size, why in report.deleted:
                log.info("retention deleted study %s of patient %s (last object %s UTC, %.1f MB): %s",
                         uid, patient or "(no ID)", last[:19].replace("T", " "), size / 1e6, why)
            log.info("retention: %s", report.summary())
        if report.problem and report.problem != self._last_problem:
            log.error("retention: %s", report.problem)
        elif not report.problem and self._last_problem:
            log.info("retention: the data partition is below the high-water mark again")
        self._last_problem = report.problem
        path = self.store.data_dir / STATUS_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(report.to_dict()))
            os.replace(tmp, path)
        except OSError as exc:  # a full disk: the log has it
            log.debug("cannot write %s: %s", path, exc.strerror)


def _short(why: str) -> str:
    """The reason of :func:`why_kept` without its particulars, for counting."""
    if "protected" in why:
        return "protected"
    if "export" in why:
        return "being exported"
    if "arriving" in why:
        return "still arriving"
    return why.split(":")[0][:60]


class RetentionWorker:
    """Runs retention every :data:`INTERVAL` seconds in a thread until :meth:`stop`."""

    def __init__(self, retention: Retention, interval: float = INTERVAL) -> None:
        self.retention = retention
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)

    def start(self) -> None:
        if self.retention.cfg.enabled:
            self._thread.start()
        else:
            self.retention.run("retention is off")  # replaces the report of an earlier, enabled run

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.retention.run()
            except Exception:  # noqa: BLE001 - a bug must not stop the SCP; the next run retries
                log.exception("retention run failed")
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
