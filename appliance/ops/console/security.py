"""The console's Security page: the box's own TLS certificate (subject, the SHA-256
fingerprint peers pin, its end and the 30-day warning, whether it is the self-signed one),
the TLS port and ``scp.require_known_peers`` as fields, the known peers (``[[peer]]``)
listed, added and removed, and a certificate and key imported from a USB stick.

The peers are written as the whole ``[[peer]]`` list, as the forwarding rules are (through
the config service when the appliance runs, which restarts its Storage SCP on them, else to
the file); a list the configuration refuses changes nothing. An imported pair is copied into
``DATA_DIR/tls/`` under new names (the key 0600 from its first byte), checked to match, and
``[tls] certificate`` and ``private_key`` are set together; the old pair stays beside it. The
key's content is never shown."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
import tempfile
import textwrap
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance import tls
from appliance.config import Config, Peer
from appliance.errors import ApplianceError, ConfigError
from appliance.ops.console.screen import WIDTH, Screen
from appliance.ops.consolesettings import PEER_FIELDS, SECURITY_FIELDS, peer_table, value_of

#: Known peers listed on the page; more are shown by "l".
PEERS_SHOWN = 8
#: PEM files looked at in an import folder (a stick holds other things too).
IMPORT_SUFFIXES = (".pem", ".crt", ".cer", ".key")
#: Largest file read as a PEM certificate or key.
MAX_PEM_BYTES = 1 << 20


@dataclass(frozen=True)
class Certificate:
    """What the page says of a certificate file: its subject and issuer (``CN=...,O=...``, in
    the certificate's order, as a peer's is logged), SHA-256 fingerprint and end (UTC)."""

    path: Path
    subject: str
    issuer: str
    sha256: str
    not_after: datetime | None

    @classmethod
    def read(cls, path: Path) -> Certificate:
        """Read the first certificate of the PEM file ``path``; raise ConfigError if it is not one."""
        try:
            sha256 = tls.fingerprint_of_pem(path)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not a PEM certificate ({exc})") from None
        names = {"subject": "", "issuer": ""}
        openssl = shutil.which("openssl")
        if openssl is not None:
            r = subprocess.run([openssl, "x509", "-noout", "-subject", "-issuer", "-nameopt",
                                "sep_comma_plus,sname,utf8,esc_ctrl", "-in", str(path)],
                               capture_output=True, text=True, timeout=10, check=False)
            for line in r.stdout.splitlines():
                key, _, value = line.partition("=")
                if key in names:
                    names[key] = value.strip()
        return cls(path, names["subject"], names["issuer"], sha256, tls.not_after(path))

    @property
    def self_signed(self) -> bool:
        return bool(self.subject) and self.subject == self.issuer


def fingerprint_lines(sha256: str) -> list[str]:
    """The fingerprint (95 characters with its colons) in two halves of 16 bytes."""
    return [sha256[:47], sha256[48:]] if len(sha256) == 95 else [sha256]


def peer_summary(p: Peer) -> str:
    """A known peer in one line of words."""
    text = p.ae_title + " from " + (", ".join(p.addresses) if p.addresses else "any address")
    if p.certificate_subject:
        text += f"; certificate {p.certificate_subject}"
    if p.certificate_sha256:
        text += f"; certificate SHA-256 {p.certificate_sha256}"
    return text


def check_pair(cert: Path, key: Path) -> None:
    """Raise ConfigError unless ``key`` is the private key of the certificate ``cert`` (as the
    TLS port would load them); a key protected by a passphrase is refused, not asked for."""
    try:
        head = key.read_text(errors="replace")[:MAX_PEM_BYTES]
    except OSError as exc:
        raise ConfigError(f"cannot read {key.name}: {exc.strerror or exc}") from None
    if "BEGIN ENCRYPTED PRIVATE KEY" in head or "Proc-Type: 4,ENCRYPTED" in head:
        raise ConfigError(f"the key {key.name} is protected by a passphrase; the box needs it without one "
                          "(openssl pkey -in KEY -out NEW.key)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert), str(key), password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"the key {key.name} is not the key of the certificate {cert.name}: they do not "
                              "match") from None
        raise ConfigError(f"{cert.name} and {key.name} cannot be used together: {tls.describe(exc)}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {cert.name} or {key.name}: {exc.strerror or exc}") from None


def _pem_kinds(folder: Path) -> tuple[list[Path], list[Path]]:
    """The certificate files and the key files in ``folder`` (by their PEM headers)."""
    certs, keys = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMPORT_SUFFIXES or not path.is_file():
            continue
        try:
            if path.stat().st_size > MAX_PEM_BYTES:
                continue
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if "-----BEGIN CERTIFICATE-----" in text:
            certs.append(path)
        if "PRIVATE KEY-----" in text:
            keys.append(path)
    return certs, keys


def _copy(src: Path, dst: Path, mode: int) -> None:
    """Copy ``src`` to ``dst`` (created with ``mode``, durable, never half there)."""
    fd, tmp = tempfile.mkstemp(prefix=".import-", dir=dst.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f, src.open("rb") as s:
            shutil.copyfileobj(s, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SecurityPages(Screen):
    """The box's certificate, the TLS port, the known peers and a certificate import."""

    def security(self) -> None:
        while True:
            cfg = self.settings.current()
            self.heading("Security")
            self._show_certificate(cfg)
            self._show_fields(cfg, SECURITY_FIELDS)
            self.say(f"  p  Known peers ({len(cfg.peer)}): list, add, remove")
            self.say("  i  Import a certificate and key from a USB stick (a mounted folder)")
            self.say("  0  Back")
            choice = self.ask("Choice: ").lower()
            if choice in ("0", "", "q", "b"):
                return
            if choice.isdigit() and 1 <= int(choice) <= len(SECURITY_FIELDS):
                f = SECURITY_FIELDS[int(choice) - 1]
                self.edit(f, value_of(cfg, f.key))
            elif choice == "p":
                self.peers()
            elif choice == "i":
                self._import()
            else:
                self.say(f"'{choice}' is not on the menu; type 1 to {len(SECURITY_FIELDS)}, p, i or 0.")

    # -- the box's certificate ----------------------------------------------------------------

    def _show_certificate(self, cfg: Config) -> None:
        own = bool(cfg.tls.certificate)
        path = Path(cfg.tls.certificate) if own else self.data_dir / tls.FOLDER / "self-signed.pem"
        if not path.exists():
            if own:
                self.say(f"The certificate {path} ([tls] certificate) does not exist: the TLS port cannot start.")
            else:
                self.say("No certificate yet: the box makes a self-signed one when the TLS port is first on.")
            return
        try:
            c = Certificate.read(path)
        except ConfigError as exc:
            self.say(f"The certificate cannot be read: {exc}")
            return
        if not own:
            self.say("This box's certificate: self-signed, made by the box; peers pin its fingerprint.")
        else:
            self.say("This box's certificate ([tls] certificate)"
                     + (", self-signed; peers pin its fingerprint:" if c.self_signed else f", issued by {c.issuer}:"))
        rows = [("Subject", c.subject or "(unreadable)")]
        rows += [("SHA-256" if n == 0 else "", line) for n, line in enumerate(fingerprint_lines(c.sha256))]
        if c.not_after is not None:
            days = (c.not_after - datetime.now(timezone.utc)).days
            rows.append(("Ends", f"{c.not_after:%Y-%m-%d}" + (f", in {days} day(s)" if days >= 0 else ", ENDED")))
        rows.append(("File", str(path)))
        for label, value in rows:
            self.say(f"  {label:<9} {value}")
        for problem in tls.expiry_problems(cfg.tls, self.data_dir):
            self.say(f"  Warning: {problem}")

    # -- known peers --------------------------------------------------------------------------

    def peers(self) -> None:
        while True:
            cfg = self.settings.current()
            self.heading("Known peers")
            if cfg.scp.require_known_peers:
                self.say("Required (Security, field 2): only these may associate, from these addresses.")
            else:
                self.say("Not required (Security, field 2): any AE title may associate; the list is kept.")
            if not cfg.peer:
                self.say("No known peer.")
            for n, p in enumerate(cfg.peer[:PEERS_SHOWN], 1):
                self._line(f"  {n:<2}", peer_summary(p))
            more = len(cfg.peer) - PEERS_SHOWN
            if more > 0:
                self.say(f"  ... and {more} more (l lists them all)")
            self.say("  a  Add a peer" + ("    r  Remove a peer" if cfg.peer else ""))
            self.say("  0  Back")
            choice = self.ask("Choice: ").lower()
            if choice in ("0", "", "q", "b"):
                return
            if choice == "a":
                self._add_peer(cfg)
            elif choice == "r" and cfg.peer:
                self._remove_peer(cfg)
            elif choice == "l" and more > 0:
                self._page([line for n, p in enumerate(cfg.peer, 1)
                            for line in textwrap.wrap(f"  {n:<2} {peer_summary(p)}", WIDTH, subsequent_indent=" " * 6)])
            else:
                self.say(f"'{choice}' is not on the menu.")

    def _line(self, label: str, text: str) -> None:
        for line in textwrap.wrap(f"{label} {text}", WIDTH, subsequent_indent=" " * (len(label) + 1)):
            self.out.write(line + "\n")
        self.out.flush()

    def _save_peers(self, peers: list[dict[str, Any]]) -> bool:
        """Check ``peers`` as the whole ``[[peer]]`` list, then save them; say what happened."""
        try:
            self.settings.check_peers(peers)
        except ConfigError as exc:
            self.error(exc)
            return False
        if self.settings.running():
            self.say("Saving: the Storage SCP restarts on the new list...")
        try:
            result = self.settings.set_peers(peers)
        except ApplianceError as exc:
            self.error(exc)
            return False
        self.say(f"Saved: {result}")
        return True

    def _add_peer(self, cfg: Config) -> None:
        self.say("A new known peer: the AE title a scanner or system calls with, where it calls from, and over "
                 "TLS which certificate it shows.")
        table: dict[str, Any] = {}
        for f in PEER_FIELDS:
            self.say(f"{f.label}: {f.help}")
            text = self.ask(f"{f.label}{'' if f.key == 'ae_title' else ' (Enter: any)'}: ")
            if f.key == "ae_title" and not text:
                self.say("No AE title: nothing added.")
                return
            if text:
                table[f.key] = [v.strip() for v in text.split(",") if v.strip()] if f.kind == "list" else text
        tables = [*(peer_table(p) for p in cfg.peer), table]
        try:
            self.settings.check_peers(tables)
        except ConfigError as exc:
            self.error(exc)
            return
        if (table.get("certificate_subject") or table.get("certificate_sha256")) and not cfg.tls.ca_certificates:
            self.error("a peer that names a certificate needs tls.ca_certificates (the CA that signed it, or the "
                       "certificate itself) to check it against; set that first (service shell: appliance config "
                       "set tls.ca_certificates FILE)")
            return
        if self._save_peers(tables):
            self._line(f"Peer {len(cfg.peer) + 1}:", peer_summary(self.settings.current().peer[-1]))

    def _remove_peer(self, cfg: Config) -> None:
        text = self.ask("Peer to remove (number): ")
        if not (text.isdigit() and 1 <= int(text) <= len(cfg.peer)):
            if text:
                self.say(f"'{text}' is not a peer; type 1 to {len(cfg.peer)}.")
            return
        n = int(text) - 1
        self._line(f"Peer {n + 1}:", peer_summary(cfg.peer[n]))
        if cfg.scp.require_known_peers and len(cfg.peer) == 1:
            self.error("it is the last known peer and known peers are required (field 2): every association would "
                       "be refused; turn that off first")
            return
        if self.confirm(f"Remove peer {n + 1}?"):
            self._save_peers([peer_table(p) for i, p in enumerate(cfg.peer) if i != n])
        else:
            self.say("Not removed.")

    # -- import -------------------------------------------------------------------------------

    def _import(self) -> None:
        self.say("The USB stick's folder (its mount point, e.g. /media/usb) holding the certificate (PEM, its "
                 "chain after it) and its private key (PEM, without a passphrase).")
        text = self.ask("Folder: ")
        if not text:
            return
        folder = Path(text).expanduser()
        if not folder.is_dir():
            self.error(f"{folder} is not a folder; give the stick's mount point")
            return
        certs, keys = _pem_kinds(folder)
        if not certs or not keys:
            self.error(f"{folder} holds no " + ("PEM certificate" if not certs else "PEM private key")
                       + f" ({', '.join(IMPORT_SUFFIXES)} files)")
            return
        cert = certs[0] if len(certs) == 1 else self._pick_file(certs, "Certificate")
        key = keys[0] if len(keys) == 1 else self._pick_file(keys, "Key")
        if cert is None or key is None:
            return
        try:
            check_pair(cert, key)
            c = Certificate.read(cert)
        except ConfigError as exc:
            self.error(exc)
            return
        now = datetime.now(timezone.utc)
        if c.not_after is not None and c.not_after <= now:
            self.error(f"{cert.name} ended on {c.not_after:%Y-%m-%d}; TLS peers would refuse it")
            return
        self.say(f"{cert.name} with the key {key.name} (they match):")
        for label, value in [("Subject", c.subject), ("Issuer", c.issuer),
                             *[("SHA-256" if n == 0 else "", line) for n, line in enumerate(fingerprint_lines(c.sha256))],
                             ("Ends", f"{c.not_after:%Y-%m-%d}" if c.not_after else "(unreadable)")]:
            self.say(f"  {label:<9} {value}")
        if c.not_after is not None and (c.not_after - now).days < tls.EXPIRY_WARNING_DAYS:
            self.say(f"  Warning: it ends in {(c.not_after - now).days} day(s).")
        self.say("Peers that pinned the box's certificate by its fingerprint must pin this one.")
        if not self.confirm("Install it as this box's certificate?"):
            self.say("Not installed.")
            return
        self._install(cert, key)

    def _pick_file(self, files: list[Path], what: str) -> Path | None:
        self.say(f"{what} files:")
        for n, path in enumerate(files, 1):
            self.say(f"  {n:<2} {path.name}"[:WIDTH])
        name = self._pick([p.name for p in files], f"{what} (number or name): ")
        return next((p for p in files if p.name == name), None)

    def _install(self, cert: Path, key: Path) -> None:
        """Copy the pair into DATA_DIR/tls/ under new names, check the copies, set [tls] to them."""
        folder = (self.data_dir / tls.FOLDER).absolute()  # the service reads [tls] from its own folder
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        new_cert, new_key = folder / f"imported-{stamp}.pem", folder / f"imported-{stamp}.key"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
            if new_cert.exists() or new_key.exists():
                raise ConfigError(f"{new_cert.name} exists already; import again in a second")
            _copy(key, new_key, 0o600)  # the key first: a certificate is only there with its key
            _copy(cert, new_cert, 0o644)
            check_pair(new_cert, new_key)
        except (OSError, ConfigError) as exc:
            new_cert.unlink(missing_ok=True)
            new_key.unlink(missing_ok=True)
            self.error(exc if isinstance(exc, ConfigError) else f"cannot copy into {folder}: {exc.strerror or exc}")
            return
        if self.settings.running():
            self.say("Saving: the Storage SCP restarts on the new certificate...")
        if self.save({"tls.certificate": str(new_cert), "tls.private_key": str(new_key)}):
            self.say(f"Installed as {new_cert} (key {new_key.name}, mode 0600).")
        else:
            new_cert.unlink(missing_ok=True)
            new_key.unlink(missing_ok=True)
