"""One family for a job over many objects (CD import, USB export, sending to a peer).

An :class:`Item` says what happened to one object, a :class:`Report` holds a job's items in
order, and a :class:`Progress` is passed to the job's ``progress`` callback after each object.
Each job keeps its own outcome enum and wording (``ImportOutcome``, ``FileOutcome``,
``SendOutcome``); counting, the ok verdict, throughput, the aligned outcome column, the
progress line and its printers live here once, as does a SOP class's label.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TextIO, TypeVar

from appliance.conformance import SOP_CLASS_LABELS, SOPClass

OutcomeT = TypeVar("OutcomeT", bound=enum.StrEnum)
ItemT = TypeVar("ItemT", bound="Item[Any]")

#: How often a progress line is rewritten on a terminal, and written to a log, in seconds.
TTY_PROGRESS_EVERY_S = 0.2
LOG_PROGRESS_EVERY_S = 10.0


def sop_class_label(uid: str, unknown: str | None = None) -> str:
    """The conformance statement's label for SOP class ``uid``; else ``unknown``, else the UID."""
    try:
        return SOP_CLASS_LABELS[SOPClass(uid)]
    except ValueError:
        return uid if unknown is None else unknown


def mb_per_s(nbytes: int, seconds: float) -> float:
    """Throughput in MB (10^6 bytes) per second; 0.0 before any time has passed."""
    return nbytes / 1e6 / seconds if seconds > 0 else 0.0


@dataclass(frozen=True, kw_only=True)
class Item(Generic[OutcomeT]):
    """What happened to one object: its outcome and why, its size, its UIDs when known."""

    outcome: OutcomeT
    reason: str = ""
    size: int = 0
    sop_instance_uid: str = ""
    sop_class_uid: str = ""

    @property
    def column(self) -> str:
        """The outcome, padded to the longest outcome of its enum so a report's lines align."""
        width = max(len(o.value) for o in type(self.outcome))
        return f"{self.outcome.value:<{width}}"

    def line(self) -> str:
        """The item as one line of a report: outcome, object, why."""
        return f"{self.column}  {self.sop_instance_uid}: {self.reason}"

    def __str__(self) -> str:
        return self.line()


@dataclass(frozen=True)
class Progress:
    """How far a job has come: passed to its ``progress`` callback after each object."""

    files_done: int
    files_total: int
    bytes_done: int = 0
    seconds: float = 0.0
    #: What the whole job will move, when it is known beforehand (the USB export estimates it).
    bytes_total: int | None = None
    #: The object just finished, for jobs that report each one as it ends.
    item: Item[Any] | None = None

    @property
    def mb_per_s(self) -> float:
        return mb_per_s(self.bytes_done, self.seconds)

    def __str__(self) -> str:
        of = f" of {self.bytes_total / 1e6:.1f}" if self.bytes_total is not None else ""
        return (f"{self.files_done}/{self.files_total} files, {self.bytes_done / 1e6:.1f}{of} MB, "
                f"{self.mb_per_s:.1f} MB/s")


def progress_printer(stream: TextIO) -> Callable[[Progress], None]:
    """Show progress: a rewritten line on a terminal, a line every 10 s elsewhere (the journal)."""
    tty = stream.isatty()
    every = TTY_PROGRESS_EVERY_S if tty else LOG_PROGRESS_EVERY_S
    last = [-1.0]

    def show(p: Progress) -> None:
        final = p.files_done == p.files_total
        if not final and p.seconds - last[0] < every:
            return
        last[0] = p.seconds
        stream.write(("\r" + str(p) + ("\n" if final else "")) if tty else f"{p}\n")
        stream.flush()

    return show


def item_printer(stream: TextIO) -> Callable[[Progress], None]:
    """Write each finished object's report line as it ends (``appliance send``, ``rt-export``)."""

    def show(p: Progress) -> None:
        if p.item is not None:
            stream.write(f"{p.item}\n")
            stream.flush()

    return show


@dataclass(frozen=True, kw_only=True)
class Report(abc.ABC, Generic[ItemT]):
    """A job's report: one item per object, in order, with the bytes it moved and its duration.

    A job's report names its outcome enum and the outcomes that make it not ok where it is
    declared: ``class ImportReport(Report[FileResult], outcomes=ImportOutcome, failures=...)``."""

    items: tuple[ItemT, ...]
    bytes_done: int = 0
    seconds: float = 0.0
    #: The job's outcome enum, in the order its counts are written.
    outcomes: ClassVar[type[enum.StrEnum]]
    #: The outcomes that make the report not ok.
    failures: ClassVar[frozenset[enum.StrEnum]] = frozenset()

    def __init_subclass__(cls, *, outcomes: type[enum.StrEnum] | None = None,
                          failures: Iterable[enum.StrEnum] = (), **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if outcomes is not None:
            cls.outcomes = outcomes
            cls.failures = frozenset(failures)

    def count(self, outcome: enum.StrEnum) -> int:
        return sum(1 for i in self.items if i.outcome is outcome)

    @property
    def ok(self) -> bool:
        """True when no object had one of the ``failures`` outcomes."""
        return not any(i.outcome in self.failures for i in self.items)

    @property
    def mb_per_s(self) -> float:
        return mb_per_s(self.bytes_done, self.seconds)

    def counts(self, *, zeros: bool = True) -> str:
        """``"3 imported, 0 refused"``: each outcome's count, leaving out the zeros if asked."""
        return ", ".join(f"{self.count(o)} {o.value}" for o in self.outcomes if zeros or self.count(o))

    def throughput(self) -> str:
        """``"12.5 MB in 2.0 s (6.2 MB/s)"``."""
        return f"{self.bytes_done / 1e6:.1f} MB in {self.seconds:.1f} s ({self.mb_per_s:.1f} MB/s)"

    @abc.abstractmethod
    def summary(self) -> str:
        """The report in one line."""

    def notes(self) -> Iterator[str]:
        """Lines written between the summary and the items (none unless a job has some)."""
        return iter(())

    def listed(self, item: ItemT) -> bool:
        """Whether ``item`` gets a line in :meth:`render` (every one unless a job says otherwise)."""
        return True

    def render(self) -> str:
        """The report as text: the summary, its notes, then one line per listed object."""
        return "\n".join([self.summary(), *self.notes(), *(i.line() for i in self.items if self.listed(i))])
