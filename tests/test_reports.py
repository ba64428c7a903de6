"""The report family every job over many objects shares (CD import, USB export, sending)."""

from __future__ import annotations

import enum
import io
from collections.abc import Iterator
from dataclasses import dataclass

from appliance.conformance import SOPClass
from appliance.reports import Item, Progress, Report, item_printer, progress_printer, sop_class_label


class Copied(enum.StrEnum):
    COPIED = "copied"
    ALREADY_THERE = "already there"
    LOST = "lost"


@dataclass(frozen=True, kw_only=True)
class CopyReport(Report[Item[Copied]], outcomes=Copied, failures=(Copied.LOST,)):
    note: str = ""

    def summary(self) -> str:
        return f"{len(self.items)} objects: {self.counts()}; copied {self.throughput()}"

    def notes(self) -> Iterator[str]:
        if self.note:
            yield self.note

    def listed(self, item: Item[Copied]) -> bool:
        return item.outcome is not Copied.COPIED


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _report(*outcomes: Copied, **kw: object) -> CopyReport:
    items = tuple(Item(outcome=o, sop_instance_uid=f"1.2.{n}", reason=o.name.lower(), size=10)
                  for n, o in enumerate(outcomes))
    return CopyReport(items=items, bytes_done=2_500_000, seconds=2.0, **kw)  # type: ignore[arg-type]


def test_a_report_counts_judges_and_renders_with_its_own_outcomes() -> None:
    report = _report(Copied.COPIED, Copied.ALREADY_THERE, Copied.COPIED, note="the tray was opened")
    assert report.count(Copied.COPIED) == 2 and report.count(Copied.LOST) == 0 and report.ok
    assert report.counts() == "2 copied, 1 already there, 0 lost"
    assert report.counts(zeros=False) == "2 copied, 1 already there"
    assert report.mb_per_s == 1.25
    assert report.render() == (
        "3 objects: 2 copied, 1 already there, 0 lost; copied 2.5 MB in 2.0 s (1.2 MB/s)\n"
        "the tray was opened\n"
        "already there  1.2.1: already_there"
    )
    assert not _report(Copied.COPIED, Copied.LOST).ok


def test_the_outcome_column_is_as_wide_as_the_longest_outcome() -> None:
    lines = [Item(outcome=o, sop_instance_uid="1.2", reason="why").line() for o in Copied]
    assert lines == ["copied         1.2: why", "already there  1.2: why", "lost           1.2: why"]
    assert str(Item(outcome=Copied.LOST, sop_instance_uid="1.2")) == "lost           1.2: "


def test_an_empty_or_instant_job_reports_no_throughput() -> None:
    report = CopyReport(items=())
    assert report.ok and report.mb_per_s == 0.0 and report.counts(zeros=False) == ""
    assert Progress(0, 0).mb_per_s == 0.0


def test_a_progress_line_says_the_total_bytes_when_they_are_known() -> None:
    assert str(Progress(3, 10, 4_500_000, 1.5)) == "3/10 files, 4.5 MB, 3.0 MB/s"
    assert str(Progress(3, 10, 4_500_000, 1.5, bytes_total=9_000_000)) == "3/10 files, 4.5 of 9.0 MB, 3.0 MB/s"


def test_progress_to_a_log_is_a_line_every_10_s_and_the_last_one() -> None:
    out = io.StringIO()
    show = progress_printer(out)
    for done, seconds in ((1, 0.0), (2, 5.0), (3, 10.5), (4, 11.0), (5, 12.0)):
        show(Progress(done, 5, done * 1_000_000, seconds))
    assert out.getvalue().splitlines() == ["3/5 files, 3.0 MB, 0.3 MB/s", "5/5 files, 5.0 MB, 0.4 MB/s"]


def test_progress_on_a_terminal_rewrites_one_line_and_ends_it() -> None:
    out = Terminal()
    show = progress_printer(out)
    for done, seconds in ((1, 0.0), (2, 0.1), (3, 0.3)):
        show(Progress(done, 3, 0, seconds))
    assert out.getvalue() == "\r1/3 files, 0.0 MB, 0.0 MB/s\r3/3 files, 0.0 MB, 0.0 MB/s\n"


def test_the_item_printer_writes_each_finished_object_as_its_report_line() -> None:
    out = io.StringIO()
    show = item_printer(out)
    show(Progress(1, 2, item=Item(outcome=Copied.LOST, sop_instance_uid="1.2", reason="gone")))
    show(Progress(2, 2))
    assert out.getvalue() == "lost           1.2: gone\n"


def test_a_sop_class_is_named_by_its_label_else_by_what_the_caller_says_else_its_uid() -> None:
    assert sop_class_label(SOPClass.CT_IMAGE) == "CT Image Storage"
    assert sop_class_label("1.2.3") == "1.2.3"
    assert sop_class_label("1.2.3", "SOP class 1.2.3") == "SOP class 1.2.3"
