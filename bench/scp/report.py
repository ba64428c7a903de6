"""The figures of bench-scp: medians over the rounds per case and receiver, ours/DCMTK ratios,
and the printed table, floor and problems."""

from __future__ import annotations

import statistics
from typing import Any

from bench import series as seriesgen
from bench.scp.runs import DURABLE_DCMTK, Case, Receiver, Run


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[Run], cases: list[Case], receivers: list[Receiver]) -> list[dict[str, Any]]:
    """Per case and receiver: throughput, latency and resource figures over the good runs."""
    rows = []
    for case in cases:
        for receiver in receivers:
            mine = [r for r in runs if r.case == case.name and r.receiver == receiver.name]
            good = [r for r in mine if r.ok]
            row: dict[str, Any] = {"case": case.name, "receiver": receiver.name, "runs": len(mine), "ok": len(good)}
            if good:
                echoes = [e for r in good for e in r.echo_ms]
                assocs = [r.assoc_ms for r in good if r.assoc_ms is not None]
                row |= {
                    "images_per_s": _stats([r.images_per_s for r in good]),
                    "mb_per_s": _stats([r.mb_per_s for r in good]),
                    "seconds": _stats([r.seconds for r in good if r.seconds is not None]),
                    "peak_rss_mib": max((r.peak_rss_kib or 0) for r in good) / 1024,
                    "cpu_ms_per_image": statistics.median((r.cpu_s or 0.0) * 1e3 / r.images for r in good),
                    "journal_commits_per_image": (
                        statistics.median(c / r.images for r in good if (c := r.journal_commits) is not None)
                        if all(r.journal_commits is not None for r in good) else None),
                    **_machine(good),
                    "echo_ms": statistics.median(echoes) if echoes else None,
                    "assoc_ms": statistics.median(assocs) if assocs else None,
                }
            rows.append(row)
    return rows


def _machine(good: list[Run]) -> dict[str, float | None]:
    """Medians over ``good`` of the CPU per image that the senders and the whole machine
    spent while the series was sent, and the share of the machine's CPU time that was busy."""
    timed = [r for r in good if r.machine_busy_s is not None and r.machine_all_s is not None
             and r.sender_cpu_s is not None]
    if not timed:
        return {"sender_cpu_ms_per_image": None, "machine_cpu_ms_per_image": None, "machine_busy": None}
    return {
        "sender_cpu_ms_per_image": statistics.median((r.sender_cpu_s or 0.0) * 1e3 / r.images for r in timed),
        "machine_cpu_ms_per_image": statistics.median((r.machine_busy_s or 0.0) * 1e3 / r.images for r in timed),
        # a run shorter than one clock tick counts as idle
        "machine_busy": statistics.median((r.machine_busy_s or 0.0) / r.machine_all_s if r.machine_all_s else 0.0
                                          for r in timed),
    }


