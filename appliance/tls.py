"""DICOM TLS (PS3.15 B.9, the BCP 195 profile) with Python's :mod:`ssl`: the contexts of the
Storage SCP's TLS port and of the client AE, the self-signed pair a box makes at first start,
and what a peer's certificate says.

* TLS 1.2 or later; for TLS 1.2 only BCP 195's suites (ECDHE or DHE with AES-GCM), TLS 1.3
  as OpenSSL offers it (all its suites are AEAD).
* The server presents ``[tls] certificate`` and ``private_key``; without them, a self-signed
  pair made once in ``DATA_DIR/tls/`` (by the ``openssl`` command, the key 0600, never logged).
* Peers are verified against ``[tls] ca_certificates``: a client's certificate if it presents
  one (required with ``require_client_certificate``), a destination's server certificate
  always. Host names are not checked: hospital peers are addressed by IP and rarely have
  one in their certificate; the CA bundle is what is trusted.

:class:`DicomTlsSocket` makes an :class:`ssl.SSLSocket` read the way the acceptor's
:class:`~appliance.net.ul.PduReader` reads a plain socket (kernel timeouts, MSG_WAITALL and
MSG_PEEK do not carry over to TLS), so deadlines, limits and streaming are the same code.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import select
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from appliance.config import Peer, TlsConfig
from appliance.errors import ConfigError

log = logging.getLogger(__name__)

#: BCP 195 (RFC 9325 4.2) cipher suites for TLS 1.2, in OpenSSL's names; DICOM PS3.15 B.9.
BCP195_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
))
#: The folder under DATA_DIR of the self-signed pair.
FOLDER = "tls"
#: Days the self-signed certificate is valid.
SELF_SIGNED_DAYS = 3650
#: The conventional DICOM TLS port (PS3.15 B.1, IANA "dicom-tls").
DICOM_TLS_PORT = 2762


def credentials(cfg: TlsConfig, data_dir: Path, common_name: str = "appliance") -> TlsConfig:
    """``cfg`` with a certificate and key: its own, else the self-signed pair in
    ``DATA_DIR/tls/`` (made now if it is not there). Raise ConfigError if it cannot be made."""
    if cfg.certificate:
        return cfg
    folder = data_dir / FOLDER
    cert, key = folder / "self-signed.pem", folder / "self-signed.key"
    if not (cert.exists() and key.exists()):
        _make_self_signed(folder, cert, key, common_name)
    return replace(cfg, certificate=str(cert), private_key=str(key))


def _make_self_signed(folder: Path, cert: Path, key: Path, common_name: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError("no certificate is configured ([tls] certificate, private_key) and the openssl command "
                          "that makes a self-signed one is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tkey, tcert = Path(tmp) / "key", Path(tmp) / "cert"
        cn = "".join(c for c in common_name if c.isalnum() or c in "_-. ") or "appliance"
        r = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256",
                            "-days", str(SELF_SIGNED_DAYS), "-subj", f"/CN={cn}",
                            "-keyout", str(tkey), "-out", str(tcert)],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise ConfigError(f"cannot make a self-signed certificate: {r.stderr.strip().splitlines()[-1:]}")
        os.chmod(tkey, 0o600)
        os.chmod(tcert, 0o644)
        os.replace(tkey, key)  # the key first: a certificate is only there with its key
        os.replace(tcert, cert)
    log.info("made a self-signed TLS certificate for CN=%s in %s (SHA-256 %s)", cn, cert,
             fingerprint_of_pem(cert))


#: Days before its end at which a certificate is reported in status.
EXPIRY_WARNING_DAYS = 30


def not_after(path: Path) -> datetime | None:
    """When the first certificate in the PEM file ``path`` ends (UTC), or None if unreadable."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    try:
        r = subprocess.run([openssl, "x509", "-noout", "-enddate", "-in", str(path)], capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0 or not r.stdout.startswith("notAfter="):
        return None
    try:
        return datetime.strptime(r.stdout.strip()[len("notAfter="):], "%b %d %H:%M:%S %Y %Z").replace(
            tzinfo=timezone.utc)
    except ValueError:
        return None


def expiry_problems(cfg: TlsConfig, data_dir: Path, now: datetime | None = None) -> list[str]:
    """The box's own certificate, in words, if it has ended or ends within EXPIRY_WARNING_DAYS
    (nothing if TLS was never set up: no certificate configured and none made)."""
    path = Path(cfg.certificate) if cfg.certificate else data_dir / FOLDER / "self-signed.pem"
    if not path.exists():
        return []
    end = not_after(path)
    if end is None:
        return [f"the TLS certificate {path} cannot be read; peers cannot verify the box"]
    left = end - (now or datetime.now(timezone.utc))
    if left.total_seconds() <= 0:
        return [f"the TLS certificate {path} ended on {end:%Y-%m-%d}: TLS peers refuse the box; "
                "install a new certificate (see README, Security)"]
    if left.days < EXPIRY_WARNING_DAYS:
        return [f"the TLS certificate {path} ends on {end:%Y-%m-%d}, in {left.days} day(s): install a new "
                "one before then (see README, Security)"]
    return []


def fingerprint_of_pem(path: Path) -> str:
    """The SHA-256 fingerprint of the first certificate in the PEM file ``path`` (AA:BB:...)."""
    der = ssl.PEM_cert_to_DER_cert(path.read_text())
    return _colons(hashlib.sha256(der).hexdigest())


def _colons(hexdigest: str) -> str:
    return ":".join(hexdigest[i:i + 2] for i in range(0, len(hexdigest), 2)).upper()


def _base(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.sslsocket_class = DicomTlsSocket
    return ctx


def _load(ctx: ssl.SSLContext, cfg: TlsConfig, chain: bool) -> None:
    try:
        if chain:
            ctx.load_cert_chain(cfg.certificate, cfg.private_key)
        if cfg.ca_certificates:
            ctx.load_verify_locations(cafile=cfg.ca_certificates)
    except FileNotFoundError as exc:
        raise ConfigError(f"TLS: {exc.filename or 'a certificate file'} does not exist") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"TLS: cannot load the certificate, key or CA bundle ({describe(exc)}); check "
                          "[tls] certificate, private_key and ca_certificates (PEM files)") from None


def server_context(cfg: TlsConfig, peers: tuple[Peer, ...] = ()) -> ssl.SSLContext:
    """The TLS context of the Storage SCP's TLS port (``cfg`` with its certificate, see
    :func:`credentials`). A client certificate is asked for when there are CAs to check it
    against, and required with ``require_client_certificate``."""
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load(ctx, cfg, chain=True)
    if cfg.require_client_certificate:
        if not cfg.ca_certificates:
            raise ConfigError("tls.require_client_certificate needs tls.ca_certificates to check them against")
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif cfg.ca_certificates:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    elif any(p.needs_certificate for p in peers):
        raise ConfigError("a [[peer]] names a certificate, which needs tls.ca_certificates (the CA that signed "
                          "it, or the certificate itself) to be checked")
    return ctx


def client_context(cfg: TlsConfig, mutual: bool) -> ssl.SSLContext:
    """The client AE's TLS context: the server verified against ``cfg.ca_certificates``;
    with ``mutual``, our certificate presented."""
    if not cfg.ca_certificates:
        raise ConfigError("a TLS destination needs tls.ca_certificates to verify its certificate")
    ctx = _base(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, cfg, chain=mutual)
    return ctx


@dataclass(frozen=True)
class PeerCertificate:
    """What a TLS peer presented: its certificate's subject (``CN=...,O=...``, as ordered in
    the certificate) and SHA-256 fingerprint; empty when it presented none."""

    subject: str = ""
    sha256: str = ""

    @classmethod
    def of(cls, sock: ssl.SSLSocket) -> PeerCertificate:
        der = sock.getpeercert(binary_form=True)
        if not der:
            return cls()
        info = sock.getpeercert() or {}
        rdns = [f"{_SHORT.get(str(pair[0]), str(pair[0]))}={pair[1]}"
                for rdn in info.get("subject", ()) for pair in rdn]
        return cls(",".join(rdns), _colons(hashlib.sha256(der).hexdigest()))

    def matches(self, peer: Peer) -> bool:
        """True if this certificate is the one ``peer`` names (or it names none)."""
        if peer.certificate_sha256:
            want = peer.certificate_sha256.replace(":", "").upper()
            if self.sha256.replace(":", "") != want:
                return False
        if peer.certificate_subject:
            if not self.subject:
                return False
            want_s = peer.certificate_subject.strip()
            mine = {tuple(part.split("=", 1)) for part in self.subject.split(",")}
            if "=" in want_s:
                return {tuple(p.strip().split("=", 1)) for p in want_s.split(",")} == mine
            return (("CN", want_s)) in mine
        return True


#: Alerts a peer sends when it refuses us, in words.
_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate (a destination: tls = \"mutual\")",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the peer refused the handshake (no common protocol or cipher suite, or it "
                                     "requires a client certificate)",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust the CA of our certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate has expired",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer does not speak TLS 1.2 or later",
}

_SHORT = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
          "localityName": "L", "stateOrProvinceName": "ST", "emailAddress": "emailAddress"}


def describe(exc: BaseException) -> str:
    """A TLS failure in words: OpenSSL's reason (``certificate verify failed: unable to get
    local issuer certificate``), a plain client on the TLS port, or a timeout."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").replace("_", " ").lower()
        if exc.reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"):
            return f"not a TLS client hello ({reason}): a plain DICOM peer on the TLS port?"
        if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "the client presented no certificate, and one is required"
        if exc.reason in _ALERTS:
            return _ALERTS[exc.reason]
        return reason or str(exc)
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


class DicomTlsSocket(ssl.SSLSocket):
    """An SSLSocket that reads as the acceptor reads a plain socket: a receive timeout set
    as SO_RCVTIMEO/SO_SNDTIMEO becomes the socket's timeout, whose expiry raises
    BlockingIOError as the kernel's does; MSG_WAITALL is dropped (the reader loops on short
    reads anyway); ``recv(1, MSG_PEEK | MSG_DONTWAIT)`` answers whether something has
    arrived without reading it; ``shutdown`` wakes a blocked reader without tearing the
    TLS state from under it."""

    def recv_into(self, buffer: Any, nbytes: int | None = None, flags: int = 0) -> int:
        try:
            return super().recv_into(buffer, nbytes or 0, flags & ~socket.MSG_WAITALL)
        except TimeoutError:
            raise BlockingIOError(errno.EAGAIN, "timed out") from None

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        if flags & socket.MSG_PEEK:
            if self.pending():
                return b"\x00"
            readable, _, _ = select.select([self.fileno()], [], [], 0)
            if not readable:
                raise BlockingIOError(errno.EAGAIN, "nothing has arrived")
            return b"\x00"
        try:
            return super().recv(buflen, flags)
        except TimeoutError:
            raise BlockingIOError(errno.EAGAIN, "timed out") from None

    def setsockopt(self, level: int, optname: int, value: Any, *rest: Any) -> None:
        if level == socket.SOL_SOCKET and optname in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO) \
                and isinstance(value, bytes):
            sec, usec = struct.unpack("ll", value)
            self.settimeout(sec + usec / 1e6 or None)
            return
        super().setsockopt(level, optname, value, *rest)

    def shutdown(self, how: int) -> None:
        socket.socket.shutdown(self, how)
