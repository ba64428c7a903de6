"""Query/Retrieve SCP (issue 20): C-FIND in the Patient Root and Study Root models, C-MOVE
to configured destinations and C-GET, with real peers (DCMTK findscu, movescu, storescp,
getscu; pynetdicom
where a test needs a character set, the counts of each response or a C-CANCEL at a moment
of its choosing), over a Storage Server that stored what it is asked about."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pydicom
import pytest
from helpers import (
    ROOT,
    associate_rq_pdu,
    ct_series,
    dcmtk,
    encode,
    free_port,
    p_data_pdu,
    read_pdu,
    run,
    sample,
    wait_for,
    write_series,
)
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt

from appliance.config import Destination, QrConfig, ScpConfig, StoreConfig
from appliance.conformance import SOPClass, Status, TransferSyntax
from appliance.dicom import dicomio
from appliance.net.dimse import (
    CommandField,
    Tag,
    decode_command,
    encode_command,
    uid,
    us,
)
from appliance.net.qr import QueryRetrieveServer
from appliance.net.qr.exchange import MAX_IDENTIFIER_BYTES
from appliance.net.sender import ClientSettings
from appliance.store.find import FIND_COLUMNS, Match, MatchKind
from appliance.store.ingest import Ingest
from appliance.store.store import Store

STUDY_FIND = SOPClass.STUDY_ROOT_FIND
PATIENT_FIND = SOPClass.PATIENT_ROOT_FIND


class QrServer:
    """An in-process Storage Server with Query/Retrieve on a free loopback port."""

    def __init__(self, data_dir: Path, *, qr: QrConfig | None = None, rules: StoreConfig | None = None,
                 scp: ScpConfig | None = None, destinations: dict[str, Destination] | None = None) -> None:
        self.store = Store(data_dir)
        self.store.open_for_service()
        cfg = replace(scp or ScpConfig(), bind="127.0.0.1", port=0)
        self.server = QueryRetrieveServer(cfg, Ingest(self.store, rules or StoreConfig(min_free_mb=0)), qr=qr,
                                          destinations=destinations,
                                          client=ClientSettings(timeout=10))
        self.port = self.server.start().port
        self.ae_title = cfg.ae_title

    def stop(self) -> None:
        self.server.stop(grace=2)
        self.store.close()

    def storescu(self, files: list[Path]) -> None:
        r = run([dcmtk("storescu"), "-aec", self.ae_title, "127.0.0.1", str(self.port), *map(str, files)])
        assert r.returncode == 0, r.stderr

    def findscu(self, tmp: Path, *keys: str, model: str = "-S", opts: tuple[str, ...] = ()) -> list[Dataset]:
        """Run findscu with ``keys``; return the response identifiers, in order."""
        out = tmp / f"find-{time.monotonic_ns()}"
        out.mkdir()
        args = [dcmtk("findscu"), model, "-X", "-od", str(out), *opts, "-aec", self.ae_title, "127.0.0.1",
                str(self.port)]
        for k in keys:
            args += ["-k", k]
        r = run(args)
        assert r.returncode == 0, r.stderr
        return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


@pytest.fixture
def make_qr(tmp_path: Path) -> Iterator[Any]:
    started: list[QrServer] = []

    def make(name: str = "data", **kwargs: Any) -> QrServer:
        srv = QrServer(tmp_path / name, **kwargs)
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def qr(make_qr: Any) -> QrServer:
    return make_qr()


def _series(tmp: Path, name: str, *, patient: str, patient_id: str, date: str, modality: str = "CT",
            n: int = 2, study_uid: str | None = None) -> list[Dataset]:
    """A generated series (``n`` slices) of one patient and study date, written under ``tmp/name``."""
    datasets = ct_series(n, patient=patient, study_uid=study_uid)
    for ds in datasets:
        ds.PatientID = patient_id
        ds.StudyDate = date
        ds.Modality = modality
        ds.AccessionNumber = f"ACC-{patient_id}"
        ds.StudyID = f"S{date[-4:]}"
    write_series(datasets, tmp / name)
    return datasets


@pytest.fixture
def stored(qr: QrServer, tmp_path: Path) -> dict[str, list[Dataset]]:
    """Four patients, five studies, one of them with a CT and an MR series."""
    made = {
        "smith": _series(tmp_path, "smith", patient="Smith^John", patient_id="P1", date="20240105"),
        "smythe": _series(tmp_path, "smythe", patient="SMYTHE^Jane", patient_id="P2", date="20240310"),
        "jones": _series(tmp_path, "jones", patient="Jones^Ann", patient_id="P3", date="20240611"),
        "jones2": _series(tmp_path, "jones2", patient="Jones^Ann", patient_id="P3", date="20231224"),
        "muller": _series(tmp_path, "muller", patient="Müller^Hans", patient_id="P4", date="20240801"),
    }
    made["muller_mr"] = _series(tmp_path, "muller_mr", patient="Müller^Hans", patient_id="P4", date="20240801",
                                modality="MR", n=3, study_uid=made["muller"][0].StudyInstanceUID)
    for ds in made["muller_mr"]:
        ds.SOPClassUID = str(SOPClass.MR_IMAGE)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    write_series(made["muller_mr"], tmp_path / "muller_mr")
    qr.storescu(sorted((tmp_path).glob("*/slice*.dcm")))
    return made


def _values(rsps: list[Dataset], keyword: str) -> list[str]:
    return sorted(str(r.get(keyword, "")) for r in rsps)


# -- C-FIND with DCMTK findscu --------------------------------------------------------------


def test_findscu_by_patient_name_with_a_wildcard(qr, stored, tmp_path):
    rsps = qr.findscu(tmp_path, "QueryRetrieveLevel=STUDY", "PatientName=SM?TH*", "PatientID", "StudyInstanceUID",
                      "StudyDate", "AccessionNumber", "StudyID", "ModalitiesInStudy",
                      "NumberOfStudyRelatedInstances", "RetrieveAETitle")
    # PN matches case-insensitively: SMYTHE and Smith, not Jones or Müller.
    assert _values(rsps, "PatientName") == ["SMYTHE^Jane", "Smith^John"]
    smith = next(r for r in rsps if r.PatientID == "P1")
    assert smith.StudyInstanceUID == stored["smith"][0].StudyInstanceUID
    assert smith.QueryRetrieveLevel == "STUDY"
    assert smith.StudyDate == "20240105"
    assert smith.AccessionNumber == "ACC-P1" and smith.StudyID == "S0105"  # read from a stored file
    assert smith.ModalitiesInStudy == "CT"
    assert smith.NumberOfStudyRelatedInstances == 2
    assert smith.RetrieveAETitle == qr.ae_title


def test_findscu_by_study_date_range(qr, stored, tmp_path):
    rsps = qr.findscu(tmp_path, "QueryRetrieveLevel=STUDY", "StudyDate=20240101-20240630", "PatientID",
                      "StudyInstanceUID")
    assert _values(rsps, "PatientID") == ["P1", "P2", "P3"]
    assert _values(rsps, "StudyDate") == ["20240105", "20240310", "20240611"]
    open_low = qr.findscu(tmp_path, "QueryRetrieveLevel=STUDY", "StudyDate=-20240105", "PatientID")
    assert _values(open_low, "StudyDate") == ["20231224", "20240105"]
    open_high = qr.findscu(tmp_path, "QueryRetrieveLevel=STUDY", "StudyDate=20240611-", "PatientID")
    assert _values(open_high, "StudyDate") == ["20240611", "20240801"]


def test_findscu_by_modality_at_series_level(qr, stored, tmp_path):
    muller = stored["muller"][0].StudyInstanceUID
    rsps = qr.findscu(tmp_path, "QueryRetrieveLevel=SERIES", "Modality=MR", "SeriesInstanceUID", "SeriesNumber",
                      "NumberOfSeriesRelatedInstances")
    assert len(rsps) == 1
    assert rsps[0].SeriesInstanceUID == stored["muller_mr"][0].SeriesInstanceUID
    assert rsps[0].StudyInstanceUID == muller  # the higher level's unique key comes along
    assert rsps[0].NumberOfSeriesRelatedInstances == 3
    # Within one study: both of its series.
    both = qr.findscu(tmp_path, "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={muller}", "Modality",
                      "SeriesInstanceUID")
    assert _values(both, "Modality") == ["CT", "MR"]
    # ModalitiesInStudy at the study level: any of the study's series.
    study = qr.findscu(tmp_path, "QueryRetrieveLevel=STUDY", "ModalitiesInStudy=MR", "PatientID")
    assert [(r.PatientID, sorted(r.ModalitiesInStudy)) for r in study] == [("P4", ["CT", "MR"])]


def test_findscu_patient_root(qr, stored, tmp_path):
    patients = qr.findscu(tmp_path, "QueryRetrieveLevel=PATIENT", "PatientName=Jones*", "PatientID",
                          "NumberOfPatientRelatedStudies", model="-P")
    assert [(r.PatientID, r.NumberOfPatientRelatedStudies) for r in patients] == [("P3", 2)]
    studies = qr.findscu(tmp_path, "QueryRetrieveLevel=STUDY", "PatientID=P3", "StudyInstanceUID", "StudyDate",
                         model="-P")
    assert _values(studies, "StudyDate") == ["20231224", "20240611"]
    images = qr.findscu(tmp_path, "QueryRetrieveLevel=IMAGE", "PatientID=P4",
                        f"StudyInstanceUID={stored['muller'][0].StudyInstanceUID}",
                        f"SeriesInstanceUID={stored['muller_mr'][0].SeriesInstanceUID}", "SOPInstanceUID",
                        "InstanceNumber", "SOPClassUID", model="-P")
    assert _values(images, "SOPInstanceUID") == sorted(ds.SOPInstanceUID for ds in stored["muller_mr"])
    assert {r.SOPClassUID for r in images} == {SOPClass.MR_IMAGE}
    # PATIENT is no level of the Study Root model: Identifier does not match SOP Class.
    r = run([dcmtk("findscu"), "-v", "-S", "-aec", qr.ae_title, "127.0.0.1", str(qr.port), "-k",
             "QueryRetrieveLevel=PATIENT", "-k", "PatientID"])
    assert "Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in r.stdout + r.stderr  # 0xA900


def test_findscu_uid_list_and_unsupported_keys(qr, stored, tmp_path):
    uids = [stored["smith"][0].StudyInstanceUID, stored["jones"][0].StudyInstanceUID]
    rsps = qr.findscu(tmp_path, "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={uids[0]}\\{uids[1]}", "PatientID")
    assert _values(rsps, "StudyInstanceUID") == sorted(uids)
    # A key the SCP cannot answer: matches go on, Pending with a warning (0xFF01), key left out.
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = uids[0]
    q.OtherPatientIDs = ""
    statuses: list[int] = []
    found, final = _find(qr.port, qr.ae_title, q, statuses=statuses)
    assert final == Status.SUCCESS and statuses == [Status.PENDING_WARNING]
    assert [r.StudyInstanceUID for r in found] == [uids[0]] and "OtherPatientIDs" not in found[0]


def test_findscu_cancel(qr, tmp_path):
    """findscu sends a C-CANCEL-RQ after 3 responses; the SCP, which looks for one between
    two responses, stops long before the 3,000th match and answers Cancel (0xFE00)."""
    for i in range(3000):
        qr.store.index.add(_row(i))
    r = run([dcmtk("findscu"), "-v", "-S", "--cancel", "3", "-aec", qr.ae_title, "127.0.0.1", str(qr.port),
             "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "Received Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)" in out, out[-2000:]
    assert out.count("Find Response:") < 3000


# -- character sets -----------------------------------------------------------------------


def _find(port: int, ae_title: str, query: Dataset, model: str = STUDY_FIND,
          statuses: list[int] | None = None) -> tuple[list[Dataset], int]:
    ae = AE("PYFIND")
    ae.add_requested_context(model, [TransferSyntax.EXPLICIT_LE])
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    out: list[Dataset] = []
    final = -1
    try:
        for status, ident in assoc.send_c_find(query, model):
            if status.Status in (Status.PENDING, Status.PENDING_WARNING):
                out.append(ident)
                if statuses is not None:
                    statuses.append(int(status.Status))
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    return out, final


@pytest.fixture
def charsets(make_qr: Any) -> QrServer:
    """RT Structure Sets of one patient ID whose names are in ISO_IR 100, 126, 144 and 192."""
    srv = make_qr("charsets")
    srv.storescu([sample(f"rtstruct_cs_ISO_IR_{n}").path for n in (100, 126, 144, 192)])
    return srv


def _name_query(name: str, charset: str | None, level: str = "PATIENT") -> Dataset:
    q = Dataset()
    if charset:
        q.SpecificCharacterSet = charset
    q.QueryRetrieveLevel = level
    q.PatientName = name
    q.PatientID = ""
    return q


def test_names_stored_in_other_character_sets_match(charsets):
    # A query in ISO_IR 100 finds the names stored in ISO_IR 100 and ISO_IR 192 alike.
    found, final = _find(charsets.port, charsets.ae_title, _name_query("Test^é*", "ISO_IR 100"), PATIENT_FIND)
    assert final == Status.SUCCESS
    assert sorted(str(r.PatientName) for r in found) == ["Test^éüäöò", "Test^éüäöòДΘĝדصķћ๛ﾈİ"]
    # In ISO_IR 144 (Cyrillic): the ISO_IR 144 name and the UTF-8 one holding its letter.
    found, _ = _find(charsets.port, charsets.ae_title, _name_query("*Д*", "ISO_IR 144"), PATIENT_FIND)
    assert sorted(str(r.PatientName) for r in found) == sorted(["Test^Дћ", "Test^éüäöòДΘĝדصķћ๛ﾈİ"])
    # Each response is in a set that holds its name: the query's, else ISO_IR 100, else ISO_IR 192.
    found, _ = _find(charsets.port, charsets.ae_title, _name_query("Test*", None), PATIENT_FIND)
    by_name = {str(r.PatientName): r.get("SpecificCharacterSet") for r in found}
    assert by_name == {"Test^éüäöò": "ISO_IR 100", "Test^Θ": "ISO_IR 192", "Test^Дћ": "ISO_IR 192",
                       "Test^éüäöòДΘĝדصķћ๛ﾈİ": "ISO_IR 192"}
    # A query in a set section 7 does not list (code extensions): unable to process.
    _, final = _find(charsets.port, charsets.ae_title, _name_query("Test*", "\\ISO 2022 IR 87"), PATIENT_FIND)
    assert final == Status.UNABLE_TO_PROCESS


# -- presentation contexts: only when enabled ---------------------------------------------


def test_qr_contexts_are_accepted_only_when_enabled(make_qr):
    on = make_qr("on")
    off = make_qr("off", qr=QrConfig(enabled=False))
    for srv, expected in ((on, 0x00), (off, 0x03)):
        ae = AE("PYFIND")
        for model in (STUDY_FIND, PATIENT_FIND, SOPClass.STUDY_ROOT_MOVE, SOPClass.STUDY_ROOT_GET):
            ae.add_requested_context(model, [TransferSyntax.IMPLICIT_LE])
        ae.add_requested_context(SOPClass.VERIFICATION)
        assoc = ae.associate("127.0.0.1", srv.port, ae_title=srv.ae_title)
        try:
            assert assoc.is_established
            results = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts + assoc.accepted_contexts}
            assert results[STUDY_FIND] == expected and results[PATIENT_FIND] == expected
        finally:
            assoc.release()


def test_appliance_scp_serves_qr_unless_the_config_turns_it_off(tmp_path):
    for enabled in (True, False):
        cfg = tmp_path / f"qr-{enabled}.toml"
        cfg.write_text(f"[qr]\nenabled = {str(enabled).lower()}\n")
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance", "--config", str(cfg), "--data-dir", str(tmp_path / f"d{enabled}"),
             "scp", "--bind", "127.0.0.1", "0"],
            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        try:
            line = wait_for(proc.stderr.readline, timeout=20, what="the listening line")
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", str(line))
            assert m, line
            r = run([dcmtk("findscu"), "-S", "-aec", "ELEKTA_STORAGE", "127.0.0.1", m.group(1),
                     "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"])
            assert (r.returncode == 0) is enabled, r.stderr
            if not enabled:
                assert "No Acceptable Presentation Contexts" in r.stderr
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_qr_associations_hold_the_storage_servers_slots_and_limits(make_qr, caplog):
    qr = make_qr(scp=ScpConfig(max_associations=1))
    ae = AE("PYFIND")
    ae.add_requested_context(STUDY_FIND, [TransferSyntax.IMPLICIT_LE])
    first = ae.associate("127.0.0.1", qr.port, ae_title=qr.ae_title)
    assert first.is_established
    try:
        second = ae.associate("127.0.0.1", qr.port, ae_title=qr.ae_title)
        assert second.is_rejected  # rejected-transient, local limit: the slot is the Q/R association's
    finally:
        first.release()
    # An identifier beyond MAX_IDENTIFIER_BYTES is aborted, as an oversized command set is.
    with socket.create_connection(("127.0.0.1", qr.port)) as s:
        s.settimeout(10)
        s.sendall(associate_rq_pdu(qr.ae_title, [(STUDY_FIND, [TransferSyntax.IMPLICIT_LE])]))
        assert read_pdu(s)[0] == 0x02
        command = encode_command([
            (Tag.AFFECTED_SOP_CLASS_UID, uid(STUDY_FIND)), (Tag.COMMAND_FIELD, us(CommandField.C_FIND_RQ)),
            (Tag.MESSAGE_ID, us(1)), (Tag.PRIORITY, us(0)), (Tag.COMMAND_DATA_SET_TYPE, us(0)),
        ])
        s.sendall(p_data_pdu(1, 0x03, command))
        chunk = p_data_pdu(1, 0x00, b"\0" * 16000)
        for _ in range(MAX_IDENTIFIER_BYTES // 16000 + 2):
            try:
                s.sendall(chunk)
            except OSError:
                break
        assert read_pdu(s)[0] == 0x07  # A-ABORT
    wait_for(lambda: "identifier of more than" in caplog.text, what="the abort's log line")


# -- 10,000 studies ----------------------------------------------------------------------


def _row(i: int) -> dict[str, Any]:
    """An index row of study ``i`` (one instance; its file need not exist)."""
    return {
        "patient_id": f"PID{i:05d}", "patient_name": f"Name{i % 997:03d}^Given{i}",
        "study_uid": f"1.2.826.0.1.3680043.10.1.{i}", "study_date": f"20{10 + i % 15:02d}{1 + i % 12:02d}"
        f"{1 + i % 28:02d}", "study_time": "101500", "series_uid": f"1.2.826.0.1.3680043.10.2.{i}",
        "modality": ("CT", "MR", "PT", "RTSTRUCT")[i % 4], "series_number": 1,
        "sop_instance_uid": f"1.2.826.0.1.3680043.10.3.{i}", "sop_class_uid": str(SOPClass.CT_IMAGE),
        "instance_number": 1, "path": f"objects/x/{i}.dcm", "transfer_syntax": str(TransferSyntax.IMPLICIT_LE),
        "size": 1000, "received_at": f"2026-01-01T00:00:{i % 60:02d}", "calling_ae": "BULK", "origin": "network",
    }


def _raw_find(port: int, ae_title: str, query: Dataset, model: str = STUDY_FIND) -> tuple[float, int, int]:
    """One C-FIND over an association made by hand (no client library's own latency in the
    measurement): seconds from sending the request to the final response, the number of
    Pending responses, and the final status."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(30)
        s.sendall(associate_rq_pdu(ae_title, [(model, [TransferSyntax.IMPLICIT_LE])], calling="RAWFIND"))
        assert read_pdu(s)[0] == 0x02
        command = encode_command([
            (Tag.AFFECTED_SOP_CLASS_UID, uid(model)), (Tag.COMMAND_FIELD, us(CommandField.C_FIND_RQ)),
            (Tag.MESSAGE_ID, us(1)), (Tag.PRIORITY, us(0)), (Tag.COMMAND_DATA_SET_TYPE, us(0)),
        ])
        t0 = time.perf_counter()
        s.sendall(p_data_pdu(1, 0x03, command) + p_data_pdu(1, 0x02, encode(query, TransferSyntax.IMPLICIT_LE)))
        pending, buf = 0, b""
        while True:
            kind, body = read_pdu(s)
            assert kind == 0x04, kind
            pos = 0
            while pos < len(body):
                (length,) = struct.unpack_from(">L", body, pos)
                control, data = body[pos + 5], body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if not control & 0x01:
                    continue  # an identifier's fragment
                buf += data
                if control & 0x02:
                    status = struct.unpack("<H", decode_command(buf)[Tag.STATUS])[0]
                    buf = b""
                    if status not in (Status.PENDING, Status.PENDING_WARNING):
                        elapsed = time.perf_counter() - t0
                        s.sendall(bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0]))  # A-RELEASE-RQ
                        read_pdu(s)
                        return elapsed, pending, status
                    pending += 1


