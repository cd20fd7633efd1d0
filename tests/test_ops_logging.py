"""Logs of the real gateway: ``[logging] format = "json"`` (one object per line), each refused
TLS handshake logged once with its reason and peer (and counted), and no asyncio warning when
a client closes TLS right after STARTTLS."""

from __future__ import annotations

import datetime
import io
import json
import logging
import socket
import ssl
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.logsetup import JsonFormatter
from tests.conftest import prepare_gateway, running
from tests.gateway_proc import Gateway, free_port, set_listen
from tests.helpers import tls_context


@pytest.fixture
def gateway_with(gw_dir: Path, request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """A gateway with metrics on and ``[logging] format`` from the test's parameter."""
    gw: Gateway = prepare_gateway(gw_dir)  # type: ignore[assignment]
    gw.ports["metrics"] = free_port()
    set_listen(gw.config, "metrics", f"127.0.0.1:{gw.ports['metrics']}")
    log_format = getattr(request, "param", "text")
    text = gw.config.read_text().replace('format = "text"', f'format = "{log_format}"')
    gw.config.write_text(text)
    yield from running(gw)  # type: ignore[misc]


def wait_for(gw: Gateway, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while needle not in gw.log():
        assert time.monotonic() < deadline, f"{needle!r} never logged:\n{gw.log()}"
        time.sleep(0.05)
    return gw.log()


def lines_with(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if needle in line]


def untrusted_client(tmp: Path) -> ssl.SSLContext:
    """A client context presenting a self-signed certificate (no chain to our client CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intrus.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.RFC822Name("x@intrus.example")]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    (tmp / "intrus.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "intrus.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(tmp / "intrus.pem"), str(tmp / "intrus.key"))
    return ctx


def no_verify(**settings: object) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for key, value in settings.items():
        setattr(ctx, key, value)
    return ctx


def refused_handshake(port: int, ctx: ssl.SSLContext, starttls: bytes | None = None) -> int:
    """Try a handshake that the server refuses; the client's local port (the peer in logs)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        local_port = int(raw.getsockname()[1])
        if starttls is not None:
            raw.recv(4096)
            raw.sendall(starttls)
            while b"\n" not in raw.recv(4096):
                pass
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"EHLO x\r\n")  # TLS 1.3: a refused client certificate shows here
                if not tls.recv(4096):
                    raise ConnectionResetError("closed")
    return local_port


def test_refused_handshakes_logged_once_with_reason_and_peer(gateway_with: Gateway,
                                                             tmp_path: Path) -> None:
    gw = gateway_with
    old = no_verify(maximum_version=ssl.TLSVersion.TLSv1_2)
    old.set_ciphers("AES128-SHA")  # no ECDHE, no GCM: not in our TLS 1.2 list
    cases = [
        # STARTTLS on SMTP: no cipher in common
        (refused_handshake(gw.ports["smtp"], old, b"STARTTLS\r\n"), "NO_SHARED_CIPHER", ""),
        # implicit TLS on IMAP: the same
        (refused_handshake(gw.ports["imaps"], old), "NO_SHARED_CIPHER", ""),
        # implicit TLS on submissions: a client certificate that does not chain to our CA
        (refused_handshake(gw.ports["submissions"], untrusted_client(tmp_path)),
         "CERTIFICATE_VERIFY_FAILED", "self-signed certificate"),
    ]
    for peer_port, reason, detail in cases:
        needle = f"peer=127.0.0.1:{peer_port} "
        log = wait_for(gw, needle)
        lines = lines_with(log, needle)
        assert len(lines) == 1, lines  # once
        assert "TLS handshake refused" in lines[0] and f"reason={reason}" in lines[0], lines
        assert detail in lines[0]
    assert "Traceback" not in gw.log()
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.ports['metrics']}/metrics",
                                timeout=10) as response:
        text = response.read().decode()
    assert 'mssante_tls_handshake_failures_total{reason="NO_SHARED_CIPHER"} 2.0' in text
    assert 'mssante_tls_handshake_failures_total{reason="CERTIFICATE_VERIFY_FAILED"} 1.0' in text


