"""The console's Security page (menu item t), driven in-process with text streams and the
file backend, with certificates made by ``openssl``:

* The box's self-signed certificate is shown with its subject, its end and its SHA-256
  fingerprint as ``openssl x509 -noout -fingerprint -sha256`` prints it; a configured one
  ending within 30 days with the warning. The page fits 80x24.
* The TLS port and require_known_peers are fields; known peers are added (in the file as a
  ``[[peer]]`` table), refused when the configuration refuses them (a bad AE title or
  address: its message, the file unchanged byte for byte) and removed.
* A certificate and key on a "stick" (a folder) are copied into DATA_DIR/tls/ (the key
  0600, never shown) and set as ``[tls]``; a mismatched pair and a key with a passphrase are
  refused and nothing is copied or written.
* ``appliance config set peer`` takes the whole list, as ``forward``.
* Over a real pty against a real ``appliance run``: the TLS port turned on at the console
  is served (DCMTK ``echoscu +tla``) with the certificate whose fingerprint the page shows; a
  known peer added and known peers required, the Storage SCP (restarted on them) answers
  that AE title and refuses another; an imported pair is what the TLS port then presents.
"""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
import tomllib
from datetime import datetime
from pathlib import Path

import pytest

from appliance import tls
from appliance.cli import main
from appliance.config import TlsConfig, load
from helpers import dcmtk, free_port, run, wait_for
from test_console import APPLIANCE, Setup, Terminal, has, keys, running  # noqa: F401 - running: a fixture
from test_supervisor import Appliance

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def make_pair(folder: Path, name: str, subject: str = "/CN=box-1/O=Hospital", days: int = 400,
              key_args: tuple[str, ...] = ("-nodes",)) -> tuple[Path, Path]:
    """A self-signed certificate and its key, ``folder/name.pem`` and ``folder/name.key``."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", *key_args, "-sha256", "-days", str(days),
                    "-subj", subject, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def openssl_fingerprint(cert: Path) -> str:
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256", "-in", str(cert)],
                         check=True, capture_output=True, text=True).stdout
    return out.strip().split("=", 1)[1]


def openssl_end(cert: Path) -> str:
    out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(cert)],
                         check=True, capture_output=True, text=True).stdout
    end = datetime.strptime(out.strip().split("=", 1)[1], "%b %d %H:%M:%S %Y %Z")
    return f"{end:%Y-%m-%d}"


def shown_fingerprint(text: str) -> str:
    m = re.search(r"\n  SHA-256 +(\S+)\n +(\S+)\n", text.replace("\r", ""))
    assert m, text
    return f"{m.group(1)}:{m.group(2)}"


def security_screens(text: str) -> list[list[str]]:
    """Each Security page as shown: its lines from the heading to the prompt."""
    screens = []
    for part in text.split("== Security ")[1:]:
        screens.append(["== Security " + part.split("\n", 1)[0], *part.split("Choice: ", 1)[0].split("\n")[1:]])
    return screens


def shows(text: str, phrase: str) -> bool:
    """``phrase`` is on the screen, perhaps wrapped, a long path broken anywhere."""
    return "".join(phrase.split()) in "".join(text.split())


def fits(text: str) -> bool:
    """Every line fits 79 columns (a prompt and what follows it share a line here: no echo)."""
    pieces = (p for line in text.splitlines() for p in re.split(r"(?:Choice|Folder|\[y/N\]): ", line))
    return all(len(p) <= 79 for p in pieces)


def peer_tables(path: Path) -> list[dict[str, object]]:
    tables: list[dict[str, object]] = tomllib.loads(path.read_text()).get("peer", [])
    return tables


def test_the_self_signed_certificate_with_its_fingerprint(setup: Setup) -> None:
    text, _rc = setup.console(keys("t", "0", "q"))
    assert has(text, "No certificate yet: the box makes a self-signed one when the TLS port is first on.")
    own = tls.credentials(TlsConfig(), setup.data)  # as the Storage SCP makes it at its first start
    cert = Path(own.certificate)
    text, rc = setup.console(keys("t", "0", "q"))
    assert rc == 0
    assert has(text, "This box's certificate: self-signed, made by the box; peers pin its fingerprint.")
    assert shown_fingerprint(text) == openssl_fingerprint(cert)
    assert re.search(r"\n  Subject +CN=appliance\n", text)
    assert has(text, f"Ends      {openssl_end(cert)}, in 36")  # ten years
    assert shows(text, f"File {cert}")
    assert "Warning" not in text
    screens = security_screens(text)
    assert screens and all(len(s) + 1 <= 24 for s in screens), screens  # with the prompt's line
    assert fits(text)


def test_a_configured_certificate_ending_soon_is_warned_of(setup: Setup) -> None:
    cert, key = make_pair(setup.tmp / "ca", "box", days=10)
    setup.config.write_text(f'[scp]\nport = 11112\n\n[tls]\ncertificate = "{cert}"\nprivate_key = "{key}"\n')
    text, _rc = setup.console(keys("t", "0", "q"))
    assert has(text, "This box's certificate ([tls] certificate), self-signed; peers pin its fingerprint:")
    assert re.search(r"\n  Subject +CN=box-1,O=Hospital\n", text)
    assert shown_fingerprint(text) == openssl_fingerprint(cert)
    assert has(text, f"Ends      {openssl_end(cert)}, in 9 day(s)")
    warning = f"Warning: the TLS certificate {cert} ends on {openssl_end(cert)}, in 9 day(s): install a new one"
    assert shows(text, warning)
    assert fits(text)


def test_tls_port_and_require_known_peers(setup: Setup) -> None:
    text, _rc = setup.console(keys("t", "1", "99999", "1", "2762", "2", "y", "0", "q"))
    assert has(text, "Not saved: TLS port 99999 is out of range; allowed: 0 to 65535")
    assert has(text, "Not saved: scp.require_known_peers is true but no [[peer]] is configured; every association "
                     "would be refused")
    cfg = load(setup.config)
    assert (cfg.scp.tls_port, cfg.scp.require_known_peers) == (2762, False)
    text, _rc = setup.console(keys("t", "1", "0", "0", "q"))
    assert load(setup.config).scp.tls_port == 0


def add_peer(*answers: str) -> list[str]:
    """The keys of 'a' on the Known peers page: AE title, addresses, subject, fingerprint."""
    return ["a", *answers, *[""] * (4 - len(answers))]


def test_peers_added_refused_removed(setup: Setup) -> None:
    text, _rc = setup.console(keys("t", "p", *add_peer("CT_SIM", "192.168.1.31, 10.0.4.0/24"), "0", "0", "q"))
    assert has(text, "Peer 1: CT_SIM from 192.168.1.31, 10.0.4.0/24")
    assert peer_tables(setup.config) == [{"ae_title": "CT_SIM", "addresses": ["192.168.1.31", "10.0.4.0/24"]}]
    assert has(text, "Known peers (1): list, add, remove")

    before = setup.config.read_bytes()
    text, _rc = setup.console(keys("t", "p",
                                   *add_peer("CT_SCANNER_ROOM_01"),
                                   *add_peer("MR_1", "10.0.4.0/33"),
                                   *add_peer("MR_1", "192.168.1.300"),
                                   *add_peer("MR_1", "", "", "AB:CD"),
                                   *add_peer("MR_1", "", "CN=mr-1"),  # a certificate without a CA to check it
                                   "0", "0", "q"))
    assert has(text, "Not saved: peer 2: ae_title 'CT_SCANNER_ROOM_01' is 18 characters; the limit is 16")
    assert has(text, "Not saved: peer 2: address '10.0.4.0/33' is not an IP address or network; use e.g. "
                     "192.168.1.20 or 10.0.4.0/24")
    assert has(text, "address '192.168.1.300' is not an IP address or network")
    assert has(text, "Not saved: peer 2: certificate_sha256 is not a SHA-256 fingerprint")
    assert has(text, "Not saved: a peer that names a certificate needs tls.ca_certificates")
    assert setup.config.read_bytes() == before

    # Known peers required; the last one cannot be removed then; another added, the first removed.
    text, _rc = setup.console(keys("t", "2", "y", "p", "r", "1",
                                   *add_peer("MR_1", "10.0.5.7"), "r", "1", "y", "0", "0", "q"))
    assert has(text, "Required (Security, field 2): only these may associate, from these addresses.")
    assert has(text, "Not saved: it is the last known peer and known peers are required")
    assert has(text, "Peer 2: MR_1 from 10.0.5.7")
    cfg = load(setup.config)
    assert cfg.scp.require_known_peers
    assert peer_tables(setup.config) == [{"ae_title": "MR_1", "addresses": ["10.0.5.7"]}]


def test_a_certificate_and_key_imported_from_a_stick(setup: Setup) -> None:
    stick = setup.tmp / "stick"
    cert, key = make_pair(stick, "box-1")
    (stick / "notes.txt").write_text("not a certificate\n")
    text, rc = setup.console(keys("t", "i", str(stick), "y", "0", "q"))
    assert rc == 0
    assert has(text, "box-1.pem with the key box-1.key (they match):")
    cfg = load(setup.config)
    new_cert, new_key = Path(cfg.tls.certificate), Path(cfg.tls.private_key)
    assert new_cert.parent == new_key.parent == (setup.data / "tls").absolute()
    assert new_cert.read_bytes() == cert.read_bytes() and new_key.read_bytes() == key.read_bytes()
    assert stat.S_IMODE(new_key.stat().st_mode) == 0o600
    assert shows(text, f"Installed as {new_cert} (key {new_key.name}, mode 0600).")
    # The page now shows the imported certificate; the key is never shown.
    assert shown_fingerprint(text.rsplit("Installed as", 1)[1]) == openssl_fingerprint(cert)
    body = [line for line in key.read_text().splitlines() if line and not line.startswith("-----")]
    assert not any(line in text for line in body)
    assert "PRIVATE KEY" not in text
    assert fits(text)


def test_a_mismatched_pair_or_a_locked_key_is_refused(setup: Setup) -> None:
    one = setup.tmp / "one"
    make_pair(one, "box-1")
    other_cert, other_key = make_pair(setup.tmp / "two", "box-2")
    shutil.copy(other_key, one / "box-2.key")  # the stick holds box-1.pem, box-1.key and box-2.key
    (one / "box-1.key").unlink()
    locked = setup.tmp / "locked"
    make_pair(locked, "box-3", key_args=("-passout", "pass:secret"))
    before = setup.config.read_bytes()
    text, _rc = setup.console(keys("t", "i", str(one), "i", str(locked), "i", str(setup.tmp / "nowhere"),
                                   "i", str(setup.tmp / "two"), "n", "0", "q"))
    assert has(text, "Not saved: the key box-2.key is not the key of the certificate box-1.pem: they do not match")
    assert has(text, "Not saved: the key box-3.key is protected by a passphrase; the box needs it without one")
    assert shows(text, f"Not saved: {setup.tmp / 'nowhere'} is not a folder; give the stick's mount point")
    assert has(text, "Not installed.")
    assert setup.config.read_bytes() == before
    assert not (setup.data / "tls").exists() or not any((setup.data / "tls").glob("imported-*"))


def test_config_set_peer_takes_the_whole_list(setup: Setup, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--config", str(setup.config), "--data-dir", str(setup.data), "config", "--runtime-dir",
            str(setup.runtime)]
    assert main([*base, "get", "peer"]) == 0  # none: an empty list
    assert capsys.readouterr().out.strip() == ""
    assert main([*base, "set", "peer", '[{ae_title = "CT_SIM", addresses = ["192.168.1.31"]}]']) == 0
    assert peer_tables(setup.config) == [{"ae_title": "CT_SIM", "addresses": ["192.168.1.31"]}]
    assert main([*base, "get", "peer"]) == 0
    assert "'ae_title': 'CT_SIM'" in capsys.readouterr().out
    before = setup.config.read_bytes()
    assert main([*base, "set", "peer", '[{ae_title = "CT_SIM", addresses = ["nowhere"]}]']) == 1
    assert "address 'nowhere' is not an IP address or network" in capsys.readouterr().err
    assert main([*base, "set", "peer", "CT_SIM"]) == 1
    assert "peer takes the whole list of [[peer]] tables" in capsys.readouterr().err
    assert setup.config.read_bytes() == before
    assert main([*base, "set", "peer", "[]"]) == 0
    assert peer_tables(setup.config) == []


def served_fingerprint(port: int) -> str:
    """The SHA-256 fingerprint of the certificate the TLS port at ``port`` presents."""
    hello = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}"], input="", capture_output=True,
                           text=True, timeout=30)
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", hello.stdout, re.S)
    assert pem, hello.stdout + hello.stderr
    out = subprocess.run(["openssl", "x509", "-noout", "-fingerprint", "-sha256"], input=pem.group(0),
                         capture_output=True, text=True, check=True).stdout
    return out.strip().split("=", 1)[1]


def echo(port: int, aet: str, *tls_args: str) -> bool:
    return run([dcmtk("echoscu"), "-to", "5", *tls_args, "-aet", aet, "-aec", "ELEKTA_STORAGE", "127.0.0.1",
                str(port)]).returncode == 0


def test_pty_security_page_against_the_running_appliance(running: Appliance, tmp_path: Path) -> None:
    wait_for(lambda: running.notify.seen("READY", "1"), 60, "READY=1")
    port, tls_port = load(running.config).scp.port, free_port()
    t = Terminal([*APPLIANCE, "--config", str(running.config), "--data-dir", str(running.data), "console",
                  "--runtime-dir", str(running.runtime), "--no-journal"])
    try:
        t.answer((("Choice: ", "t"), ("Choice: ", "1"), (r"New TLS port \(Enter keeps 0\): ", str(tls_port))))
        t.expect(r"Saved: scp.tls_port = \d+ applied")
        page = t.expect("Choice: ")
        assert echo(tls_port, "ANY", "+tla", "-ic")
        shown = shown_fingerprint(page)
        assert shown == served_fingerprint(tls_port) == openssl_fingerprint(running.data / "tls" / "self-signed.pem")

        # A known peer, then known peers required: the restarted SCP answers CT_SIM only.
        t.type("p")
        t.answer((("Choice: ", "a"), ("AE title: ", "CT_SIM"), (r"Addresses \(Enter: any\): ", "127.0.0.1"),
                  (r"Certificate subject \(Enter: any\): ", ""), (r"Certificate SHA-256 \(Enter: any\): ", "")))
        t.expect("Saved: applied: the Storage SCP checks associations against them from now on")
        t.answer((("Choice: ", "0"), ("Choice: ", "2"), (r"New Require known peers \(Enter keeps no\): ", "y")))
        t.expect("Saved: scp.require_known_peers = true applied")
        t.expect("Choice: ")
        assert echo(port, "CT_SIM") and echo(tls_port, "CT_SIM", "+tla", "-ic")
        assert not echo(port, "STRANGER")
        assert [p.ae_title for p in load(running.config).peer] == ["CT_SIM"]

        # A pair from a stick: the TLS port presents it once the SCP restarted on it.
        cert, _key = make_pair(tmp_path / "stick", "box-1")
        t.type("i")
        t.answer((("Folder: ", str(tmp_path / "stick")), (r"\[y/N\]: ", "y")))
        t.expect("Installed as ")
        page = t.expect("Choice: ")
        assert shown_fingerprint(page) == openssl_fingerprint(cert) == served_fingerprint(tls_port)
        assert echo(tls_port, "CT_SIM", "+tla", "-ic")
        t.answer((("", "0"), ("Choice: ", "q")))
        t.proc.wait(10)
    finally:
        t.close()
