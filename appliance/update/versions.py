"""Version order: systemd's ``strverscmp_improved`` (src/fundamental/string-util-fundamental.c),
the order systemd-boot sorts boot entries in, ported character for character.

Segments are numeric or alphabetic, optionally prefixed by ``~`` (pre-release, oldest), ``-``
(version/release separator), ``^`` (patch release) or ``.`` (point release); any other
character only separates segments. No prefix is newest: 123~rc1 < 123 < 123-1 < 123^p1 <
123.1 < 123a.
"""

from __future__ import annotations


def _digit(c: str) -> bool:
    return "0" <= c <= "9"


def _alpha(c: str) -> bool:
    return "a" <= c <= "z" or "A" <= c <= "Z"


def _valid(c: str) -> bool:
    return _digit(c) or _alpha(c) or c in "~-^."


def _cmp(x: int, y: int) -> int:
    return (x > y) - (x < y)


def _scmp(x: str, y: str) -> int:
    return (x > y) - (x < y)


def compare(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` is older than, as new as, or newer than ``b``."""
    # The C code walks NUL-terminated strings; "\0" past the end plays the terminator.
    a += "\0"
    b += "\0"
    i = j = 0
    while True:
        while a[i] != "\0" and not _valid(a[i]):
            i += 1
        while b[j] != "\0" and not _valid(b[j]):
            j += 1
        if a[i] == "~" or b[j] == "~":  # pre-releases: the one with '~' is older
            r = _cmp(a[i] != "~", b[j] != "~")
            if r:
                return r
            i += 1
            j += 1
        if a[i] == "\0" or b[j] == "\0":  # more segments are newer (after the '~' check)
            return _cmp(ord(a[i]), ord(b[j]))
        for sep in "-^.":
            if a[i] == sep or b[j] == sep:
                r = _cmp(a[i] != sep, b[j] != sep)
                if r:
                    return r
                i += 1
                j += 1
        if _digit(a[i]) or _digit(b[j]):
            ii, jj = i, j
            while _digit(a[ii]):
                ii += 1
            while _digit(b[jj]):
                jj += 1
            r = _cmp(i != ii, j != jj)  # a numeric segment is newer than none
            if r:
                return r
            while a[i] == "0":
                i += 1
            while b[j] == "0":
                j += 1
            r = _cmp(ii - i, jj - j)  # longer numbers are larger
            if r:
                return r
            r = _scmp(a[i:ii], b[j:jj])
            if r:
                return r
        else:
            ii, jj = i, j
            while _alpha(a[ii]):
                ii += 1
            while _alpha(b[jj]):
                jj += 1
            n = min(ii - i, jj - j)
            r = _scmp(a[i:i + n], b[j:j + n])
            if r:
                return r
            r = _cmp(ii - i, jj - j)  # abc < abcde
            if r:
                return r
        i, j = ii, jj


def newest(versions: list[str]) -> str:
    """The newest of ``versions`` (not empty)."""
    best = versions[0]
    for v in versions[1:]:
        if compare(v, best) > 0:
            best = v
    return best
