"""Just enough of a C-ECHO SCU, on a bare socket, to time the receiver and not the client.

pynetdicom's client polls its queues and adds about 3 ms to every message, which would
hide a receiver's own latency (DCMTK storescp answers in ~0.1 ms on loopback). This
client writes the PDUs of PS3.8 section 9.3 and the C-ECHO command of PS3.7 9.3.5 by
hand and waits on the socket alone.
"""

from __future__ import annotations

import socket
import struct
import time
import uuid

from appliance.conformance import CLIENT_AE_TITLE, SOPClass, TransferSyntax


class EchoError(Exception):
    """The receiver refused or broke the association, or answered C-ECHO with a failure."""


APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 Annex A.2.1, the only one there is
ECHO_CLIENT_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, 'appliance.bench-scp.echo').int}"


def _item(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(payload)) + payload


def _pdu(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(payload)) + payload


def _command(*elements: tuple[int, bytes]) -> bytes:
    """A command set (group 0000, Implicit VR LE) headed by its group length."""
    body = b"".join(struct.pack("<HHI", 0, tag, len(value)) + value for tag, value in elements)
    return struct.pack("<HHII", 0, 0x0000, 4, len(body)) + body


class EchoClient:
    """One association carrying C-ECHOs; associate() and echo() return the seconds each took."""

    def __init__(self, host: str, port: int, called: str, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.message_id = 0
        self.associated = False
        context = _item(
            0x20,
            bytes([1, 0, 0, 0])  # presentation context ID 1
            + _item(0x30, SOPClass.VERIFICATION.encode())
            + _item(0x40, TransferSyntax.IMPLICIT_LE.encode()),
        )
        user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, ECHO_CLIENT_UID.encode()))
        self.request = _pdu(
            0x01,
            struct.pack(">HH", 1, 0)  # protocol version 1
            + called.encode().ljust(16)
            + CLIENT_AE_TITLE.encode().ljust(16)
            + bytes(32)
            + _item(0x10, APPLICATION_CONTEXT.encode())
            + context
            + user,
        )

    def associate(self) -> float:
        """Send A-ASSOCIATE-RQ; return the seconds until the A-ASSOCIATE-AC."""
        start = time.perf_counter()
        self.sock.sendall(self.request)
        kind, body = self._receive()
        elapsed = time.perf_counter() - start
        if kind != 0x02:
            raise EchoError(f"association for C-ECHO not accepted (PDU type 0x{kind:02x})")
        pos = 68  # past protocol version, reserved, AE titles and reserved bytes
        while pos + 4 <= len(body):
            item, length = body[pos], struct.unpack(">H", body[pos + 2 : pos + 4])[0]
            if item == 0x21 and body[pos + 6] != 0:
                raise EchoError(f"Verification presentation context refused (result {body[pos + 6]})")
            pos += 4 + length
        self.associated = True
        return elapsed

    def echo(self) -> float:
        """Send one C-ECHO-RQ; return the seconds until its C-ECHO-RSP."""
        self.message_id += 1
        sop_class = SOPClass.VERIFICATION.encode()
        command = _command(
            (0x0002, sop_class + b"\0" * (len(sop_class) % 2)),  # Affected SOP Class UID
            (0x0100, struct.pack("<H", 0x0030)),  # Command Field: C-ECHO-RQ
            (0x0110, struct.pack("<H", self.message_id)),  # Message ID
            (0x0800, struct.pack("<H", 0x0101)),  # Command Data Set Type: none
        )
        # one PDV: its length, presentation context 1, "command, last fragment"
        request = _pdu(0x04, struct.pack(">IBB", len(command) + 2, 1, 0x03) + command)
        start = time.perf_counter()
        self.sock.sendall(request)
        response = b""
        while True:  # the response may come in several PDVs
            kind, body = self._receive()
            if kind != 0x04:
                raise EchoError(f"expected a C-ECHO-RSP, got PDU type 0x{kind:02x}")
            last, pos = False, 0
            while pos < len(body):
                length, header = struct.unpack(">I", body[pos : pos + 4])[0], body[pos + 5]
                response += body[pos + 6 : pos + 4 + length]
                last = header & 0x03 == 0x03
                pos += 4 + length
            if last:
                break
        elapsed = time.perf_counter() - start
        status = _command_status(response)
        if status != 0:
            raise EchoError(f"C-ECHO answered with status 0x{status:04X}")
        return elapsed

    def close(self) -> None:
        """Release the association if there is one (A-RELEASE-RQ/RP) and close the socket."""
        try:
            if self.associated:
                self.sock.sendall(_pdu(0x05, bytes(4)))
                self._receive()
        except (OSError, EchoError):
            pass  # the measurement is taken; a failed release does not spoil it
        finally:
            self.sock.close()

    def _receive(self) -> tuple[int, bytes]:
        header = self._exactly(6)
        kind, _, length = struct.unpack(">BBI", header)
        return kind, self._exactly(length)

    def _exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EchoError("the receiver closed the connection during C-ECHO")
            buf += chunk
        return bytes(buf)


def _command_status(command: bytes) -> int | None:
    pos = 0
    while pos + 8 <= len(command):
        _, element, length = struct.unpack("<HHI", command[pos : pos + 8])
        if element == 0x0900:
            return int(struct.unpack("<H", command[pos + 8 : pos + 10])[0])
        pos += 8 + length
    return None


def measure_echo(host: str, port: int, called: str, count: int) -> tuple[float, list[float]]:
    """Seconds to associate, and of each of ``count`` C-ECHO round trips over that association."""
    client = EchoClient(host, port, called)
    try:
        assoc = client.associate()
        return assoc, [client.echo() for _ in range(count)]
    finally:
        client.close()
