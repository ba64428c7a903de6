"""The console's storage pages: delete a study, a series or a patient's studies; protect
studies from deletion and retention; the retention settings, state and a run now. The
wording follows ``appliance delete``, ``protect`` and ``retention``."""

from __future__ import annotations

import contextlib
import logging
import textwrap
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from appliance.errors import ApplianceError
from appliance.ops.console.screen import WIDTH, Screen
from appliance.ops.consolesettings import RETENTION_FIELDS, value_of

if TYPE_CHECKING:
    from appliance.config import Config
    from appliance.store.store import DeleteReport, Store, StudyUsage

#: Studies the pickers list (the latest received), as on the USB export page.
PICK_STUDIES = 9
#: Studies shown one by one before a deletion or protection; the rest are counted.
SHOW_STUDIES = 8
#: Protected studies the storage page lists.
SHOW_PROTECTED = 5
#: Studies a retention run lists as deleted; the rest are counted (the journal has them all).
SHOW_DELETED = 10
REASON = "asked on the serial console"


@contextlib.contextmanager
def _shown_here(name: str) -> Iterator[None]:
    """Keep logger ``name``'s warnings and errors off the terminal while the block runs: the
    console's stderr is the serial line, and the page says the same in words."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _studies(n: int) -> str:
    return f"{n} stud{'y' if n == 1 else 'ies'}"


def _patient(u: StudyUsage) -> str:
    name = u.patient_name.replace("^", " ").strip()
    return f"patient {u.patient_id or '(no ID)'}" + (f" {name}" if name else "")


class StoragePages(Screen):
    """Deleting, protecting and retention."""

    def studies(self) -> None:
        """The storage page: the disk, the protected studies, and deleting, protecting and retention."""
        from appliance.store.retention import disk
        from appliance.store.store import Store

        store = Store(self.data_dir)
        try:
            while True:
                cfg = self.settings.current()
                self.heading("Storage: delete, protect, retention")
                d = disk(store.objects)
                self.say(f"Data partition {d.percent():.0f}% used ({d.used / 1e9:.2f} of {d.total / 1e9:.2f} GB); "
                         f"{_studies(store.counts()['studies'])} stored. Retention is "
                         f"{'on' if cfg.retention.enabled else 'off'}.")
                self._show_protected(store)
                self.say("  1  Delete studies (one, or every study of a patient)")
                self.say("  2  Delete a series of a study")
                self.say("  3  Protect studies from deletion and retention, or lift it")
                self.say("  4  Retention: settings, state, run now")
                self.say("  0  Back")
                choice = self.ask("Choice: ").lower()
                if choice in ("0", "", "q", "b"):
                    return
                if choice == "1":
                    self._delete_studies(store, cfg)
                elif choice == "2":
                    self._delete_series(store, cfg)
                elif choice == "3":
                    self._protect(store)
                elif choice == "4":
                    self._retention(store)
                else:
                    self.say(f"'{choice}' is not on the menu.")
        finally:
            store.close(clean=False)

    # -- picking studies ----------------------------------------------------------------------

    def _show_protected(self, store: Store) -> None:
        uids = [m.study_uid for m in store.marks.get().values() if m.protected]
        usage = store.study_usage(uids)
        if not usage:
            self.say("No study is protected.")
            return
        self.say(f"Protected ({len(usage)}):")
        for u in usage[-SHOW_PROTECTED:][::-1]:
            self.say(f"  {u.study_date or '-':<8} {u.patient_id or '(no ID)':<16.16} {u.study_uid}"[:WIDTH])
        if len(usage) > SHOW_PROTECTED:
            self.say(f"  ... and {len(usage) - SHOW_PROTECTED} more")

    def _pick_studies(self, store: Store, *, patients: bool = True) -> tuple[list[StudyUsage], str]:
        """Ask for a study from the latest (by number or UID) or, with ``patients``, a
        Patient ID; return the studies and how to call them (no studies: nothing chosen)."""
        rows = store.recent_studies(PICK_STUDIES)
        if not rows:
            self.say("No study is stored.")
            return [], ""
        usage = {u.study_uid: u for u in store.study_usage([r.study_uid for r in rows])}
        protected = {uid for uid, m in store.marks.get(usage).items() if m.protected}
        self.say("Latest studies (date, patient ID, modalities, objects, MB, P: protected, UID):")
        for n, r in enumerate(rows, 1):
            u = usage.get(r.study_uid)
            pid, size = (u.patient_id or "(no ID)", u.bytes / 1e6) if u else ("", 0.0)
            self.say(f"  {n}  {r.study_date or '-':<8} {pid:<12.12} {r.modalities or '-':<8.8} {r.instances:>5} "
                     f"{size:>7.1f} {'P' if r.study_uid in protected else ' '} {r.study_uid}"[:WIDTH])
        text = self.ask("Number, or a study UID" + (", or p for a Patient ID" if patients else "") + ": ")
        if not text:
            return [], ""
        if patients and text.lower() == "p":
            pid = self.ask("Patient ID: ")
            if not pid:
                return [], ""
            uids = store.studies_of_patient(pid)
            if not uids:
                self.say(f"No stored study belongs to a patient with Patient ID '{pid}'.")
                return [], ""
            return store.study_usage(uids), f"patient {pid} ({_studies(len(uids))})"
        uid = rows[int(text) - 1].study_uid if text.isdigit() and 1 <= int(text) <= len(rows) else text
        found = store.study_usage([uid])
        if not found:
            self.say(f"{uid} is a series; choose 'Delete a series of a study' for it." if store.level_of(uid) ==
                     "series" else f"No stored study has UID {uid}; pick a number from the list or type a "
                     "stored study UID.")
            return [], ""
        return found, f"study {uid}"

    def _describe(self, store: Store, studies: list[StudyUsage]) -> None:
        """Each study (patient, date, objects, MB, protected) and the sum."""
        protected = {uid for uid, m in store.marks.get(u.study_uid for u in studies).items() if m.protected}
        for u in studies[:SHOW_STUDIES]:
            self.say(f"  study {u.study_uid}\n"
                     f"    {_patient(u)}, study date {u.study_date or '-'}: {u.instances} object(s), {_mb(u.bytes)}"
                     + (", protected" if u.study_uid in protected else ""))
        if len(studies) > SHOW_STUDIES:
            self.say(f"  ... and {len(studies) - SHOW_STUDIES} more")
        if len(studies) > 1:
            self.say(f"In all: {_studies(len(studies))}, {sum(u.instances for u in studies)} object(s), "
                     f"{_mb(sum(u.bytes for u in studies))}.")

    # -- deleting -----------------------------------------------------------------------------

    def _confirmed(self) -> bool:
        if self.ask("Type yes to delete: ").lower() == "yes":
            return True
        self.say("Nothing deleted: deleting needs the answer 'yes'.")
        return False

    def _delete_studies(self, store: Store, cfg: Config) -> None:
        studies, what = self._pick_studies(store)
        if not studies:
            return
        self.say(f"Delete {what}:" if len(studies) > 1 or what.startswith("patient") else "Delete:")
        self._describe(store, studies)
        if not self._confirmed():
            return
        self._deleting(lambda: store.delete_studies([u.study_uid for u in studies], what=what,
                                                    quiet_seconds=cfg.retention.quiet_minutes * 60, reason=REASON))

    def _delete_series(self, store: Store, cfg: Config) -> None:
        studies, _what = self._pick_studies(store, patients=False)
        if not studies:
            return
        study = studies[0]
        series = [s for uid in store.series_in_study(study.study_uid) if (s := store.series(uid)) is not None]
        self.say(f"Series of study {study.study_uid} ({_patient(study)}, study date {study.study_date or '-'}):")
        for n, s in enumerate(series, 1):
            number = "-" if s.series_number is None else s.series_number
            self.say(f"  {n:<2} {s.modality or '-':<8} number {number!s:<5} {s.instances:>5} object(s)  "
                     f"{s.series_uid}"[:WIDTH])
        uid = self._pick([s.series_uid for s in series], "Series (number or UID): ")
        if uid is None:
            return
        s = next(s for s in series if s.series_uid == uid)
        size = sum(r.size for r in store.ordered_instances(uid))
        self.say(f"Delete series {uid}:\n  {s.modality or '-'} series {s.series_number or '-'} of {_patient(study)}, "
                 f"study date {study.study_date or '-'}: {s.instances} object(s), {_mb(size)}")
        if not self._confirmed():
            return
        self._deleting(lambda: store.delete_series([uid], quiet_seconds=cfg.retention.quiet_minutes * 60,
                                                   reason=REASON))

    def _deleting(self, delete: Callable[[], DeleteReport]) -> None:
        """Run ``delete`` and show its report, or why nothing was deleted, in words."""
        from appliance.store.store import DeletionRefused

        try:
            report = delete()
        except DeletionRefused as exc:
            text = str(exc)
            self.say(text[:1].upper() + text[1:])
        except ApplianceError as exc:
            self.say(f"Deleting failed: {exc}")
        else:
            for line in report.render().splitlines():
                self.say(line[:1].upper() + line[1:])
        self.pause()

    # -- protecting ---------------------------------------------------------------------------

    def _protect(self, store: Store) -> None:
        """Protect the chosen studies from deletion and retention, or lift their protection."""
        studies, what = self._pick_studies(store)
        if not studies:
            return
        if what.startswith("patient"):
            self.say(f"The studies of {what}:")
        self._describe(store, studies)
        answer = self.ask("p protects, u lifts the protection, Enter leaves it as it is: ")
        if answer.lower() not in ("p", "u"):
            self.say("Unchanged.")
            return
        on = answer.lower() == "p"
        store.marks.protect([u.study_uid for u in studies], on)
        self.say(f"{what}: {'protected from deletion and retention' if on else 'no longer protected'}")

    # -- retention ----------------------------------------------------------------------------

    def _retention(self, store: Store) -> None:
        """The [retention] fields (checked and saved like every field), its state and a run now."""
        while True:
            cfg = self.settings.current()
            self.heading("Retention")
            self._retention_state(store, cfg)
            self._show_fields(cfg, RETENTION_FIELDS)
            self.say("  m  Both marks at once (% or GB)    l  Studies: may go, or why kept")
            self.say(("  r  Run retention now              " if cfg.retention.enabled else "") + "  0  Back")
            choice = self.ask("Choice: ").lower()
            if choice in ("0", "", "q", "b"):
                return
            if choice.isdigit() and 1 <= int(choice) <= len(RETENTION_FIELDS):
                f = RETENTION_FIELDS[int(choice) - 1]
                self.edit(f, value_of(cfg, f.key))
            elif choice == "m":
                self._edit_marks(cfg)
            elif choice == "l":
                self._eligibility(store, cfg)
            elif choice == "r":
                self._run_retention(store, cfg)
            else:
                self.say(f"'{choice}' is not on the menu.")

    def _retention_state(self, store: Store, cfg: Config) -> None:
        from appliance.store.retention import disk, last_report, marks

        r, min_free = cfg.retention, cfg.store.min_free_mb * 2**20
        d = disk(store.objects)
        m = marks(r, d, min_free)
        where = (f"starts at {d.percent(m.high):.0f}%, stops at {d.percent(m.low):.0f}%" if r.enabled else
                 f"would start at {d.percent(m.high):.0f}% and stop at {d.percent(m.low):.0f}%")
        self.say(f"Disk {d.percent():.0f}% used ({d.used / 1e9:.2f} of {d.total / 1e9:.2f} GB); retention "
                 f"{where}; storing stops below {min_free / 1e6:.0f} MB free.")
        if m.note:
            self.say(f"Note: {m.note}")
        last = last_report(self.data_dir)
        if last is not None:
            self.say(f"Last run {last.at[:16].replace('T', ' ')} UTC ({last.trigger}): {last.summary()}")
            if last.problem:
                self.say(f"PROBLEM: {last.problem}")

    def _edit_marks(self, cfg: Config) -> None:
        changes: dict[str, str | None] = {}
        for f in RETENTION_FIELDS[1:3]:
            text = self.ask(f"New {f.label} (Enter keeps {f.show(value_of(cfg, f.key))}): ")
            if text:
                changes[f.key] = f.parse(text)
        if not changes:
            self.say("Unchanged.")
            return
        self.check_and_save(changes)

    def _eligibility(self, store: Store, cfg: Config) -> None:
        from appliance.store.retention import Retention

        retention = Retention(store, cfg.retention, cfg.store.min_free_mb * 2**20)
        lines = ["Studies, oldest first: last object (UTC), patient ID, MB, study UID:"]
        for u, why in retention.eligibility(store.study_usage()):
            lines.append(f"  {u.last_received[:16].replace('T', ' ')} {u.patient_id or '(no ID)':<12.12} "
                         f"{u.bytes / 1e6:>7.1f} {u.study_uid}"[:WIDTH])
            lines += textwrap.wrap(f"kept: {why}" if why else "may be deleted", WIDTH,
                                   initial_indent="    ", subsequent_indent="      ")
        if len(lines) == 1:
            lines = ["No study is stored."]
        self._page(lines)

    def _run_retention(self, store: Store, cfg: Config) -> None:
        from appliance.store.retention import Retention

        if not cfg.retention.enabled:
            self.say("Retention is off; turn it on first (field 1).")
            return
        self.say("Running retention...")
        try:
            with _shown_here("appliance.store.retention"):
                report = Retention(store, cfg.retention, cfg.store.min_free_mb * 2**20).run(REASON)
        except ApplianceError as exc:
            self.say(f"Retention failed: {exc}")
            return
        for uid, patient, last, size, why in report.deleted[:SHOW_DELETED]:
            self.say(f"Deleted study {uid}\n  patient {patient or '(no ID)'}, last object "
                     f"{last[:16].replace('T', ' ')} UTC, {_mb(size)}: {why}")
        if len(report.deleted) > SHOW_DELETED:
            self.say(f"... and {len(report.deleted) - SHOW_DELETED} more (the Log screen lists them)")
        self.say(f"Retention: {report.summary()}")
        if report.problem:
            self.say(f"PROBLEM: {report.problem}")
        self.pause()
