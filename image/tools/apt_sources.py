#!/usr/bin/env python3
"""Write a deb822 apt sources file for another Debian release, from this machine's own apt
configuration.

The image build must not name any mirror: it uses whichever mirrors the build machine is
configured with (a hospital's own mirror included). Every enabled ``deb`` entry for the
host's release (``bookworm``, ``bookworm-updates``, ``bookworm-security``) is kept with its
URIs, components and keyring, and its suite renamed to the target release's.

Usage: apt_sources.py RELEASE OUTPUT  (e.g. ``apt_sources.py trixie /tmp/x/mkosi.sources``)
"""

from __future__ import annotations

import glob
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclass(frozen=True)
class Entry:
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str


def host_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "VERSION_CODENAME":
            return value.strip().strip('"')
    raise SystemExit("apt_sources.py: /etc/os-release has no VERSION_CODENAME")


def deb822_entries(text: str) -> list[Entry]:
    entries = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes") == "no":
            continue
        entries.append(
            Entry(
                uris=tuple(fields.get("uris", "").split()),
                suites=tuple(fields.get("suites", "").split()),
                components=tuple(fields.get("components", "main").split()),
                signed_by=fields.get("signed-by", DEFAULT_KEYRING),
            )
        )
    return entries


def one_line_entries(text: str) -> list[Entry]:
    entries = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        signed_by = DEFAULT_KEYRING
        if words and words[0].startswith("["):
            options = []
            while words:
                word = words.pop(0)
                options.append(word)
                if word.endswith("]"):
                    break
            for opt in " ".join(options).strip("[] ").split():
                if opt.startswith("signed-by="):
                    signed_by = opt.split("=", 1)[1]
        if len(words) >= 2:
            entries.append(Entry((words[0],), (words[1],), tuple(words[2:]) or ("main",), signed_by))
    return entries


def host_entries() -> list[Entry]:
    entries = []
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        if Path(path).exists():
            entries += one_line_entries(Path(path).read_text())
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        entries += deb822_entries(Path(path).read_text())
    return entries


def retarget(entries: list[Entry], host: str, release: str) -> str:
    stanzas = []
    for e in entries:
        suites = []
        for suite in e.suites:
            if suite == host or suite.startswith((host + "-", host + "/")):
                suites.append(release + suite[len(host) :])
        if suites and e.uris:
            stanzas.append(
                "Types: deb\n"
                f"URIs: {' '.join(e.uris)}\n"
                f"Suites: {' '.join(suites)}\n"
                f"Components: {' '.join(e.components)}\n"
                f"Signed-By: {e.signed_by}\n"
            )
    if not stanzas:
        raise SystemExit(f"apt_sources.py: no enabled 'deb' source for {host} in /etc/apt; cannot derive {release}'s")
    return "\n".join(stanzas)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    release, output = argv
    text = retarget(host_entries(), host_codename(), release)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
