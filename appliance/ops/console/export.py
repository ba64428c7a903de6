"""The console's Send page (statement 2.3: "selecting one or more objects and the corresponding
image series to be exported"): pick a study from what is stored (latest first, in pages,
filtered by patient, modality and date), see each series' 3D verdict and what the sender's
plan sends and refuses (:func:`appliance.net.sender.plan_send`), choose a configured
destination, confirm, and watch the send, which runs as a job of its own
(:mod:`appliance.jobs.sendjob`) and goes on when the person goes back to the menu."""

from __future__ import annotations

import re
import select
import textwrap
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.conformance import CLIENT_AE_TITLE, RT_OBJECTS
from appliance.errors import ApplianceError
from appliance.jobs import sendjob
from appliance.ops.console.screen import WIDTH, Quit, Screen
from appliance.reports import sop_class_label

if TYPE_CHECKING:
    from appliance.net.sender import SendPlan
    from appliance.store.index import InstanceRow, SeriesSummary, StudySummary
    from appliance.store.store import Store

#: Studies on one page of the list.
STUDIES_PER_PAGE = 10
#: Series lines shown before "Enter for more".
SERIES_LINES = 14
#: Image series and refusals the plan lists one by one; the rest are counted.
SHOW_PLANNED = 6
#: How often the send's status file is read while the person watches, in seconds.
POLL_S = 0.5
#: A progress line at most this often (a new state, a failure or the end at once).
PROGRESS_EVERY_S = 2.0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _name(patient_name: str) -> str:
    return patient_name.replace("^", " ").strip()


# -- the filter ---------------------------------------------------------------------------------


def date_range(text: str) -> tuple[str, str]:
    """The first and last YYYYMMDD of ``text``: a day (20261128), month (202611) or year (2026),
    or a range of them FROM-TO (either side may be left open). Raise ValueError saying what is allowed."""
    allowed = "give YYYYMMDD, YYYYMM or YYYY, or a range such as 20260101-20261231"
    parts = text.replace(" ", "").split("-")
    if len(parts) > 2 or not any(parts):
        raise ValueError(f"'{text}' is not a date; {allowed}")
    bounds: list[str] = []
    for i, part in enumerate(parts if len(parts) == 2 else parts * 2):
        if not part:
            bounds.append("00000000" if i == 0 else "99999999")
            continue
        if not part.isdigit() or len(part) not in (4, 6, 8):
            raise ValueError(f"'{part}' is not a date; {allowed}")
        try:
            datetime.strptime(part, {4: "%Y", 6: "%Y%m", 8: "%Y%m%d"}[len(part)])
        except ValueError:
            raise ValueError(f"'{part}' is not a date of the calendar; {allowed}") from None
        bounds.append(part.ljust(8, "0") if i == 0 else part.ljust(8, "9"))
    if bounds[0] > bounds[1]:
        raise ValueError(f"'{text}' ends before it starts; {allowed}")
    return bounds[0], bounds[1]


@dataclass(frozen=True)
class StudyFilter:
    """What the study list shows: part of a patient's name or ID, a modality, a study date range."""

    patient: str = ""
    modality: str = ""
    dates: str = ""

    def matches(self, s: StudySummary, modalities: set[str]) -> bool:
        if self.patient:
            needle = self.patient.lower()
            if needle not in s.patient_id.lower() and needle not in _name(s.patient_name).lower() \
                    and needle not in s.patient_name.lower():
                return False
        if self.modality and self.modality.upper() not in modalities:
            return False
        if self.dates:
            lo, hi = date_range(self.dates)
            if not s.study_date or not lo <= s.study_date[:8] <= hi:
                return False
        return True

    def __str__(self) -> str:
        parts = ([f"patient '{self.patient}'"] if self.patient else []) + \
                ([f"modality {self.modality.upper()}"] if self.modality else []) + \
                ([f"study date {self.dates}"] if self.dates else [])
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class _Study:
    """One line of the study list."""

    summary: StudySummary
    modalities: tuple[str, ...]
    bytes: int


