"""DICOM TLS and known peers with real peers: DCMTK storescu/echoscu/storescp with +tls, our
client AE, raw sockets; certificates made with the openssl command in tmp_path."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import pytest

from appliance import tls
from appliance.config import Destination, Peer, ScpConfig, StoreConfig, TlsConfig
from appliance.errors import NetworkError
from appliance.net.scp import StorageServer
from appliance.net.sender import ClientSettings, echo
from appliance.store.ingest import Ingest
from appliance.store.store import Store
from helpers import ct_series, dcmtk, free_port, run, wait_for, write_series

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pki:
    """A CA, a server and a client certificate it signed, and a client certificate of another CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path
    #: Signed by the CA, valid for one day in 2020.
    expired_cert: Path
    expired_key: Path


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", str(key), "-out", str(cert))
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    cert, key, csr = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", f"/O=Hospital/CN={name}",
            "-keyout", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-days", "2", "-sha256", "-out", str(cert))
    return cert, key


def _expired(folder: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A certificate of ``ca`` that expired long ago (``openssl ca`` with a start and end date)."""
    cert, key, csr = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", f"/CN={name}", "-keyout", str(key),
            "-out", str(csr))
    (folder / "index.txt").write_text("")
    (folder / "serial").write_text("1000\n")
    conf = folder / "ca.cnf"
    conf.write_text(f"[ca]\ndefault_ca = d\n[d]\ndatabase = {folder / 'index.txt'}\nnew_certs_dir = {folder}\n"
                    f"serial = {folder / 'serial'}\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n")
    openssl("ca", "-batch", "-config", str(conf), "-cert", str(ca[0]), "-keyfile", str(ca[1]), "-in", str(csr),
            "-out", str(cert), "-startdate", "20200101000000Z", "-enddate", "20200102000000Z", "-notext")
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "Test CA")
    other = _ca(d, "Other CA")
    server = _leaf(d, "ELEKTA_STORAGE", ca)
    client = _leaf(d, "CT_SIM", ca)
    stranger = _leaf(d, "CT_SIM_FAKE", other)
    expired = _expired(d, "CT_SIM_2020", ca)
    return Pki(ca[0], *server, *client, *stranger, *expired)


class TlsServer:
    def __init__(self, data_dir: Path, scp: ScpConfig, tls_cfg: TlsConfig, peers: tuple[Peer, ...] = ()) -> None:
        self.store = Store(data_dir)
        self.store.open_for_service()
        self.server = StorageServer(scp, Ingest(self.store, StoreConfig(min_free_mb=0)))
        creds = tls.credentials(tls_cfg, data_dir)
        self.server.secure(tls.server_context(creds, peers), peers=peers)
        where = self.server.start()
        self.port, self.tls_port, self.ae_title = where.port, where.tls_port, scp.ae_title
        self.data_dir = data_dir

    def audit(self) -> list[dict]:  # type: ignore[type-arg]
        path = self.data_dir / "audit" / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def associations(self) -> list[dict]:  # type: ignore[type-arg]
        return [e for e in self.audit() if e["event"] == "Network Entry"]

    def stop(self) -> None:
        self.server.stop(grace=2)
        self.store.close()


@pytest.fixture
def make_tls_server(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[TlsServer] = []

    def make(tls_cfg: TlsConfig, peers: tuple[Peer, ...] = (), **scp: object) -> TlsServer:
        # Both ports picked by the kernel as they are bound (a number from free_port() could be
        # taken by another socket before the server binds it: seen once in CI).
        cfg = replace(ScpConfig(), bind="127.0.0.1", port=0, tls_port=0, **scp)  # type: ignore[arg-type]
        srv = TlsServer(tmp_path / f"data{len(started)}", cfg, tls_cfg, peers)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


def server_tls(pki: Pki, **kw: object) -> TlsConfig:
    return TlsConfig(certificate=str(pki.server_cert), private_key=str(pki.server_key),
                     ca_certificates=str(pki.ca), **kw)  # type: ignore[arg-type]


def storescu_tls(srv: TlsServer, files: list[Path], *tls_opts: str,
                 aet: str = "CT_SIM") -> subprocess.CompletedProcess[str]:
    return run([dcmtk("storescu"), "-to", "10", "-aet", aet, "-aec", srv.ae_title, *tls_opts,
                "127.0.0.1", str(srv.tls_port), *map(str, files)], timeout=120)


# -- our SCP, DCMTK clients -------------------------------------------------------------------


def test_storescu_with_a_client_certificate_stores_over_tls(make_tls_server, pki, tmp_path):
    srv = make_tls_server(server_tls(pki, require_client_certificate=True))
    files = write_series(ct_series(3), tmp_path / "ct")
    r = storescu_tls(srv, files, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
    assert r.returncode == 0, r.stderr
    assert len(srv.store.instance_listing()) == 3
    events = wait_for(srv.associations, what="the association in the audit trail")
    e = events[-1]
    assert e["outcome"] == 0
    assert "3 object(s) stored" in e["detail"] and "TLSv1." in e["detail"]
    assert "CN=CT_SIM" in e["detail"]
    assert e["participants"][0] == {"role": "source", "ae": "CT_SIM", "address": "127.0.0.1", "requestor": True}


def echoscu_tls(srv: TlsServer, *opts: str, aet: str = "CT_SIM",
                port: int | None = None) -> subprocess.CompletedProcess[str]:
    return run([dcmtk("echoscu"), "-to", "5", "-aet", aet, "-aec", srv.ae_title, *opts, "127.0.0.1",
                str(port or srv.tls_port)])


def test_anonymous_tls_client_without_a_certificate(make_tls_server, pki, tmp_path):
    srv = make_tls_server(server_tls(pki))
    r = echoscu_tls(srv, "+tla", "+cf", str(pki.ca))
    assert r.returncode == 0, r.stderr
    e = wait_for(srv.associations, what="the association in the audit trail")[-1]
    assert e["outcome"] == 0 and "no client certificate" in e["detail"]


def test_a_client_certificate_required_absent_or_of_another_ca_is_refused_in_one_line(make_tls_server, pki, caplog):
    srv = make_tls_server(server_tls(pki, require_client_certificate=True))
    caplog.set_level(logging.INFO, logger="appliance.net.acceptor")
    r = echoscu_tls(srv, "+tla", "+cf", str(pki.ca))
    assert r.returncode != 0
    r = echoscu_tls(srv, "+tls", str(pki.stranger_key), str(pki.stranger_cert), "+cf", str(pki.ca))
    assert r.returncode != 0
    r = echoscu_tls(srv, "+tls", str(pki.expired_key), str(pki.expired_cert), "+cf", str(pki.ca))
    assert r.returncode != 0
    events = wait_for(lambda: len(srv.associations()) >= 3 and srv.associations(), what="three refusals audited")
    assert all(e["outcome"] == 8 and e["outcome_text"].startswith("refused: TLS handshake failed") for e in events)
    lines = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(lines) == 3, lines
    assert "the client presented no certificate, and one is required" in lines[0], lines[0]
    assert "certificate verify failed: unable to get local issuer certificate" in lines[1] and "127.0.0.1" in lines[1]
    assert "certificate verify failed: certificate has expired" in lines[2], lines[2]
    # The SCP keeps serving.
    r = echoscu_tls(srv, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
    assert r.returncode == 0, r.stderr


def test_a_client_that_does_not_trust_our_certificate_gives_up(make_tls_server, pki, tmp_path):
    srv = make_tls_server(server_tls(pki))
    r = echoscu_tls(srv, "+tla")  # no CA: DCMTK cannot verify our certificate
    assert r.returncode != 0
    r = echoscu_tls(srv, "+tla", "-ic")  # ignoring the check, it may associate
    assert r.returncode == 0, r.stderr


def test_plain_client_on_the_tls_port_and_tls_client_on_the_plain_port_fail_cleanly(make_tls_server, pki, caplog):
    srv = make_tls_server(server_tls(pki), acse_timeout=3.0)
    caplog.set_level(logging.INFO, logger="appliance.net.acceptor")
    r = echoscu_tls(srv)  # plain DICOM on the TLS port
    assert r.returncode != 0
    line = wait_for(lambda: [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()],
                    what="the log line")
    assert len(line) == 1 and "not a TLS client hello" in line[0] and "127.0.0.1" in line[0], line
    r = echoscu_tls(srv, "+tla", "+cf", str(pki.ca), port=srv.port)  # TLS on the plain port
    assert r.returncode != 0
    bad = wait_for(lambda: [r.getMessage() for r in caplog.records if "PDU type 0x16" in r.getMessage()],
                   what="the plain port's log line")
    assert len(bad) == 1, bad
    # Both ports keep serving.
    assert echoscu_tls(srv, port=srv.port).returncode == 0
    assert echoscu_tls(srv, "+tla", "+cf", str(pki.ca)).returncode == 0


def test_handshake_deadline_and_network_timeout_hold_over_tls(make_tls_server, pki, tmp_path, caplog):
    from helpers import associate_rq_pdu, read_pdu

    srv = make_tls_server(server_tls(pki), acse_timeout=1.0, network_timeout=1.0)
    caplog.set_level(logging.INFO, logger="appliance.net.acceptor")
    # A connection that never says hello holds no slot, and the accept loop goes on meanwhile.
    silent = socket.create_connection(("127.0.0.1", srv.tls_port))
    files = write_series(ct_series(2), tmp_path / "ct")
    r = storescu_tls(srv, files, "+tla", "+cf", str(pki.ca))
    assert r.returncode == 0, r.stderr
    silent.settimeout(5)
    assert silent.recv(100) == b"", "closed at the handshake deadline"
    silent.close()
    assert any("no TLS handshake within 1 s" in r.getMessage() for r in caplog.records)
    # Inside a TLS association, network_timeout of silence gets A-ABORT, as on the plain port.
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.check_hostname = False
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.tls_port), timeout=5)) as s:
        s.sendall(associate_rq_pdu(called=srv.ae_title))
        assert read_pdu(s)[0] == 0x02  # A-ASSOCIATE-AC
        assert read_pdu(s)[0] == 0x07  # A-ABORT after a second of silence
    wait_for(lambda: srv.server.active() == 0, what="the slot freed")


# -- known peers ------------------------------------------------------------------------------


def _fingerprint(cert: Path) -> str:
    return tls.fingerprint_of_pem(cert)


def test_known_peers_unknown_title_wrong_address_wrong_certificate_refused(make_tls_server, pki, caplog):
    peers = (
        Peer("CT_SIM", ("127.0.0.0/8",), certificate_sha256=_fingerprint(pki.client_cert)),
        Peer("MR_ROOM", ("10.1.2.3",)),
        Peer("CONSOLE", ("127.0.0.1",)),
        Peer("PLANNING", (), certificate_subject="CT_SIM"),
    )
    srv = make_tls_server(server_tls(pki), peers, require_known_peers=True)
    caplog.set_level(logging.INFO, logger="appliance.net.acceptor")
    mine = ("+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
    other = ("+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca))  # same CA, not CT_SIM's
    assert echoscu_tls(srv, *mine).returncode == 0  # known, at its address, with its certificate
    assert echoscu_tls(srv, port=srv.port, aet="CONSOLE").returncode == 0  # known, no certificate named
    assert echoscu_tls(srv, *mine, aet="PLANNING").returncode == 0  # its subject's CN
    refused = {
        "STRANGER": echoscu_tls(srv, port=srv.port, aet="STRANGER"),
        "MR_ROOM": echoscu_tls(srv, port=srv.port, aet="MR_ROOM"),
        "CT_SIM plain": echoscu_tls(srv, port=srv.port, aet="CT_SIM"),
        "CT_SIM other cert": echoscu_tls(srv, *other),
        "PLANNING other cert": echoscu_tls(srv, *other, aet="PLANNING"),
    }
    for what, r in refused.items():
        assert r.returncode != 0, what
        # A-ASSOCIATE-RJ rejected-permanent, service user, calling AE title not recognized.
        assert "Association Rejected" in r.stderr and "Calling AE Title Not Recognized" in r.stderr, (what, r.stderr)
    events = wait_for(lambda: len(srv.associations()) >= 8 and srv.associations(), what="8 audited associations")
    texts = [e.get("outcome_text", "") for e in events if e["outcome"] != 0]
    assert len(texts) == 5, texts
    assert any("'STRANGER' is not a known peer" in t for t in texts)
    assert any("'MR_ROOM' is a known peer, but at 10.1.2.3, not at 127.0.0.1" in t for t in texts)
    assert any("came without TLS" in t for t in texts)
    assert sum("is not its own" in t for t in texts) == 2
    logged = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(logged) == 5 and all("127.0.0.1" in m for m in logged), logged
    # The supervisor's own C-ECHO from loopback is always known, and not audited.
    assert echoscu_tls(srv, port=srv.port, aet="APPLIANCE_CHECK").returncode == 0
    assert len(srv.associations()) == 8


def test_known_peers_config_is_validated():
    from appliance import config
    from appliance.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        config.from_dict({"scp": {"require_known_peers": True, "tls_port": 2762},
                          "peer": [{"ae_title": "CT_SIM", "addresses": ["10.0.0.300"], "certificate_sha256": "xyz"}],
                          "destinations": {"P": {"ae_title": "P", "host": "h", "tls": "maybe"}}})
    text = str(e.value)
    assert "address '10.0.0.300' is not an IP address or network" in text
    assert "certificate_sha256 is not a SHA-256 fingerprint" in text
    assert "destinations.P.tls 'maybe' is not one of plain, tls, mutual" in text
    with pytest.raises(ConfigError) as e:
        config.from_dict({"scp": {"tls_only": True, "bind": "192.168.1.5"}})
    assert "scp.tls_only is true but scp.tls_port is 0" in str(e.value)
    assert "scp.tls_only needs scp.bind 0.0.0.0 or ::" in str(e.value)
    cfg = config.from_dict({"scp": {"require_known_peers": True, "tls_port": 2762},
                            "tls": {"ca_certificates": "/etc/ca.pem"},
                            "peer": [{"ae_title": "CT_SIM", "addresses": ["10.0.4.0/24"]}],
                            "destinations": {"P": {"ae_title": "P", "host": "h", "tls": "mutual"}}})
    assert config.from_dict(config.to_dict(cfg)) == cfg


# -- our client AE, DCMTK storescp +tls --------------------------------------------------------


@pytest.fixture
def storescp_tls(tmp_path: Path, pki: Pki) -> Iterator:  # type: ignore[type-arg]
    procs: list[subprocess.Popen[bytes]] = []

    def start(require_client: bool, cert: tuple[Path, Path] | None = None) -> tuple[int, Path]:
        port, out = free_port(), tmp_path / f"storescp{len(procs)}"
        out.mkdir()
        cert_file, key_file = cert or (pki.server_cert, pki.server_key)
        opts = ["+tls", str(key_file), str(cert_file), "+cf", str(pki.ca)]
        if not require_client:
            opts.append("-ic")
        procs.append(subprocess.Popen([dcmtk("storescp"), "-aet", "PLANNING_AE", *opts, "-od", str(out), str(port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for(lambda: run([dcmtk("echoscu"), "-aec", "PLANNING_AE", "+tls", str(pki.client_key),
                              str(pki.client_cert), "+cf", str(pki.ca), "-ic", "127.0.0.1",
                              str(port)]).returncode == 0, what="storescp +tls to answer")
        return port, out

    yield start
    for p in procs:
        p.terminate()
        p.wait(10)


def client_tls(pki: Pki, ca: Path | None = None) -> ClientSettings:
    return ClientSettings(timeout=10, tls=TlsConfig(certificate=str(pki.client_cert), private_key=str(pki.client_key),
                                                    ca_certificates=str(ca or pki.ca)))


def test_our_echo_to_storescp_tls_with_and_without_our_certificate(storescp_tls, pki):
    port, _ = storescp_tls(require_client=False)
    assert "succeeded" in str(echo(Destination("PLANNING_AE", "127.0.0.1", port, "tls"), client_tls(pki)))
    port, _ = storescp_tls(require_client=True)
    assert "succeeded" in str(echo(Destination("PLANNING_AE", "127.0.0.1", port, "mutual"), client_tls(pki)))
    with pytest.raises(NetworkError) as e:  # it wants our certificate
        echo(Destination("PLANNING_AE", "127.0.0.1", port, "tls"), client_tls(pki))
    assert "the peer requires a client certificate" in str(e.value), e.value
    with pytest.raises(NetworkError) as e:  # a server our CA did not sign
        echo(Destination("PLANNING_AE", "127.0.0.1", port, "mutual"), client_tls(pki, ca=pki.stranger_cert))
    assert "TLS handshake with 127.0.0.1:" in str(e.value) and "certificate verify failed" in str(e.value)
    port2, _ = storescp_tls(require_client=False, cert=(pki.expired_cert, pki.expired_key))
    with pytest.raises(NetworkError) as e:  # the server's certificate has expired
        echo(Destination("PLANNING_AE", "127.0.0.1", port2, "tls"), client_tls(pki))
    assert "certificate verify failed: certificate has expired" in str(e.value)
    with pytest.raises(NetworkError) as e:  # plain DICOM to a TLS port
        echo(Destination("PLANNING_AE", "127.0.0.1", port), ClientSettings(timeout=5))


def test_appliance_echo_and_send_over_tls_to_storescp(storescp_tls, make_tls_server, pki, tmp_path, capsys):
    from appliance.cli import main
    from appliance.config import Config, save

    port, out = storescp_tls(require_client=True)
    srv = make_tls_server(server_tls(pki))  # the store to send from, filled over TLS
    files = write_series(ct_series(4), tmp_path / "ct")
    assert storescu_tls(srv, files, "+tla", "+cf", str(pki.ca)).returncode == 0
    cfg_path = tmp_path / "appliance.toml"
    save(Config(tls=TlsConfig(certificate=str(pki.client_cert), private_key=str(pki.client_key),
                              ca_certificates=str(pki.ca)),
                destinations={"PLANNING": Destination("PLANNING_AE", "127.0.0.1", port, "mutual")}), cfg_path)
    common = ["--config", str(cfg_path), "--data-dir", str(srv.data_dir)]
    assert main([*common, "echo", "--tls", "mutual", "-aec", "PLANNING_AE", "127.0.0.1", str(port)]) == 0
    assert "succeeded" in capsys.readouterr().out
    series = srv.store.series_listing()[0].series_uid
    assert main([*common, "send", "--to", "PLANNING", "--series", series]) == 0, capsys.readouterr()
    wait_for(lambda: len(list(out.iterdir())) == 4, what="4 objects at storescp")


def test_forwarding_over_tls_from_a_tls_association(storescp_tls, pki, tmp_path):
    from appliance import config
    from appliance.jobs.forwarder import Forwarder

    port, out = storescp_tls(require_client=True)
    cfg = config.from_dict({
        "scp": {"tls_port": free_port()},
        "tls": {"certificate": str(pki.server_cert), "private_key": str(pki.server_key),
                "ca_certificates": str(pki.ca)},
        "destinations": {"PLANNING": {"ae_title": "PLANNING_AE", "host": "127.0.0.1", "port": port, "tls": "mutual"}},
        "forward": [{"to": ["PLANNING"], "calling_ae": ["CT_SIM"]}],
    })
    srv = TlsServer(tmp_path / "box", replace(cfg.scp, bind="127.0.0.1", port=0), cfg.tls)
    srv.store.set_forwarding(cfg.forward)
    forwarder = Forwarder(srv.store, lambda: cfg, poll=0.1, backoff_first=0.2, backoff_most=1.0)
    forwarder.start()
    try:
        files = write_series(ct_series(5), tmp_path / "ct")
        r = storescu_tls(srv, files, "+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca))
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(list(out.iterdir())) == 5, timeout=30, what="5 objects forwarded over TLS")
    finally:
        forwarder.stop()
        srv.stop()


def test_tls_port_alone_uses_a_self_signed_certificate_made_once(make_tls_server, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    srv = make_tls_server(TlsConfig())
    cert, key = srv.data_dir / "tls" / "self-signed.pem", srv.data_dir / "tls" / "self-signed.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert not any("PRIVATE KEY" in r.getMessage() for r in caplog.records)
    r = echoscu_tls(srv, "+tla", "+cf", str(cert))
    assert r.returncode == 0, r.stderr
    before = cert.read_bytes()
    assert tls.credentials(TlsConfig(), srv.data_dir).certificate == str(cert)
    assert cert.read_bytes() == before


# -- appliance run: the TLS port handed over, rotated --------------------------------------------


def test_appliance_run_serves_tls_checks_itself_and_rotates_the_certificate(pki, tmp_path):
    import os
    import signal
    import sys

    port, tls_port = free_port(), free_port()
    conf = tmp_path / "appliance.toml"
    base = (f'[scp]\nport = {port}\ntls_port = {tls_port}\ntls_only = true\nrequire_known_peers = true\n'
            '[[peer]]\nae_title = "CT_SIM"\naddresses = ["127.0.0.1"]\n')
    conf.write_text(base)
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    log = tmp_path / "run.log"
    cmd = [sys.executable, "-m", "appliance", "--config", str(conf), "--data-dir", str(data)]
    proc = subprocess.Popen([*cmd, "-v", "run", "--runtime-dir", str(tmp_path / "run"), "--no-media"],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def echo_tls(*opts: str) -> bool:
        return run([dcmtk("echoscu"), "-to", "5", "-aet", "CT_SIM", "-aec", "ELEKTA_STORAGE", *opts,
                    "127.0.0.1", str(tls_port)]).returncode == 0

    try:
        wait_for(lambda: echo_tls("+tla", "-ic"), 60, "the TLS port of appliance run")
        assert not echo_tls("+tla", "+cf", str(pki.ca)), "the self-signed certificate is not the CA's"
        # The supervisor's own C-ECHO (APPLIANCE_CHECK, not a [[peer]]) is answered, on the plain
        # port, which with tls_only listens on loopback only; the TLS port on every address.
        status = json.loads(run([*cmd, "status", "--json", "--runtime-dir", str(tmp_path / "run")]).stdout)
        assert status["scp_answered"] is True, status
        listening = run(["ss", "-Htln"]).stdout if shutil.which("ss") else ""
        if listening:
            assert f"127.0.0.1:{port} " in listening and f"0.0.0.0:{port} " not in listening, listening
            assert f"0.0.0.0:{tls_port} " in listening, listening
        # Rotate: the CA's certificate, by the file and a reload; the SCP restarts on the same ports.
        conf.write_text(base + f'[tls]\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\n'
                               f'ca_certificates = "{pki.ca}"\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: echo_tls("+tla", "+cf", str(pki.ca)), 30, "the new certificate on the TLS port")
        assert "is not a known peer" not in log.read_text(), "the self-check echo was never refused"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        print(log.read_text())


def test_every_association_is_audited_with_its_outcome_plain_and_tls(make_tls_server, pki, tmp_path):
    from helpers import associate_rq_pdu, read_pdu

    srv = make_tls_server(server_tls(pki))
    files = write_series(ct_series(2), tmp_path / "ct")
    r = run([dcmtk("storescu"), "-aet", "CT_SIM", "-aec", srv.ae_title, "127.0.0.1", str(srv.port), *map(str, files)])
    assert r.returncode == 0, r.stderr
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:  # associates, then aborts
        s.sendall(associate_rq_pdu(called=srv.ae_title, calling="QUITTER"))
        assert read_pdu(s)[0] == 0x02
        s.sendall(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
    assert echoscu_tls(srv, "+tla", "+cf", str(pki.ca), aet="ECHOER").returncode == 0
    events = wait_for(lambda: len(srv.associations()) >= 3 and srv.associations(), what="three associations")
    by_ae = {e["participants"][0]["ae"]: e for e in events}
    stored = by_ae["CT_SIM"]
    assert stored["outcome"] == 0 and stored["participants"][1]["ae"] == "ELEKTA_STORAGE"
    assert stored["detail"] == "released; 2 object(s) stored; 2 C-STORE requests; no TLS"
    assert by_ae["QUITTER"]["outcome"] == 4 and "aborted by the peer" in by_ae["QUITTER"]["outcome_text"]
    assert by_ae["ECHOER"]["outcome"] == 0
    assert by_ae["ECHOER"]["detail"].startswith("released; 0 object(s) stored; C-ECHO; TLSv1.")
    from appliance import audit

    lines = [audit.line(e) for e in events]
    assert any("source QUITTER at 127.0.0.1" in x and "FAILED(4)" in x for x in lines), lines


def test_stopping_closes_a_tls_association_still_open(make_tls_server, pki):
    from helpers import associate_rq_pdu, read_pdu

    srv = make_tls_server(server_tls(pki))
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.check_hostname = False
    with ctx.wrap_socket(socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)) as s:
        s.sendall(associate_rq_pdu(called=srv.ae_title))
        assert read_pdu(s)[0] == 0x02
        srv.server.stop(grace=0.2)  # its thread is reading this connection: closed, not written to
        assert read_pdu(s) == (0, b"")
    assert srv.server.active() == 0


def test_a_certificate_ending_within_30_days_is_reported_in_words(tmp_path):
    from datetime import datetime, timedelta, timezone

    from appliance import tls
    from appliance.config import TlsConfig

    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "10", "-subj", "/CN=box",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    cfg = TlsConfig(certificate=str(cert), private_key=str(key))
    [soon] = tls.expiry_problems(cfg, tmp_path)
    assert "ends on" in soon and ("in 9 day(s)" in soon or "in 10 day(s)" in soon)
    [ended] = tls.expiry_problems(cfg, tmp_path, now=datetime.now(timezone.utc) + timedelta(days=11))
    assert "ended on" in ended and "TLS peers refuse the box" in ended
    assert tls.expiry_problems(cfg, tmp_path, now=datetime.now(timezone.utc) - timedelta(days=30)) == []
    assert tls.expiry_problems(TlsConfig(), tmp_path / "no-tls-yet") == [], "no TLS set up: nothing to say"


def test_the_self_check_probes_the_tls_port_with_a_handshake(tmp_path):
    import socket as socket_mod
    import ssl
    import threading

    from appliance.ops import health

    cert, key = tmp_path / "s.pem", tmp_path / "s.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=box",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    tls_listener = socket_mod.create_server(("127.0.0.1", 0))
    plain_listener = socket_mod.create_server(("127.0.0.1", 0))

    def serve_tls() -> None:
        conn, _ = tls_listener.accept()
        try:
            with server.wrap_socket(conn, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            conn.close()

    def serve_plain() -> None:  # accepts and says nothing TLS: a plain DICOM port
        conn, _ = plain_listener.accept()
        conn.recv(1024)
        conn.close()

    threads = [threading.Thread(target=serve_tls), threading.Thread(target=serve_plain)]
    for t in threads:
        t.start()
    try:
        assert health.tls_probe("127.0.0.1", tls_listener.getsockname()[1]) == ""
        problem = health.tls_probe("127.0.0.1", plain_listener.getsockname()[1], timeout=3)
        assert problem.startswith(f"the TLS port {plain_listener.getsockname()[1]} does not complete a TLS handshake")
    finally:
        for t in threads:
            t.join(10)
        tls_listener.close()
        plain_listener.close()
