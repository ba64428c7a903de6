"""A release: the signed SHA256SUMS manifest of one version's artefacts, in a folder (a USB
stick's ``appliance-update``) or at an HTTP(S) base URL.

``SHA256SUMS`` lists ``<sha256>  <file>`` per line; ``SHA256SUMS.sig`` is the raw Ed25519
signature of its bytes, checked with ``openssl pkeyutl -verify -rawin`` against every trusted
key in :data:`~appliance.update.KEYS_DIR` (any one suffices, which is how a site rotates keys).
"""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from appliance.update import KEYS_DIR, PREFIX, STICK_FOLDER, UpdateError
from appliance.update.versions import newest

log = logging.getLogger(__name__)

SUMS = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.sig"
#: The most bytes SHA256SUMS or its signature may have (a manifest is a few lines).
MAX_MANIFEST_BYTES = 1 << 20
#: A version as it may appear in an artefact's name: no '+' (boot counting), '/' or spaces.
_VERSION = r"[A-Za-z0-9][A-Za-z0-9.~^-]*"
_ARTEFACT_RE = re.compile(rf"^{PREFIX}(?P<v>{_VERSION})\.(?P<kind>root\.raw\.zst|efi)$")
_LINE_RE = re.compile(r"^(?P<sum>[0-9a-fA-F]{64}) [ *](?P<name>.+)$")


class MissingArtefact(UpdateError):
    """A file of the release is not there (a folder without it, or HTTP 404)."""


@dataclass(frozen=True)
class Release:
    """One version's artefacts as the verified manifest names them."""

    version: str
    #: Every file of the manifest and its sha256 (lower-case hex).
    sums: dict[str, str]
    #: The folder or base URL the release was read from.
    source: str

    @property
    def root_name(self) -> str:
        return f"{PREFIX}{self.version}.root.raw.zst"

    @property
    def uki_name(self) -> str:
        return f"{PREFIX}{self.version}.efi"

    @property
    def is_url(self) -> bool:
        return is_url(self.source)


def is_url(source: str | Path) -> bool:
    """True if ``source`` is an http:// or https:// URL (else a folder)."""
    return isinstance(source, str) and source.lower().startswith(("http://", "https://"))


def stick_release_dir(mount: Path) -> Path | None:
    """The release folder on a stick mounted at ``mount``, or None when it holds none."""
    folder = mount / STICK_FOLDER
    return folder if (folder / SUMS).is_file() else None


def open_artefact(source: str, name: str, timeout: float = 30.0) -> tuple[BinaryIO, int | None]:
    """Open file ``name`` of the release at ``source`` for reading; return it and its size in
    bytes (None if the server does not say). Raise UpdateError if it cannot be opened."""
    if is_url(source):
        url = source.rstrip("/") + "/" + name
        try:
            resp = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code in (404, 410):
                raise MissingArtefact(f"{url} does not exist; the release there is incomplete") from None
            raise UpdateError(f"{url} was refused by the server (HTTP {exc.code} {exc.reason})") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise UpdateError(f"cannot download {url}: {reason}; check update.url and the network") from None
        length = resp.headers.get("Content-Length")
        return resp, int(length) if length and length.isdigit() else None
    path = Path(source) / name
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise MissingArtefact(f"{path} is missing; the release in {source} is incomplete") from None
    except OSError as exc:
        raise UpdateError(f"cannot read {path}: {exc.strerror}") from None
    return f, path.stat().st_size


def _read_small(source: str, name: str, timeout: float, missing: str) -> bytes:
    try:
        f, _ = open_artefact(source, name, timeout)
    except MissingArtefact:
        raise UpdateError(missing) from None
    try:
        with f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise UpdateError(f"cannot read {name} from {source}: {exc}") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise UpdateError(f"{name} from {source} is larger than {MAX_MANIFEST_BYTES} bytes; it is not a manifest")
    return data


def verify_signature(sums: bytes, signature: bytes, keys_dir: Path = KEYS_DIR) -> Path:
    """Check ``signature`` of ``sums`` against each trusted key; return the key that verified
    it. Raise UpdateError when none does (or there is no trusted key)."""
    keys = sorted(keys_dir.glob("*.pem")) if keys_dir.is_dir() else []
    if not keys:
        raise UpdateError(f"no trusted update key in {keys_dir}; this box cannot check any release")
    with tempfile.TemporaryDirectory(prefix="appliance-update-") as tmp:
        (Path(tmp) / SUMS).write_bytes(sums)
        (Path(tmp) / SIGNATURE).write_bytes(signature)
        for key in keys:
            try:
                done = subprocess.run(
                    ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(key), "-rawin",
                     "-in", str(Path(tmp) / SUMS), "-sigfile", str(Path(tmp) / SIGNATURE)],
                    capture_output=True, timeout=60, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise UpdateError(f"cannot run openssl to check the signature: {exc}") from None
            if done.returncode == 0 and b"Signature Verified Successfully" in done.stdout:
                return key
            log.debug("update: %s does not verify the signature: %s", key.name, done.stderr.decode(errors="replace"))
    raise UpdateError(f"the signature of {SUMS} does not match any trusted key in {keys_dir}: the release was "
                      "changed after signing, or signed by a key this box does not trust; nothing was installed")


def parse_sums(text: str, where: str) -> dict[str, str]:
    """``{file name: sha256}`` of a SHA256SUMS text; raise UpdateError on a malformed line."""
    sums: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE_RE.match(line.rstrip("\r"))
        if m is None or "/" in m["name"]:
            raise UpdateError(f"{where} line {n} is not '<sha256>  <file name>': {line[:80]!r}")
        sums[m["name"]] = m["sum"].lower()
    return sums


def read_release(source: str | Path, keys_dir: Path = KEYS_DIR, timeout: float = 30.0) -> Release:
    """Read and verify the release at ``source`` (a folder or an http(s) base URL): the
    signature of SHA256SUMS by a trusted key, and the version it names (if several, the
    newest), with both its root image and its UKI listed. Raise UpdateError otherwise."""
    src = source if isinstance(source, str) and is_url(source) else str(Path(source))
    if not is_url(src) and not Path(src).is_dir():
        raise UpdateError(f"{src} is not a folder; a release is a folder holding {SUMS} or an http(s) URL")
    sums_bytes = _read_small(src, SUMS, timeout, f"{src} holds no {SUMS}; it is not an update release")
    signature = _read_small(src, SIGNATURE, timeout,
                            f"the release in {src} is not signed ({SIGNATURE} is missing); it is refused")
    key = verify_signature(sums_bytes, signature, keys_dir)
    try:
        text = sums_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise UpdateError(f"{SUMS} in {src} is not UTF-8 text") from None
    sums = parse_sums(text, f"{SUMS} in {src}")
    found: dict[str, set[str]] = {}
    for name in sums:
        if m := _ARTEFACT_RE.match(name):
            found.setdefault(m["v"], set()).add(m["kind"])
    if not found:
        raise UpdateError(f"{SUMS} in {src} names no {PREFIX}<version>.root.raw.zst or .efi; it is not a release "
                          "of this appliance")
    version = newest(list(found))
    release = Release(version, sums, src)
    for name in (release.root_name, release.uki_name):
        if name not in sums:
            raise UpdateError(f"{SUMS} in {src} lists no {name}; the release of version {version} is incomplete")
    log.info("update: %s holds version %s, signed by the trusted key %s", src, version, key.name)
    return release