def _studies(store: Store, flt: StudyFilter) -> list[_Study]:
    """The stored studies ``flt`` lets through, the latest received first."""
    mods: dict[str, set[str]] = {}
    for s in store.series_listing():
        if s.modality:
            mods.setdefault(s.study_uid, set()).add(s.modality.upper())
    size = {u.study_uid: u.bytes for u in store.study_usage()}
    rows = sorted(store.study_listing(), key=lambda s: (s.last_received, s.study_uid), reverse=True)
    return [_Study(s, tuple(sorted(mods.get(s.study_uid, ()))), size.get(s.study_uid, 0))
            for s in rows if flt.matches(s, mods.get(s.study_uid, set()))]


def _numbers(text: str, count: int) -> list[int] | None:
    """``"1,3"``, ``"1 3"`` or ``"2-4"`` as 1-based numbers up to ``count``; None if it is not that."""
    out: list[int] = []
    for part in re.split(r"[,\s]+", text.strip()):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            return None
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not 1 <= lo <= hi <= count:
            return None
        out += [n for n in range(lo, hi + 1) if n not in out]
    return out or None


def _groups(plan: SendPlan) -> dict[str, list[InstanceRow]]:
    """Each image series the plan sends, with the RT objects sent right after it (they go with it)."""
    groups: dict[str, list[InstanceRow]] = {uid: [] for uid in plan.series}
    current = ""
    for o in plan.objects:
        if o.series_uid in groups:
            current = o.series_uid
        elif current:
            groups[current].append(o)
    return groups


def _with_rt(rt: list[InstanceRow]) -> str:
    """``", with RT Structure Set (1)"``, or "" without RT objects."""
    count = Counter(sop_class_label(o.sop_class_uid).removesuffix(" Storage") for o in rt)
    return (", with " + ", ".join(f"{k} ({v})" for k, v in sorted(count.items()))) if count else ""


def _rt_only(store: Store, series_uid: str) -> bool:
    """Whether a series holds RT objects only (they have no 3D verdict: they go with an image series)."""
    classes = {r.sop_class_uid for r in store.instances(series_uid)}
    return bool(classes) and classes <= RT_OBJECTS


def _why_not(store: Store, plan: SendPlan, s: SeriesSummary) -> str:
    """Why the study's plan leaves series ``s`` out, in the sender's words."""
    from appliance.net.sender import plan_send

    prefix = f"series {s.series_uid} "
    for r in plan.refused:
        if r.reason.startswith(prefix):
            return r.reason[len(prefix):]
    if _rt_only(store, s.series_uid):
        # RT objects travel with their image series: ask the sender about this series alone.
        alone = plan_send(store, series=[s.series_uid])
        if alone.refused:
            return "; ".join(r.reason if r.reason.startswith("its ") else f"the image series it references {r.reason}"
                             for r in alone.refused)
        return "RT objects go only with their image series, and none of it is sent"
    return "the sender's plan leaves it out"