def test_a_find_over_10000_studies_takes_under_100_ms(qr, tmp_path):
    index = qr.store.index
    for i in range(10_000):
        index.add(_row(i))
    assert index.counts()["studies"] == 10_000
    queries = {
        "patient name wildcard": {"PatientName": "Name042^*"},
        "study date range": {"StudyDate": "20150301-20150310"},
        "patient ID": {"PatientID": "PID04242"},
        "modality and date range": {"ModalitiesInStudy": "MR", "StudyDate": "20200201-20200229"},
    }
    timings: dict[str, tuple[float, int]] = {}
    for what, keys in queries.items():
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyDate = ""
        q.AccessionNumber = ""  # read from a file (absent here: answered empty)
        q.PatientName = ""
        q.PatientID = ""
        q.StudyInstanceUID = ""
        q.ModalitiesInStudy = ""
        q.NumberOfStudyRelatedInstances = ""
        for k, v in keys.items():
            setattr(q, k, v)
        best, n = float("inf"), 0
        for _ in range(3):
            seconds, n, status = _raw_find(qr.port, qr.ae_title, q)
            assert status == Status.SUCCESS
            best = min(best, seconds)
        assert n > 0, what
        timings[what] = (best * 1000, n)
    print("C-FIND over 10,000 studies:", {k: f"{ms:.1f} ms, {n} match(es)" for k, (ms, n) in timings.items()})
    for what, (ms, n) in timings.items():
        assert ms < 100, f"{what}: {ms:.1f} ms for {n} match(es)"