def ratios(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Ours' median images/s over DCMTK's, per case."""
    by_key = {(r["case"], r["receiver"]): r for r in rows}
    out: dict[str, float | None] = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        ours, dcmtk = by_key.get((case, "ours"), {}), by_key.get((case, "dcmtk"), {})
        if "images_per_s" in ours and "images_per_s" in dcmtk:
            out[case] = ours["images_per_s"]["median"] / dcmtk["images_per_s"]["median"]
        else:
            out[case] = None
    return out


COLUMNS = (
    "case",
    "receiver",
    "ok",
    "images/s med [min..max]",
    "MB/s med [min..max]",
    "peak RSS",
    "CPU/img",
    "echo",
    "assoc",
)


def _print_table(table: list[list[str]], names: int) -> None:
    """Print ``table`` (its first line the heading, underlined) in columns: the first
    ``names`` columns left-aligned, the figures right-aligned."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for n, line in enumerate(table):
        print("  ".join(v.ljust(w) if i < names else v.rjust(w)
                        for i, (v, w) in enumerate(zip(line, widths, strict=True))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _ms_per_image(by_key: dict[tuple[str, str], dict[str, Any]], case: str, receiver: str) -> float | None:
    """A receiver's median time per image in a case, in ms (None without a good run)."""
    row = by_key.get((case, receiver), {})
    return 1e3 / row["images_per_s"]["median"] if "images_per_s" in row else None


def _cell(v: float | None, suffix: str = "") -> str:
    """A figure of the floor and durable tables: two decimals, "-" for none."""
    return "-" if v is None else f"{v:.2f}{suffix}"


def _cells(row: dict[str, Any]) -> list[str]:
    """One row of the table: the case, the receiver and its figures."""
    cells = [row["case"], row["receiver"], f"{row['ok']}/{row['runs']}"]
    if "images_per_s" not in row:
        return cells + ["-"] * (len(COLUMNS) - len(cells))

    def spread(s: dict[str, float]) -> str:
        return f"{s['median']:.1f} [{s['min']:.1f}..{s['max']:.1f}]"

    def ms(v: float | None, digits: int) -> str:
        return "-" if v is None else f"{v:.{digits}f} ms"

    return cells + [
        spread(row["images_per_s"]),
        spread(row["mb_per_s"]),
        f"{row['peak_rss_mib']:.0f} MiB",
        ms(row["cpu_ms_per_image"], 2),
        ms(row["echo_ms"], 3),
        ms(row["assoc_ms"], 2),
    ]


def print_report(rows: list[dict[str, Any]], case_ratios: dict[str, float | None], header: list[str]) -> None:
    """The header lines, the table, and the ratio of each case."""
    print()
    print("\n".join(header))
    print()
    table = [list(COLUMNS)] + [_cells(row) for row in rows]
    _print_table(table, names=2)
    print()
    print("ours/DCMTK, median images/s (1.00 = parity, below 1 = ours slower):")
    for case, ratio in case_ratios.items():
        if ratio is None:
            print(f"  {case:8}  -     (no successful runs on one side)")
        else:
            print(f"  {case:8}  {ratio:.2f}  (ours takes {1 / ratio:.2f}x DCMTK's time)")


FLOOR_COLUMNS = (
    "case",
    "ours",
    "DCMTK",
    "sink",
    "commit",
    "floor",
    "ours/floor",
    "ours/DCMTK",
    "CPU/img ours",
    "DCMTK",
    "sink",
    "flushes/img ours",
)


def print_floor(rows: list[dict[str, Any]], floors: dict[str, list[float]], series: list[seriesgen.Series],
                parallel_floors: dict[str, list[float]] | None = None) -> None:
    """Per case, ms per image (medians) of ours, DCMTK and the sink, the durable commit of an
    object of that size, the floor = sink + commit, ours/floor (time per image), ours/DCMTK
    (throughput) and each receiver's CPU per image.

    The floor is the least time per image a receiver that commits each object durably before
    it answers can take over one association: storescu waits for each answer, so nothing
    overlaps the commit, and such a receiver needs at least what the sink needs (sender,
    loopback, our protocol code) plus one commit. Over N associations commits overlap with
    receiving: there the floor is the longer of the sink's time per image and the disk's
    time per commit with N threads committing at once (``parallel_floors``), CPU aside."""
    by_key = {(r["case"], r["receiver"]): r for r in rows}

    def ms(case: str, receiver: str) -> float | None:
        return _ms_per_image(by_key, case, receiver)

    def cpu(case: str, receiver: str) -> float | None:
        return by_key.get((case, receiver), {}).get("cpu_ms_per_image")

    cell = _cell

    table = [list(FLOOR_COLUMNS)]
    for case in dict.fromkeys(r["case"] for r in rows):
        modality, associations = case.split(" x")
        ours, dcmtk, sink = ms(case, "ours"), ms(case, "dcmtk"), ms(case, "sink")
        commits = floors.get(modality) if associations == "1" else (parallel_floors or {}).get(modality)
        commit = statistics.median(commits) * 1e3 if commits else None
        floor = None
        if sink is not None and commit is not None:
            floor = sink + commit if associations == "1" else max(sink, commit)
        table.append(
            [
                case,
                cell(ours),
                cell(dcmtk),
                cell(sink),
                cell(commit),
                cell(floor),
                cell(ours / floor if ours is not None and floor else None, "x"),
                cell(dcmtk / ours if ours and dcmtk is not None else None),
                cell(cpu(case, "ours")),
                cell(cpu(case, "dcmtk")),
                cell(cpu(case, "sink")),
                cell(by_key.get((case, "ours"), {}).get("journal_commits_per_image")),
            ]
        )
    sizes = ", ".join(f"{s.spec.modality} {s.nbytes // len(s.files) // 1000} kB" for s in series)
    print(
        "\nms per image (medians): floor = sink + one durable commit of an object "
        f"({sizes}), the least for a durable receiver over one association; over N, the longer of the "
        "sink and the time per commit with N committing at once (the commit column there)"
    )
    print("ours/floor in time per image (1.00 = at the floor), ours/DCMTK in images/s; CPU: the receiver's, ms;")
    print("flushes/img: journal commits of the ext4 image per image stored by ours (below 1: commits shared)")
    _print_table(table, names=1)


DURABLE_COLUMNS = (
    "case",
    "DCMTK",
    "DCMTK+fsync",
    "ours",
    "DCMTK+fsync/DCMTK",
    "ours/DCMTK+fsync",
    "CPU/img DCMTK+fsync",
    "ours",
    "flushes/img DCMTK+fsync",
)


def print_durable_dcmtk(rows: list[dict[str, Any]]) -> None:
    """Per case, ms per image (medians) of DCMTK, the durable DCMTK (the same storescp with
    every file fsynced before it is closed, so before it answers) and ours; the durable
    DCMTK's images/s over DCMTK's (what durability costs storescp itself), ours over the
    durable DCMTK in time per image, the CPU per image of both and the durable DCMTK's
    journal commits per image. Nothing is printed if the durable DCMTK did not run."""
    by_key = {(r["case"], r["receiver"]): r for r in rows}

    def ms(case: str, receiver: str) -> float | None:
        return _ms_per_image(by_key, case, receiver)

    cell = _cell
    table = [list(DURABLE_COLUMNS)]
    for case in dict.fromkeys(r["case"] for r in rows):
        if (case, DURABLE_DCMTK) not in by_key:
            continue
        dcmtk, durable, ours = ms(case, "dcmtk"), ms(case, DURABLE_DCMTK), ms(case, "ours")
        table.append([
            case,
            cell(dcmtk),
            cell(durable),
            cell(ours),
            cell(dcmtk / durable if dcmtk is not None and durable else None),
            cell(ours / durable if ours is not None and durable else None, "x"),
            cell(by_key[(case, DURABLE_DCMTK)].get("cpu_ms_per_image")),
            cell(by_key.get((case, "ours"), {}).get("cpu_ms_per_image")),
            cell(by_key[(case, DURABLE_DCMTK)].get("journal_commits_per_image")),
        ])
    if len(table) == 1:
        return
    print(f"\n{DURABLE_DCMTK}: DCMTK's storescp made durable (each file fsynced before it is closed, so before "
          "its answer; written in place, nothing checked or indexed), ms per image (medians);")
    print("DCMTK+fsync/DCMTK in images/s (what durability costs storescp itself), ours/DCMTK+fsync in time per image "
          "(1.00 = as fast as a durable DCMTK); CPU: the receiver's, ms")
    _print_table(table, names=1)


MACHINE_COLUMNS = ("case", "receiver", "machine busy", "CPU/img all", "receiver", "senders", "rest")


def print_machine(rows: list[dict[str, Any]], cpus: int, commit_cpu: dict[str, list[float]] | None = None) -> None:
    """Per case and receiver, the CPU the whole machine spent per image while the series
    was sent (medians), split into the receiver's, the storescu senders' and the rest (the
    kernel's threads: loopback, the loop device and the ext4 journal writing, write-back),
    and how busy the machine's CPUs were. A case run near 100 % busy is bound by CPU: there
    a receiver is only faster by spending less CPU per image, and the senders' share is
    paid whoever receives.

    With ``commit_cpu`` (--floor: the CPU seconds of each bare durable commit, by modality),
    each case over several associations also gets the least time per image its CPUs allow
    a receiver that does nothing but commit durably (no DICOM, no index): the senders' CPU
    per image (as measured with DCMTK) plus one commit's, over the CPUs, against DCMTK's
    time per image."""
    table = [list(MACHINE_COLUMNS)]
    for row in rows:
        if row.get("machine_cpu_ms_per_image") is None:
            continue
        all_ms, mine, senders = row["machine_cpu_ms_per_image"], row["cpu_ms_per_image"], row["sender_cpu_ms_per_image"]
        table.append([row["case"], row["receiver"], f"{row['machine_busy'] * 100:.0f} %", f"{all_ms:.2f}",
                      f"{mine:.2f}", f"{senders:.2f}", f"{max(all_ms - mine - senders, 0.0):.2f}"])
    if len(table) == 1:
        return
    print(f"\nCPU of the whole machine ({cpus} CPUs) per image while the series was sent, ms (medians): "
          "the receiver's, the senders' (storescu) and the rest (kernel threads: loopback, loop device, "
          "journal, write-back); near 100 % busy, CPU per image sets the pace")
    _print_table(table, names=2)
    by_key = {(r["case"], r["receiver"]): r for r in rows}
    for case in dict.fromkeys(r["case"] for r in rows):
        modality, associations = case.split(" x")
        dcmtk, ours = by_key.get((case, "dcmtk"), {}), by_key.get((case, "ours"), {})
        commits = (commit_cpu or {}).get(modality)
        if associations == "1" or not commits or dcmtk.get("sender_cpu_ms_per_image") is None \
                or "images_per_s" not in dcmtk:
            continue
        commit_ms = statistics.median(commits) * 1e3
        need = dcmtk["sender_cpu_ms_per_image"] + commit_ms
        least, dcmtk_ms = need / cpus, 1e3 / dcmtk["images_per_s"]["median"]
        if least <= 0:  # nothing measurable (a few tiny images)
            continue
        ours_ms = f"; ours takes {1e3 / ours['images_per_s']['median']:.2f}" if "images_per_s" in ours else ""
        print(f"{case}: a receiver doing nothing but one bare durable commit per image would need the senders' "
              f"{dcmtk['sender_cpu_ms_per_image']:.2f} + the commit's {commit_ms:.2f} = {need:.2f} ms of CPU per "
              f"image: at least {least:.2f} ms per image on {cpus} CPUs, where DCMTK took {dcmtk_ms:.2f} "
              f"(so at most {dcmtk_ms / least:.2f}x DCMTK's images/s){ours_ms}")


def report_problems(runs: list[Run]) -> None:
    """Print the warnings (grouped) and the failed runs."""
    warnings: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        if r.warning:
            warnings.setdefault((r.receiver, r.warning.splitlines()[0]), []).append(r)
    if warnings:
        print("\nwarnings:")
        for (receiver, first_line), which in warnings.items():
            print(f"  {receiver}: {first_line} ({len(which)} of {len(runs)} runs)")
            for line in (which[0].warning or "").splitlines()[1:]:
                print(line)
    failures = [r for r in runs if r.error]
    if failures:
        print(f"\nFAILED: {len(failures)} of {len(runs)} runs (left out of the figures above):")
        for r in failures:
            print(f"  round {r.round} {r.case} {r.receiver}: {r.error}")