class ExportPages(Screen):
    """Sending studies and series to a configured destination."""

    def export(self) -> None:
        """The Send page: the study list, then a study's series, the plan, the destination, the send."""
        from appliance.store.store import Store

        cfg = self.settings.current()
        store = Store(self.data_dir, slice_tolerance_mm=cfg.store.slice_tolerance_mm)
        flt, page = StudyFilter(), 0
        try:
            while True:
                studies = _studies(store, flt)
                pages = max(1, -(-len(studies) // STUDIES_PER_PAGE))
                page = min(page, pages - 1)
                self.heading("Send to a destination")
                self._send_state()
                self._study_list(studies, page, pages, flt)
                text = self.ask("Study (number or UID), or a letter: ")
                low = text.lower()
                if low in ("0", "", "q", "b"):
                    return
                if low == "n":
                    page = page + 1 if page + 1 < pages else page
                elif low == "p":
                    page = max(page - 1, 0)
                elif low == "f":
                    flt, page = self._ask_filter(flt), 0
                elif low == "c":
                    flt, page = StudyFilter(), 0
                elif low == "w":
                    jobs = sendjob.job_files(self.data_dir)
                    if not jobs:
                        self.say("No send was started from this box's console yet.")
                    elif self._watch(jobs[0]):
                        return
                else:
                    uid = self._study_uid(store, text, studies)
                    if uid is not None and self._study(store, uid):
                        return
        finally:
            store.close(clean=False)

    # -- the study list -----------------------------------------------------------------------

    def _send_state(self) -> None:
        """The send running now, else the last send's result."""
        now = sendjob.running(self.data_dir)
        for s in now:
            self.say(f"Now: {s.line()}")
        if not now:
            last = sendjob.last_result(self.data_dir)
            self.say("Last send: " + ("none yet" if last is None else
                                      f"{'OK' if last.ok else 'FAILED'} {last.finished_at} {last.device}: "
                                      f"{last.summary}"))

    def _study_list(self, studies: list[_Study], page: int, pages: int, flt: StudyFilter) -> None:
        self.say(f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'}, latest received first. "
                 f"Filter: {flt}.")
        if studies:
            self.say(f"  {'No':>3} {'Date':<8} {'Patient ID':<12} {'Patient name':<18} {'Modalities':<11} "
                     f"{'Ser':>3} {'Obj':>5} {'MB':>7}")
        first = page * STUDIES_PER_PAGE
        for n, st in enumerate(studies[first:first + STUDIES_PER_PAGE], first + 1):
            s = st.summary
            self.say(f"  {n:>3} {s.study_date or '-':<8.8} {s.patient_id or '(no ID)':<12.12} "
                     f"{_name(s.patient_name) or '-':<18.18} {','.join(st.modalities) or '-':<11.11} "
                     f"{s.series:>3} {s.instances:>5} {st.bytes / 1e6:>7.1f}"[:WIDTH])
        more = f"Page {page + 1} of {pages}: n next, p previous.  " if pages > 1 else ""
        self.say(f"{more}f filter, c clear it, w watch the last send, 0 back")

    def _ask_filter(self, flt: StudyFilter) -> StudyFilter:
        self.say("Filter the studies; Enter leaves a line open, '-' clears it.")
        patient = self.ask(f"Patient name or ID, or part of it (now: {flt.patient or 'any'}): ")
        modality = self.ask(f"Modality, e.g. CT, MR, PT, RTSTRUCT (now: {flt.modality.upper() or 'any'}): ")
        dates = self.ask(f"Study date YYYYMMDD, YYYYMM, YYYY or FROM-TO (now: {flt.dates or 'any'}): ")

        def pick(new: str, old: str) -> str:
            return "" if new == "-" else (new or old)

        new = StudyFilter(pick(patient, flt.patient), pick(modality, flt.modality), pick(dates, flt.dates))
        if new.dates:
            try:
                date_range(new.dates)
            except ValueError as exc:
                self.say(f"Date not used: {exc}.")
                new = StudyFilter(new.patient, new.modality, flt.dates)
        return new

    def _study_uid(self, store: Store, text: str, studies: list[_Study]) -> str | None:
        """The study ``text`` names: its number on the list, its UID, or the UID of one of its series."""
        if text.isdigit():
            if 1 <= int(text) <= len(studies):
                return studies[int(text) - 1].summary.study_uid
            self.say(f"'{text}' is not on the list; give a number from 1 to {len(studies)}, or a UID."
                     if studies else "No study is on the list; change the filter (f) or clear it (c).")
            return None
        level = store.level_of(text)
        if level == "study":
            return text
        if level == "series":
            row = store.series(text)
            if row is not None:
                return row.study_uid
        self.say(f"'{text}' is not on the menu, and no stored study or series has that UID.")
        return None

    # -- a study's series ---------------------------------------------------------------------

    def _study(self, store: Store, study_uid: str) -> bool:
        """A study's series, their 3D verdicts and what the plan sends; then a send. Return True
        when a send was left running (the person goes back to the main menu)."""
        from appliance.net.sender import plan_send

        while True:
            plan = plan_send(store, studies=[study_uid])  # also brings the 3D verdicts up to date
            series = [s for uid in store.series_in_study(study_uid) if (s := store.series(uid)) is not None]
            usage = store.study_usage([study_uid])
            if not series or not usage:
                self.say(f"Study {study_uid} is no longer stored.")
                return False
            u = usage[0]
            self.heading(f"Study {study_uid}")
            self.say(f"Patient {u.patient_id or '(no ID)'} {_name(u.patient_name)}, study date {u.study_date or '-'}; "
                     f"{len(series)} series, {u.instances} object(s), {_mb(u.bytes)}.")
            self._page_lines(self._series_lines(store, plan, series))
            whole = (f"{len(plan.objects)} object(s), {_mb(sum(o.size for o in plan.objects))}"
                     if plan.objects else "nothing of it can be sent")
            self.say(f"  a  Send the whole study: {whole}\n"
                     "  1,3 or 2-4  Send these series only           0  Back")
            text = self.ask("Send what: ")
            if text.lower() in ("0", "", "q", "b"):
                return False
            if text.lower() == "a":
                chosen: tuple[list[str], list[str]] = ([study_uid], [])
            else:
                numbers = _numbers(text, len(series))
                uids = [series[n - 1].series_uid for n in numbers] if numbers else \
                    [text] if any(s.series_uid == text for s in series) else []
                if not uids:
                    self.say(f"'{text}' is not a series of this study; give numbers from 1 to {len(series)} "
                             "(e.g. 1,3 or 2-4), a series UID, or a for the whole study.")
                    continue
                chosen = ([], uids)
                plan = plan_send(store, series=uids)
            if self._offer(plan, *chosen):
                return True

    def _series_lines(self, store: Store, plan: SendPlan, series: list[SeriesSummary]) -> list[str]:
        """One line (wrapped) per series: modality, number, objects, the store's 3D verdict and what is sent."""
        number = {s.series_uid: n for n, s in enumerate(series, 1)}
        groups = _groups(plan)
        goes_with = {o.series_uid: image for image, rt in groups.items() for o in rt}
        lines = [f"  {'No':>3} {'Modality':<9} {'Ser.no':>6} {'Obj':>5}  {'3D':<4} What is sent"]
        indent = " " * 36
        for s in series:
            if s.series_uid in groups:
                what = "sent" + _with_rt(groups[s.series_uid])
            elif s.series_uid in goes_with:
                what = f"sent with series {number.get(goes_with[s.series_uid], '?')}"
            else:
                what = "not sent: " + _why_not(store, plan, s)
            volume = "-" if _rt_only(store, s.series_uid) else {True: "yes", False: "no", None: "?"}[s.volume_ok]
            head = (f"  {number[s.series_uid]:>3} {s.modality or '-':<9.9} "
                    f"{'-' if s.series_number is None else s.series_number!s:>6.6} {s.instances:>5}  {volume:<4} ")
            wrapped = textwrap.wrap(what, WIDTH - len(indent)) or [""]
            lines.append(head + wrapped[0])
            lines += [indent + w for w in wrapped[1:]]
        return lines

    def _page_lines(self, lines: list[str]) -> None:
        """Show ``lines``, :data:`SERIES_LINES` at a time."""
        for start in range(0, len(lines), SERIES_LINES):
            for line in lines[start:start + SERIES_LINES]:
                self.out.write(line[:WIDTH] + "\n")
            if start + SERIES_LINES < len(lines):
                if self.ask("Enter for more, q to stop: ").lower() == "q":
                    break
        self.out.flush()

    # -- the plan, the destination, the send --------------------------------------------------

    def _offer(self, plan: SendPlan, studies: Sequence[str], series: Sequence[str]) -> bool:
        """Show ``plan``; on a destination and a yes, start the send and watch it. Return True
        when the send was left running."""
        self.heading("Send")
        if not plan.objects:
            self.say("Nothing of this can be sent:")
            for r in plan.refused:
                self.say(f"  {r}")
            self.pause()
            return False
        size = _mb(sum(o.size for o in plan.objects))
        self.say(f"The plan: {len(plan.objects)} object(s), {size}, over one association as {CLIENT_AE_TITLE}, "
                 "Implicit VR Little Endian:")
        groups = _groups(plan)
        for uid in plan.series[:SHOW_PLANNED]:
            images = [o for o in plan.objects if o.series_uid == uid]
            label = sop_class_label(images[0].sop_class_uid).removesuffix(" Storage") if images else "image"
            self.say(f"  {len(images)} {label} object(s){_with_rt(groups.get(uid, []))}: series {uid}")
        if len(plan.series) > SHOW_PLANNED:
            self.say(f"  ... and {len(plan.series) - SHOW_PLANNED} more series")
        if plan.refused:
            self.say("Not sent:")
            for r in plan.refused[:SHOW_PLANNED]:
                self.say(f"  {r}")
            if len(plan.refused) > SHOW_PLANNED:
                self.say(f"  ... and {len(plan.refused) - SHOW_PLANNED} more")
        dests = self.settings.current().destinations
        if not dests:
            self.say("No destination is configured: add one on page 3 (Export destinations) first.")
            self.pause()
            return False
        names = sorted(dests)
        self.say("Destinations:")
        for n, each in enumerate(names, 1):
            d = dests[each]
            self.say(f"  {n:<2} {each:<16} {d.ae_title:<17} {d.host}:{d.port}"[:WIDTH])
        name = self._pick(names, "Send to (number or name; Enter cancels): ")
        if name is None:
            self.say("Nothing sent.")
            return False
        d = dests[name]
        self.say(f"Send {len(plan.objects)} object(s), {size}, to {name} ({d.ae_title} at {d.host}:{d.port}).")
        if not self.confirm("Start the send now?"):
            self.say("Nothing sent.")
            return False
        cfile = self.settings.cfile
        try:
            path = sendjob.start(self.data_dir, name, config_path=cfile.path if cfile.explicit else None,
                                 studies=studies, series=series)
        except OSError as exc:
            raise ApplianceError(f"cannot start the send: {exc.strerror or exc}") from exc
        return self._watch(path, refusals_shown=True)

    def _watch(self, path: Path, *, refusals_shown: bool = False) -> bool:
        """Show the send's progress (and its refusals, unless ``refusals_shown``) until it ends
        (then its result) or the person presses Enter (the send goes on). Return True when it
        was left running."""
        status = sendjob.read(path)
        if status is None:
            self.say("That send left no status file.")
            return False
        self.say(f"Sending to {status.to}. Press Enter to go back to the menu: the send goes on, and Status (1) "
                 "shows it.")
        shown, refusals, failures, last = "", refusals_shown, 0, 0.0
        while True:
            status = sendjob.read(path) or status
            status = sendjob.settled(status)
            if status.refused and not refusals:
                refusals = True
                self.say(f"Refused, not sent ({len(status.refused)}):")
                for r in status.refused[:SHOW_PLANNED]:
                    self.say(f"  {r}")
            for f in status.failures[failures:]:
                self.say(f"  {f}")
            failures = len(status.failures)
            line = self._progress(status)
            now = time.monotonic()
            if line != shown and (status.finished or now - last >= PROGRESS_EVERY_S
                                  or line.split(":")[0] != shown.split(":")[0]):
                self.say(f"  {line}")
                shown, last = line, now
            if status.finished:
                self._result(status)
                self.pause()
                return False
            if self._line_within(POLL_S) is not None:
                self.say(f"The send to {status.to} goes on; Status (1) shows how far it is.")
                return True

    @staticmethod
    def _progress(s: sendjob.SendStatus) -> str:
        where = s.peer or s.to
        if s.state in (sendjob.JobState.STARTING, sendjob.JobState.PLANNING):
            return "preparing: working out what to send"
        if s.state is sendjob.JobState.WAITING:
            return f"waiting: another send is running (one association at a time); {s.total} object(s) to send"
        if s.state is sendjob.JobState.CONNECTING:
            return f"connecting: to {where}"
        return f"sending: {s.progress()}"

    def _result(self, s: sendjob.SendStatus) -> None:
        self.say(f"Finished: {'OK' if s.ok else 'FAILED'} - {s.result.rstrip('.')}.")
        if s.summary and s.summary != s.result:
            self.say(s.summary)
        if s.failed > len(s.failures):
            self.say(f"The log lists every object: {s.log}")

    def _line_within(self, seconds: float) -> str | None:
        """A line typed within ``seconds``, or None. Input that cannot be waited on (not a
        terminal or pipe) is not read: the send is watched to its end."""
        try:
            fd = self.inp.fileno()
        except (AttributeError, OSError, ValueError):
            time.sleep(seconds)
            return None
        ready, _, _ = select.select([fd], [], [], seconds)
        if not ready:
            return None
        line = self.inp.readline()
        if not line:
            raise Quit
        return line.strip()
