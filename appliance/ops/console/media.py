"""The console's media pages: the USB export (its queue and policy) and the CD import
(its last result, the reports, eject after import)."""

from __future__ import annotations

import re
from typing import Any

from appliance.ops import health
from appliance.ops.console.screen import WIDTH, Screen
from appliance.ops.consolesettings import EJECT_FIELD, POLICY_FIELD


class MediaPages(Screen):
    """The USB export and CD import pages."""

    def usb(self) -> None:
        from appliance.store.queue import ExportQueue
        from appliance.store.store import Store

        store = Store(self.data_dir)
        state = ExportQueue(self.data_dir)
        try:
            while True:
                cfg = self.settings.current()
                self.heading("USB export")
                last = health.last_results(self.data_dir).get("export")
                self.say(f"Last export: {_result(last)}")
                queue = state.entries()
                self.say(f"Queue ({len(queue)}): " + ("empty; the default policy applies" if not queue else
                                                       "a stick gets these"))
                for n, q in enumerate(queue[:8], 1):
                    self.say(f"  {n:<2} {q.level:<6} {q.uid}"[:WIDTH])
                if len(queue) > 8:
                    self.say(f"     ... and {len(queue) - 8} more")
                self._show_fields(cfg, [POLICY_FIELD])
                self.say("  a  Add a study or series to the queue")
                if queue:
                    self.say("  r  Remove from the queue")
                self.say("  0  Back")
                choice = self.ask("Choice: ").lower()
                if choice in ("0", "", "q", "b"):
                    return
                if choice == "1":
                    self.edit(POLICY_FIELD, cfg.usb.policy.value)
                elif choice == "a":
                    self._queue_add(store, state)
                elif choice == "r" and queue:
                    uid = self._pick([q.uid for q in queue], "Remove which (number or UID): ")
                    if uid is not None and state.remove(uid):
                        self.say(f"Removed {uid} from the queue.")
                else:
                    self.say(f"'{choice}' is not on the menu.")
        finally:
            state.close()
            store.close(clean=False)

    def _queue_add(self, store: Any, state: Any) -> None:
        rows = store.recent_studies(9)
        if rows:
            self.say("Latest studies (date, modalities, objects, study UID):")
        for n, r in enumerate(rows, 1):
            self.say(f"  {n}  {r.study_date or '-':<8} {r.modalities or '-':<8} {r.instances:>5}  {r.study_uid}"[:WIDTH])
        text = self.ask("Number, or a study or series UID: ")
        if not text:
            return
        uid = rows[int(text) - 1].study_uid if text.isdigit() and 1 <= int(text) <= len(rows) else text
        level = store.level_of(uid)
        if level is None:
            self.say(f"Not queued: no stored study or series has UID {uid}; pick a number from the list or "
                     "type a stored UID.")
            return
        if state.add(uid, level):
            self.say(f"Queued {level} {uid}.")
        else:
            self.say(f"{uid} was already queued.")

    def cd(self) -> None:
        while True:
            cfg = self.settings.current()
            self.heading("CD import")
            last = health.last_results(self.data_dir).get("import")
            self.say(f"Last import: {_result(last)}")
            reports = sorted((self.data_dir / "imports").glob("*.txt"), reverse=True)[:5]
            if reports:
                self.say("Latest reports:")
            for n, p in enumerate(reports, 1):
                self.say(f"  r{n} {p.name}"[:WIDTH])
            self._show_fields(cfg, [EJECT_FIELD])
            self.say("  0  Back")
            choice = self.ask("Choice: ").lower()
            if choice in ("0", "", "q", "b"):
                return
            if choice == "1":
                self.edit(EJECT_FIELD, cfg.media.eject_after_import)
            elif re.fullmatch(r"r\d", choice) and 1 <= int(choice[1:]) <= len(reports):
                self._page(reports[int(choice[1:]) - 1].read_text(encoding="utf-8", errors="replace").splitlines())
            else:
                self.say(f"'{choice}' is not on the menu.")


def _result(r: health.JobResult | None) -> str:
    if r is None:
        return "none yet"
    return f"{'OK' if r.ok else 'FAILED'} {r.finished_at} {r.device}: {r.summary}"