def test_index_find_pages_and_matches(store):
    for i in range(12):
        store.index.add(_row(i))
    pages, after = [], 0
    while page := store.index.find("study", [], ["study_uid"], after=after, limit=5):
        pages.append(len(page))
        after = page[-1].key
    assert pages == [5, 5, 2]
    found = store.index.find("series", [Match("modality", MatchKind.LIST, ("MR", "PT"))], ["modality"])
    assert sorted({f.values["modality"] for f in found}) == ["MR", "PT"]
    # A column below the level is refused (the handler never asks for one).
    with pytest.raises(ValueError):
        store.index.find("study", [], ["modality"])
    assert set(FIND_COLUMNS) >= {"patient_name", "study_date", "modalities_in_study", "sop_instance_uid"}


# -- C-MOVE -------------------------------------------------------------------------------


class Storescp:
    """DCMTK storescp as a move destination, writing what it receives to ``folder``."""

    def __init__(self, folder: Path, ae_title: str = "DEST", *opts: str) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ae_title = ae_title
        self.proc = subprocess.Popen([dcmtk("storescp"), "-aet", ae_title, "-od", str(folder), *opts, str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: run([dcmtk("echoscu"), "-aec", ae_title, "127.0.0.1", str(self.port)]).returncode == 0,
                 what="storescp to answer")

    @property
    def destination(self) -> Destination:
        return Destination(self.ae_title, "127.0.0.1", self.port)

    def received(self) -> dict[str, Dataset]:
        return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in self.folder.iterdir())}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Any]:
    started: list[Storescp] = []

    def make(name: str = "dest", ae_title: str = "DEST", *opts: str) -> Storescp:
        s = Storescp(tmp_path / name, ae_title, *opts)
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