def close_right_after_handshake(gw: Gateway, port: int, commands: list[bytes],
                                data: bytes) -> None:
    """STARTTLS, then the client's Finished, ``data`` and its close_notify in ONE write: the
    server sees the end of TLS while it completes the handshake."""
    ctx = tls_context(gw)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.recv(4096)
        for command in commands:
            raw.sendall(command)
            time.sleep(0.05)
            raw.recv(4096)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    raw.sendall(outgoing.read())
                chunk = raw.recv(65536)
                assert chunk, "server closed during the handshake"
                incoming.write(chunk)
        if data:
            tls.write(data)
        with pytest.raises(ssl.SSLWantReadError):
            tls.unwrap()  # our close_notify goes out, the server's is not read
        raw.sendall(outgoing.read())
        time.sleep(0.1)


def test_no_asyncio_warning_when_tls_ends_with_the_handshake(gateway_with: Gateway) -> None:
    gw = gateway_with
    for _ in range(3):
        close_right_after_handshake(gw, gw.ports["imap"], [b"a STARTTLS\r\n"], b"b NOOP\r\n")
        close_right_after_handshake(gw, gw.ports["imap"], [b"a STARTTLS\r\n"], b"")
        close_right_after_handshake(gw, gw.ports["smtp"], [b"EHLO x\r\n", b"STARTTLS\r\n"],
                                    b"EHLO x\r\n")
    deadline = time.monotonic() + 10
    while len(lines_with(gw.log(), "TLS started")) < 6:  # the IMAP sessions did start TLS
        assert time.monotonic() < deadline, gw.log()
        time.sleep(0.05)
    time.sleep(0.3)  # and ended
    log = gw.log()
    assert "eof_received" not in log, log
    assert "logger=asyncio" not in log, log


@pytest.mark.parametrize("gateway_with", ["json"], indirect=True)
def test_json_logs_one_object_per_line(gateway_with: Gateway) -> None:
    gw = gateway_with
    old = no_verify(maximum_version=ssl.TLSVersion.TLSv1_2)
    old.set_ciphers("AES128-SHA")
    peer_port = refused_handshake(gw.ports["imaps"], old)
    wait_for(gw, f"127.0.0.1:{peer_port}")
    records = []
    for line in gw.log().splitlines():
        record = json.loads(line)  # every line, the ready banner included
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), line
        assert record["time"].endswith("Z")
        records.append(record)
    assert any(r["message"].startswith("mssante-gateway ready: smtp=") for r in records)
    refused = [r for r in records if r["logger"] == "gateway.tls"]
    assert len(refused) == 1
    assert refused[0]["level"] == "warning"
    assert refused[0]["peer"] == f"127.0.0.1:{peer_port}"
    assert refused[0]["reason"] == "NO_SHARED_CIPHER"
    assert refused[0]["port"] == str(gw.ports["imaps"])


def test_json_formatter_extra_fields_and_exceptions() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.ops")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        log.debug("plain %s", "arg")
        log.info("with fields", extra={"conn": "ab12", "count": 3, "when": Path("/x")})
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["message"] == "plain arg" and first["level"] == "debug"
    assert first["logger"] == "tests.ops"
    assert (second["conn"], second["count"], second["when"]) == ("ab12", 3, "/x")
    assert third["level"] == "error" and third["message"] == "failed"
    assert "ValueError: boom" in third["exception"]
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": "x"})), str)


def test_a_patient_login_by_smtp_logs_no_warning(gateway: Gateway) -> None:
    """aiosmtpd warned 'Session.login_data is deprecated' at every successful AUTH (it sets
    that attribute itself): a warning per login in normal operation."""
    import smtplib

    from tests.conftest import INAYA, PATIENT_PASSWORD

    with smtplib.SMTP_SSL("127.0.0.1", gateway.ports["submissions"],
                          context=tls_context(gateway), timeout=30) as conn:
        conn.login(INAYA, PATIENT_PASSWORD)
    deadline = time.monotonic() + 10
    while "authenticated patient by password" not in gateway.log():
        assert time.monotonic() < deadline, gateway.log()[-2000:]
        time.sleep(0.05)
    assert "login_data is deprecated" not in gateway.log()
    assert "logger=mail.log" not in gateway.log()