def _store(port: int, ae_title: str, datasets: list[Dataset], syntax: str) -> None:
    """Store ``datasets`` over one association that proposes only ``syntax`` (so that the
    Storage Server keeps them in it)."""
    ae = AE("PYSTORE")
    ae.add_requested_context(datasets[0].SOPClassUID, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    try:
        for ds in datasets:
            ds.file_meta.TransferSyntaxUID = syntax
            assert assoc.send_c_store(ds).Status == Status.SUCCESS
    finally:
        assoc.release()


def _movescu(qr: QrServer, destination: str, *keys: str) -> str:
    args = [dcmtk("movescu"), "-v", "-S", "-aec", qr.ae_title, "-aem", destination, "127.0.0.1", str(qr.port)]
    for k in keys:
        args += ["-k", k]
    r = run(args)
    return r.stdout + r.stderr


def test_movescu_moves_a_ct_series_to_storescp(make_qr, storescp, tmp_path):
    dest = storescp("dest")
    implicit_only = storescp("dest-ile", "DEST_ILE", "+xi")
    qr = make_qr(destinations={"planning": dest.destination, "old_pacs": implicit_only.destination})
    series = ct_series(6, rows=64, cols=64)
    _store(qr.port, qr.ae_title, series, TransferSyntax.EXPLICIT_BE)
    stored = {r.sop_instance_uid: r.transfer_syntax for r in qr.store.instances(series[0].SeriesInstanceUID)}
    assert set(stored.values()) == {TransferSyntax.EXPLICIT_BE}
    keys = ("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={series[0].StudyInstanceUID}",
            f"SeriesInstanceUID={series[0].SeriesInstanceUID}")
    for target in (dest, implicit_only):
        out = _movescu(qr, target.ae_title, *keys)
        assert "Received Final Move Response (Success)" in out, out
        assert out.count("Received Move Response") == 5  # a Pending response after each but the last
        received = target.received()
        assert set(received) == {ds.SOPInstanceUID for ds in series}
        for ds in series:  # object by object: the same pixels, the same UIDs
            got = received[ds.SOPInstanceUID]
            assert (got.pixel_array == ds.pixel_array).all()
            assert got.SeriesInstanceUID == ds.SeriesInstanceUID and got.SOPClassUID == ds.SOPClassUID
    # As stored where the destination takes it; Implicit VR LE (as the client AE sends) where not.
    assert {ds.file_meta.TransferSyntaxUID for ds in dest.received().values()} == {TransferSyntax.EXPLICIT_BE}
    assert {ds.file_meta.TransferSyntaxUID for ds in implicit_only.received().values()} == \
        {TransferSyntax.IMPLICIT_LE}
    # Each move is in the audit trail: who asked, where it went, the study and its count.
    from appliance import audit

    moves = [e for e in audit.read(qr.store.data_dir) if e.get("detail", "").startswith("C-MOVE")]
    assert len(moves) == 2 and all(e["outcome"] == 0 for e in moves)
    assert moves[0]["studies"] == [{"study_uid": series[0].StudyInstanceUID, "objects": 6}]
    assert moves[0]["participants"][1]["ae"] == dest.ae_title


def test_a_move_to_an_unknown_ae_gets_a801(make_qr, storescp, tmp_path):
    dest = storescp()
    qr = make_qr(destinations={"planning": dest.destination})
    series = ct_series(2)
    qr.storescu(write_series(series, tmp_path / "s"))
    out = _movescu(qr, "STRANGER", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={series[0].StudyInstanceUID}")
    assert "Received Final Move Response (Refused: MoveDestinationUnknown)" in out, out  # 0xA801
    assert dest.received() == {}
    status = _move(qr, "STRANGER", _move_query("STUDY", StudyInstanceUID=series[0].StudyInstanceUID))[-1]
    assert status.Status == Status.MOVE_DESTINATION_UNKNOWN
    assert "STRANGER" in status.ErrorComment
    from appliance import audit

    refused = [e for e in audit.read(qr.store.data_dir) if e["event"] == "Security Alert"]
    assert refused and "STRANGER" in refused[0]["outcome_text"]


def _move_query(level: str, **keys: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(q, k, v)
    return q


def _move(qr: QrServer, destination: str, query: Dataset, *, cancel_after: int | None = None,
          cancel_sent: Any = None) -> list[Dataset]:
    """C-MOVE with pynetdicom; return every response's status data set, the final one last.
    ``cancel_after``: send a C-CANCEL-RQ after that many Pending responses, then call
    ``cancel_sent``."""
    ae = AE("PYMOVE")
    ae.add_requested_context(SOPClass.STUDY_ROOT_MOVE, [TransferSyntax.IMPLICIT_LE])
    assoc = ae.associate("127.0.0.1", qr.port, ae_title=qr.ae_title)
    assert assoc.is_established
    out: list[Dataset] = []
    try:
        for status, _ in assoc.send_c_move(query, destination, SOPClass.STUDY_ROOT_MOVE, msg_id=7):
            out.append(status)
            if cancel_after is not None and len(out) == cancel_after:
                cx = assoc._get_valid_context(SOPClass.STUDY_ROOT_MOVE, "", "scu")
                assoc.send_c_cancel(7, cx.context_id)
                cancel_sent()
    finally:
        assoc.release()
    return out


class PynetdicomDestination:
    """A pynetdicom Storage SCP as move destination: it notes what each C-STORE-RQ says,
    and can hold a sub-operation until the test lets it go."""

    def __init__(self, ae_title: str = "PYDEST") -> None:
        self.requests: list[tuple[str, str, int]] = []
        self.hold_at: int | None = None
        self.release = threading.Event()
        ae = AE(ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.destination = Destination(ae_title, "127.0.0.1", self.port)

    def _on_store(self, event: Any) -> int:
        rq = event.request
        self.requests.append((rq.AffectedSOPInstanceUID, rq.MoveOriginatorApplicationEntityTitle,
                              rq.MoveOriginatorMessageID))
        if self.hold_at is not None and len(self.requests) == self.hold_at:
            self.release.wait(10)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def test_move_responses_count_the_sub_operations_and_name_the_originator(make_qr, tmp_path):
    dest = PynetdicomDestination()
    try:
        qr = make_qr(destinations={"planning": dest.destination})
        series = ct_series(4)
        qr.storescu(write_series(series, tmp_path / "s"))
        rsps = _move(qr, "PYDEST", _move_query("SERIES", SeriesInstanceUID=series[0].SeriesInstanceUID))
    finally:
        dest.stop()
    counts = [(r.Status, r.get("NumberOfRemainingSuboperations"), r.NumberOfCompletedSuboperations,
               r.NumberOfFailedSuboperations, r.NumberOfWarningSuboperations) for r in rsps]
    assert counts == [(Status.PENDING, 3, 1, 0, 0), (Status.PENDING, 2, 2, 0, 0), (Status.PENDING, 1, 3, 0, 0),
                      (Status.SUCCESS, None, 4, 0, 0)]
    assert sorted(uid for uid, _, _ in dest.requests) == sorted(ds.SOPInstanceUID for ds in series)
    assert {(ae, mid) for _, ae, mid in dest.requests} == {("PYMOVE", 7)}


def test_a_move_is_cancelled_between_two_sub_operations(make_qr, tmp_path):
    dest = PynetdicomDestination()
    dest.hold_at = 2  # the second object waits until the C-CANCEL-RQ is on its way
    try:
        qr = make_qr(destinations={"planning": dest.destination})
        series = ct_series(6)
        qr.storescu(write_series(series, tmp_path / "s"))
        rsps = _move(qr, "PYDEST", _move_query("SERIES", SeriesInstanceUID=series[0].SeriesInstanceUID),
                     cancel_after=1, cancel_sent=dest.release.set)
    finally:
        dest.release.set()
        dest.stop()
    final = rsps[-1]
    assert final.Status == Status.CANCEL  # 0xFE00, after the held object (or, were the cancel late, the next)
    assert final.NumberOfCompletedSuboperations in (2, 3)
    assert final.NumberOfRemainingSuboperations == 6 - final.NumberOfCompletedSuboperations
    assert len(dest.requests) == final.NumberOfCompletedSuboperations


def test_a_move_to_a_destination_that_does_not_answer_fails_every_object(make_qr, tmp_path):
    qr = make_qr(destinations={"gone": Destination("GONE", "127.0.0.1", free_port())})
    series = ct_series(3)
    qr.storescu(write_series(series, tmp_path / "s"))
    [final] = _move(qr, "GONE", _move_query("STUDY", StudyInstanceUID=series[0].StudyInstanceUID))
    assert final.Status == Status.OUT_OF_RESOURCES_SUBOPERATIONS  # 0xA702
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (0, 3)
    assert "connection refused" in final.ErrorComment


def test_a_move_names_what_it_moves_by_unique_keys(make_qr, tmp_path):
    dest = PynetdicomDestination()
    try:
        qr = make_qr(destinations={"planning": dest.destination})
        series = ct_series(2)
        qr.storescu(write_series(series, tmp_path / "s"))
        [final] = _move(qr, "PYDEST", _move_query("STUDY", PatientName="Test*"))
        assert final.Status == Status.IDENTIFIER_DOES_NOT_MATCH  # 0xA900: no Study Instance UID
        [final] = _move(qr, "PYDEST", _move_query("STUDY", StudyInstanceUID="1.2.3.4"))
        assert (final.Status, final.NumberOfCompletedSuboperations) == (Status.SUCCESS, 0)  # nothing matches
        rsps = _move(qr, "PYDEST", _move_query("IMAGE", StudyInstanceUID=series[0].StudyInstanceUID,
                                               SeriesInstanceUID=series[0].SeriesInstanceUID,
                                               SOPInstanceUID=[series[1].SOPInstanceUID, "1.2.3.5"]))
        assert (rsps[-1].Status, rsps[-1].NumberOfCompletedSuboperations) == (Status.SUCCESS, 1)
    finally:
        dest.stop()
    assert [uid for uid, _, _ in dest.requests] == [series[1].SOPInstanceUID]


# -- C-GET --------------------------------------------------------------------------------


def _data_set_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    offset, _ = dicomio.split_part10(data)
    return data[offset:]


def test_getscu_gets_a_study_back_over_its_own_association(qr, tmp_path):
    implicit = ct_series(4, rows=32, cols=32)
    _store(qr.port, qr.ae_title, implicit, TransferSyntax.IMPLICIT_LE)  # stored in Implicit VR LE
    explicit = ct_series(3, rows=32, cols=32, study_uid=implicit[0].StudyInstanceUID)
    _store(qr.port, qr.ae_title, explicit, TransferSyntax.EXPLICIT_LE)  # stored in Explicit VR LE
    out = tmp_path / "got"
    out.mkdir()
    r = run([dcmtk("getscu"), "-v", "-S", "+B", "-od", str(out), "-aec", qr.ae_title, "127.0.0.1", str(qr.port),
             "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={implicit[0].StudyInstanceUID}"])
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    assert "Received C-GET Response (Success)" in log and "Number of Completed Suboperations : 7" in log, log
    from appliance import audit

    [got] = [e for e in audit.read(qr.store.data_dir) if e.get("detail", "").startswith("C-GET")]
    assert got["studies"] == [{"study_uid": implicit[0].StudyInstanceUID, "objects": 7}]
    assert log.count("Received C-GET Response (Pending)") == 6
    received = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in out.iterdir()}
    assert set(received) == {ds.SOPInstanceUID for ds in implicit + explicit}
    for ds in implicit:  # the stored data set, byte for byte
        stored = qr.store.locate(ds.SOPInstanceUID)
        assert stored is not None
        assert _data_set_bytes(received[ds.SOPInstanceUID]) == _data_set_bytes(stored)
    for ds in explicit:  # getscu's storage contexts are Implicit VR LE here: converted, same pixels
        got = pydicom.dcmread(received[ds.SOPInstanceUID])
        assert got.file_meta.TransferSyntaxUID == TransferSyntax.IMPLICIT_LE
        assert (got.pixel_array == ds.pixel_array).all()


def _get(qr: QrServer, query: Dataset, *, storage: list[str], roles: bool = True,
         on_store: Any = None) -> tuple[list[Dataset], list[str]]:
    """C-GET with pynetdicom, taking the SCP role for the ``storage`` classes (if ``roles``);
    return every response's status data set (the final one last) and the SOP Instance UIDs
    of the C-STORE-RQs received."""
    got: list[str] = []

    def handle(event: Any) -> int:
        got.append(event.request.AffectedSOPInstanceUID)
        if on_store is not None:
            on_store(event, len(got))
        return 0x0000

    ae = AE("PYGET")
    ae.add_requested_context(SOPClass.STUDY_ROOT_GET, [TransferSyntax.IMPLICIT_LE])
    for cls in storage:
        ae.add_requested_context(cls, [TransferSyntax.IMPLICIT_LE])
    ext = [build_role(cls, scp_role=True) for cls in storage] if roles else []
    assoc = ae.associate("127.0.0.1", qr.port, ae_title=qr.ae_title, ext_neg=ext,
                         evt_handlers=[(evt.EVT_C_STORE, handle)])
    assert assoc.is_established
    out: list[Dataset] = []
    try:
        for status, _ in assoc.send_c_get(query, SOPClass.STUDY_ROOT_GET, msg_id=9):
            out.append(status)
    finally:
        assoc.release()
    return out, got


def test_get_counts_and_fails_what_the_requester_cannot_take(qr, tmp_path):
    ct = ct_series(3)
    mr = ct_series(2, study_uid=ct[0].StudyInstanceUID)
    for ds in mr:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = str(SOPClass.MR_IMAGE)
        ds.Modality = "MR"
    qr.storescu(write_series(ct, tmp_path / "ct") + write_series(mr, tmp_path / "mr"))
    query = _move_query("STUDY", StudyInstanceUID=ct[0].StudyInstanceUID)
    rsps, got = _get(qr, query, storage=[SOPClass.CT_IMAGE])  # no MR context: those sub-operations fail
    final = rsps[-1]
    assert final.Status == Status.SUBOPERATIONS_FAILED  # 0xB000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (3, 2)
    assert sorted(got) == sorted(ds.SOPInstanceUID for ds in ct)
    assert [r.NumberOfRemainingSuboperations for r in rsps[:-1]] == [4, 3, 2, 1]
    # Without SCP/SCU Role Selection the requester is no storage SCP: nothing can be sent.
    rsps, got = _get(qr, query, storage=[SOPClass.CT_IMAGE, SOPClass.MR_IMAGE], roles=False)
    assert rsps[-1].Status == Status.OUT_OF_RESOURCES_SUBOPERATIONS and got == []  # 0xA702
    assert rsps[-1].NumberOfFailedSuboperations == 5


def test_a_get_is_cancelled_while_an_object_is_being_stored(qr, tmp_path):
    series = ct_series(5)
    qr.storescu(write_series(series, tmp_path / "s"))

    def cancel_on_second(event: Any, n: int) -> None:
        if n == 2:  # before this C-STORE-RSP goes back, the C-CANCEL-RQ does
            cx = event.assoc._get_valid_context(SOPClass.STUDY_ROOT_GET, "", "scu")
            event.assoc.send_c_cancel(9, cx.context_id)

    rsps, got = _get(qr, _move_query("SERIES", SeriesInstanceUID=series[0].SeriesInstanceUID),
                     storage=[SOPClass.CT_IMAGE], on_store=cancel_on_second)
    final = rsps[-1]
    assert final.Status == Status.CANCEL
    assert (final.NumberOfCompletedSuboperations, final.NumberOfRemainingSuboperations) == (2, 3)
    assert len(got) == 2


# -- the benchmark still runs ----------------------------------------------------------------


def test_bench_qr_runs_and_prints_the_ratios(tmp_path):
    out = tmp_path / "qr.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench-qr"), "--studies", "40", "--compare", "20", "--slices", "4",
         "--size", "16", "--repeat", "2", "--rounds", "1", "--cache-dir", str(tmp_path / "cache"),
         "--work-dir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ours/dcmqrscp: C-FIND time " in r.stdout and "C-MOVE throughput " in r.stdout
    result = json.loads(out.read_text())
    assert result["matches"]["ours, all"]["every study"] == 40
    assert result["matches"]["ours"] == result["matches"]["dcmqrscp"]
    assert result["move_ratio"] > 0
