"""Tests for the development PKI (gateway.pki) and the TLS policy (gateway.tls)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import re
import socket
import ssl
import stat
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.pki import (
    CA_COMMON_NAME,
    DevPki,
    IssuedCert,
    PkiError,
    create_dev_pki,
    fingerprint_sha256,
    issue_operator_cert,
    issue_professional_cert,
)
from gateway.tls import TlsConfigError, client_context, server_context
from smtp_in.identity import PeerIdentity, describe_tls, peer_identity

DOMAIN = "mssante.example.org"
OPERATOR_DOMAIN = "relay.operator.example"
PRO_ADDRESS = "Dr.House@Hopital.Example.org"
TIMEOUT = 10.0

DKIM_LINE = re.compile(
    r"^(?P<selector>[a-z0-9-]+)\._domainkey\.(?P<domain>[a-z0-9.-]+) IN TXT "
    r'"v=DKIM1; k=rsa; p=(?P<p>[A-Za-z0-9+/=]+)"$'
)


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return create_dev_pki(
        tmp_path_factory.mktemp("pki") / "certs",
        domain=DOMAIN,
        hostnames=["mx.mssante.example.org", "192.0.2.10"],
        dkim_selector="gw2024",
    )


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    return create_dev_pki(
        tmp_path_factory.mktemp("other") / "certs",
        domain="other.example",
        hostnames=[],
        dkim_selector="s1",
    )


@pytest.fixture(scope="module")
def pro(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> IssuedCert:
    return issue_professional_cert(pki.certs_dir, PRO_ADDRESS, tmp_path_factory.mktemp("pro"))


@pytest.fixture(scope="module")
def operator(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> IssuedCert:
    return issue_operator_cert(pki.certs_dir, OPERATOR_DOMAIN, tmp_path_factory.mktemp("operator"))


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ekus(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _verify_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    # Raises if the signature does not verify or the issuer does not match.
    cert.verify_directly_issued_by(ca)


# --------------------------------------------------------------------------
# Dev PKI
# --------------------------------------------------------------------------


def test_create_dev_pki_writes_all_files(pki: DevPki) -> None:
    names = {"ca.pem", "ca.key", "server.pem", "server.key", "dkim.key", "dkim.txt"}
    assert names <= {p.name for p in pki.certs_dir.iterdir()}
    # No leftover temporary files.
    assert {p.name for p in pki.certs_dir.iterdir()} == names
    for key in (pki.ca_key, pki.server_key, pki.dkim_key):
        assert _mode(key) == 0o600, key
    for public in (pki.ca_cert, pki.server_cert, pki.dkim_txt):
        assert _mode(public) == 0o644, public


def test_ca_certificate(pki: DevPki) -> None:
    ca = _load_cert(pki.ca_cert)
    cn = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == CA_COMMON_NAME == "MSSanté gateway dev CA"
    assert ca.subject == ca.issuer
    _verify_issued_by(ca, ca)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert key.public_key() == ca.public_key()
    assert pki.ca_fingerprint == fingerprint_sha256(pki.ca_cert.read_bytes())


def test_server_certificate(pki: DevPki) -> None:
    ca = _load_cert(pki.ca_cert)
    cert = _load_cert(pki.server_cert)
    _verify_issued_by(cert, ca)
    san = _san(cert)
    dns = san.get_values_for_type(x509.DNSName)
    ips = san.get_values_for_type(x509.IPAddress)
    assert "localhost" in dns
    assert "mx.mssante.example.org" in dns
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert ipaddress.ip_address("192.0.2.10") in ips
    # 127.0.0.1 must be an IPAddress SAN, not a DNS name.
    assert "127.0.0.1" not in dns
    assert _ekus(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    assert key.public_key() == cert.public_key()
    assert pki.hostnames == ("mx.mssante.example.org", "192.0.2.10")


def test_dkim_txt_matches_dkim_key(pki: DevPki) -> None:
    text = pki.dkim_txt.read_text(encoding="ascii")
    lines = text.splitlines()
    assert len(lines) == 1
    assert text == lines[0] + "\n"
    match = DKIM_LINE.match(lines[0])
    assert match is not None, lines[0]
    assert match["selector"] == "gw2024"
    assert match["domain"] == DOMAIN
    assert pki.dkim_record == lines[0]

    spki = base64.b64decode(match["p"], validate=True)
    public = serialization.load_der_public_key(spki)
    key_pem = pki.dkim_key.read_bytes()
    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    private = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(private, rsa.RSAPrivateKey)
    assert private.key_size == 2048
    assert public == private.public_key()


def test_dkim_key_signs_and_verifies_with_dkimpy(pki: DevPki) -> None:
    dkim = pytest.importorskip("dkim")
    message = (
        b"From: secretariat@mssante.example.org\r\n"
        b"To: patient@example.net\r\n"
        b"Subject: Rendez-vous\r\n"
        b"\r\n"
        b"Bonjour.\r\n"
    )
    signature = dkim.sign(
        message,
        b"gw2024",
        DOMAIN.encode(),
        pki.dkim_key.read_bytes(),
        include_headers=[b"from", b"to", b"subject"],
    )
    record = DKIM_LINE.match(pki.dkim_record)
    assert record is not None
    txt = f"v=DKIM1; k=rsa; p={record['p']}".encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"gw2024._domainkey.{DOMAIN}.".encode()
        return txt

    assert dkim.verify(signature + message, dnsfunc=dnsfunc)


def test_refuses_overwrite_without_force(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    first = create_dev_pki(certs, domain=DOMAIN, hostnames=[], dkim_selector="s1")
    before = {p.name: p.read_bytes() for p in certs.iterdir()}

    with pytest.raises(PkiError, match=r"ca\.pem"):
        create_dev_pki(certs, domain=DOMAIN, hostnames=[], dkim_selector="s1")
    assert {p.name: p.read_bytes() for p in certs.iterdir()} == before

    # A single pre-existing file is enough to refuse, and is named.
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "dkim.txt").write_text("keep me\n")
    with pytest.raises(PkiError, match=r"dkim\.txt"):
        create_dev_pki(lone, domain=DOMAIN, hostnames=[], dkim_selector="s1")
    assert sorted(p.name for p in lone.iterdir()) == ["dkim.txt"]
    assert (lone / "dkim.txt").read_text() == "keep me\n"

    second = create_dev_pki(certs, domain=DOMAIN, hostnames=[], dkim_selector="s1", force=True)
    after = {p.name: p.read_bytes() for p in certs.iterdir()}
    assert set(after) == set(before)
    assert after["ca.pem"] != before["ca.pem"]
    assert after["dkim.key"] != before["dkim.key"]
    assert second.ca_fingerprint != first.ca_fingerprint
    for key in ("ca.key", "server.key", "dkim.key"):
        assert _mode(certs / key) == 0o600


def test_force_tightens_permissions_of_existing_key(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "server.key").write_text("old")
    (certs / "server.key").chmod(0o644)
    create_dev_pki(certs, domain=DOMAIN, hostnames=[], dkim_selector="s1", force=True)
    assert _mode(certs / "server.key") == 0o600


def test_invalid_inputs(tmp_path: Path) -> None:
    with pytest.raises(PkiError):
        create_dev_pki(tmp_path / "a", domain="", hostnames=[], dkim_selector="s1")
    with pytest.raises(PkiError):
        create_dev_pki(tmp_path / "b", domain=DOMAIN, hostnames=["bad host"], dkim_selector="s")
    with pytest.raises(PkiError):
        create_dev_pki(tmp_path / "c", domain=DOMAIN, hostnames="localhost", dkim_selector="s")
    assert not (tmp_path / "a").exists()


def test_professional_cert(pki: DevPki, pro: IssuedCert) -> None:
    ca = _load_cert(pki.ca_cert)
    cert = _load_cert(pro.cert)
    _verify_issued_by(cert, ca)
    assert _san(cert).get_values_for_type(x509.RFC822Name) == ["Dr.House@hopital.example.org"]
    assert _san(cert).get_values_for_type(x509.DNSName) == []
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "Dr.House@hopital.example.org"
    assert _ekus(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert pro.ca.read_bytes() == pki.ca_cert.read_bytes()
    assert _mode(pro.key) == 0o600
    key = serialization.load_pem_private_key(pro.key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert pro.fingerprint == fingerprint_sha256(pro.cert.read_text())


def test_operator_cert(pki: DevPki, operator: IssuedCert) -> None:
    ca = _load_cert(pki.ca_cert)
    cert = _load_cert(operator.cert)
    _verify_issued_by(cert, ca)
    assert _san(cert).get_values_for_type(x509.DNSName) == [OPERATOR_DOMAIN]
    assert _san(cert).get_values_for_type(x509.RFC822Name) == []
    assert _ekus(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert operator.ca.read_bytes() == pki.ca_cert.read_bytes()
    assert _mode(operator.key) == 0o600


def test_issue_refuses_overwrite_and_missing_ca(pki: DevPki, tmp_path: Path) -> None:
    out = tmp_path / "pro"
    first = issue_professional_cert(pki.certs_dir, "a@b.example", out)
    with pytest.raises(PkiError, match=r"cert\.pem"):
        issue_professional_cert(pki.certs_dir, "a@b.example", out)
    second = issue_professional_cert(pki.certs_dir, "a@b.example", out, force=True)
    assert second.fingerprint != first.fingerprint

    with pytest.raises(PkiError, match=r"CA certificate not found: .*ca\.pem"):
        issue_operator_cert(tmp_path / "nowhere", OPERATOR_DOMAIN, tmp_path / "op")
    with pytest.raises(PkiError, match="e-mail"):
        issue_professional_cert(pki.certs_dir, "not-an-address", tmp_path / "x")
    assert not (tmp_path / "op").exists()


def test_fingerprint_forms(pki: DevPki) -> None:
    pem = pki.server_cert.read_bytes()
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    fp = fingerprint_sha256(der)
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert fp == fingerprint_sha256(pem)
    assert fp == fingerprint_sha256(pem.decode())
    assert fp == fingerprint_sha256(cert)
    assert fp == cert.fingerprint(hashes.SHA256()).hex()


# --------------------------------------------------------------------------
# TLS policy
# --------------------------------------------------------------------------


def test_cipher_policy(pki: DevPki) -> None:
    ctx = server_context(pki.server_cert, pki.server_key, pki.ca_cert)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    for cipher in tls12:
        assert cipher["kea"] == "kx-ecdhe", cipher["name"]
        assert cipher["symmetric"].startswith("aes-"), cipher["name"]
        assert cipher["aead"] or cipher["digest"] in {"sha256", "sha384"}, cipher["name"]

    client = client_context(pki.ca_cert, None, None)
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2
    assert client.check_hostname and client.verify_mode == ssl.CERT_REQUIRED
    assert {c["name"] for c in client.get_ciphers() if c["protocol"] == "TLSv1.2"} == {
        c["name"] for c in tls12
    }

    no_ca = server_context(pki.server_cert, pki.server_key, None)
    assert no_ca.verify_mode == ssl.CERT_NONE


def test_context_errors(pki: DevPki, tmp_path: Path) -> None:
    with pytest.raises(TlsConfigError, match=r"missing\.pem"):
        server_context(tmp_path / "missing.pem", pki.server_key, None)
    with pytest.raises(TlsConfigError):
        # Key does not match certificate.
        server_context(pki.server_cert, pki.ca_key, None)
    with pytest.raises(TlsConfigError, match=r"nope\.pem"):
        client_context(tmp_path / "nope.pem", None, None)


@dataclass
class ServerOutcome:
    identity: PeerIdentity | None = None
    description: str | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class TlsServer:
    port: int
    outcome: ServerOutcome


def _serve_once(ctx: ssl.SSLContext) -> Iterator[TlsServer]:
    """Accept one TLS connection on loopback, record the outcome, send b'hello'."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    outcome = ServerOutcome()

    def run() -> None:
        try:
            conn, _ = listener.accept()
        except OSError as exc:
            outcome.error = exc
            outcome.done.set()
            return
        conn.settimeout(TIMEOUT)
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                outcome.identity = peer_identity(tls)
                outcome.description = describe_tls(tls)
                tls.sendall(b"hello")
                # Wait for the client to close so it can read the greeting.
                try:
                    tls.recv(1)
                except (OSError, ssl.SSLError):
                    pass
        except (OSError, ssl.SSLError) as exc:
            outcome.error = exc
        finally:
            conn.close()
            outcome.done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield TlsServer(listener.getsockname()[1], outcome)
    finally:
        thread.join(TIMEOUT)
        listener.close()


@pytest.fixture
def tls_server(pki: DevPki) -> Iterator[TlsServer]:
    yield from _serve_once(server_context(pki.server_cert, pki.server_key, pki.ca_cert))


@pytest.fixture
def operator_server(operator: IssuedCert) -> Iterator[TlsServer]:
    yield from _serve_once(server_context(operator.cert, operator.key, None))


def _talk(server: TlsServer, ctx: ssl.SSLContext, hostname: str) -> tuple[bytes, str]:
    """Connect, handshake, read the greeting; return it with the session description."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname=hostname) as tls:
            data = b""
            while len(data) < 5:
                chunk = tls.recv(5 - len(data))
                if not chunk:
                    break
                data += chunk
            return data, describe_tls(tls)


def _expect_refused(server: TlsServer, ctx: ssl.SSLContext, hostname: str = "localhost") -> None:
    """The handshake must fail: the client sees an error or EOF, the server an SSLError."""
    try:
        data, _ = _talk(server, ctx, hostname)
    except (ssl.SSLError, ConnectionError):
        pass
    else:
        assert data != b"hello"
    assert server.outcome.done.wait(TIMEOUT)
    assert isinstance(server.outcome.error, ssl.SSLError), server.outcome.error
    assert server.outcome.identity is None


def test_handshake_with_professional_cert(
    pki: DevPki, pro: IssuedCert, tls_server: TlsServer
) -> None:
    ctx = client_context(pki.ca_cert, pro.cert, pro.key)
    data, description = _talk(tls_server, ctx, "localhost")
    assert data == b"hello"
    assert tls_server.outcome.done.wait(TIMEOUT)
    assert tls_server.outcome.error is None
    identity = tls_server.outcome.identity
    assert identity is not None
    assert identity.emails == ("dr.house@hopital.example.org",)
    assert identity.dns_names == ()
    assert identity.fingerprint == pro.fingerprint
    assert "dr.house@hopital.example.org" in identity.subject.lower()
    assert re.fullmatch(r"TLSv1\.3 cipher TLS_\w+ bits \d+", description), description
    assert tls_server.outcome.description == description


def test_handshake_without_client_cert(pki: DevPki, tls_server: TlsServer) -> None:
    data, _ = _talk(tls_server, client_context(pki.ca_cert, None, None), "localhost")
    assert data == b"hello"
    assert tls_server.outcome.done.wait(TIMEOUT)
    assert tls_server.outcome.error is None
    assert tls_server.outcome.identity is None


def test_handshake_tls12_ecdhe(pki: DevPki, pro: IssuedCert, tls_server: TlsServer) -> None:
    ctx = client_context(pki.ca_cert, pro.cert, pro.key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    data, description = _talk(tls_server, ctx, "127.0.0.1")
    assert data == b"hello"
    assert re.fullmatch(r"TLSv1\.2 cipher ECDHE-ECDSA-AES\d+-GCM-SHA\d+ bits \d+", description)
    assert tls_server.outcome.done.wait(TIMEOUT)
    assert tls_server.outcome.identity is not None
    assert tls_server.outcome.identity.emails == ("dr.house@hopital.example.org",)


def test_client_cert_from_other_ca_is_rejected(
    pki: DevPki, other_pki: DevPki, tmp_path: Path, tls_server: TlsServer
) -> None:
    rogue = issue_professional_cert(other_pki.certs_dir, PRO_ADDRESS, tmp_path / "rogue")
    ctx = client_context(pki.ca_cert, rogue.cert, rogue.key)
    _expect_refused(tls_server, ctx)
    assert isinstance(tls_server.outcome.error, ssl.SSLCertVerificationError)


def test_client_cert_from_other_ca_is_rejected_tls12(
    pki: DevPki, other_pki: DevPki, tmp_path: Path, tls_server: TlsServer
) -> None:
    rogue = issue_professional_cert(other_pki.certs_dir, PRO_ADDRESS, tmp_path / "rogue")
    ctx = client_context(pki.ca_cert, rogue.cert, rogue.key)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(ssl.SSLError):
        _talk(tls_server, ctx, "localhost")
    assert tls_server.outcome.done.wait(TIMEOUT)
    assert isinstance(tls_server.outcome.error, ssl.SSLError)


def _lax_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_tls11_client_is_refused(tls_server: TlsServer) -> None:
    ctx = _lax_client()
    # Allow legacy protocols on the client side so that it really offers
    # TLS 1.1 and the refusal comes from the server.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    _expect_refused(tls_server, ctx)
    assert "UNSUPPORTED_PROTOCOL" in str(tls_server.outcome.error)


@pytest.fixture(scope="module")
def rsa_server(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An RSA server certificate, so that RSA key exchange would be possible."""
    ca_cert = _load_cert(pki.ca_cert)
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out = tmp_path_factory.mktemp("rsa")
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return out / "cert.pem", out / "key.pem"


def _tls12_client(cipher: str) -> ssl.SSLContext:
    ctx = _lax_client()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(cipher)
    return ctx


@pytest.mark.parametrize(
    "cipher",
    [
        "AES256-GCM-SHA384",  # RSA key exchange, no forward secrecy
        "AES128-SHA256",  # RSA key exchange, CBC
        "ECDHE-ECDSA-AES256-SHA",  # ECDHE but CBC with SHA-1
        "ECDHE-ECDSA-CHACHA20-POLY1305",  # ECDHE but not AES
    ],
)
def test_disallowed_tls12_cipher_is_refused(tls_server: TlsServer, cipher: str) -> None:
    _expect_refused(tls_server, _tls12_client(cipher))
    assert "NO_SHARED_CIPHER" in str(tls_server.outcome.error)


@pytest.mark.parametrize("cipher", ["AES256-GCM-SHA384", "ECDHE-RSA-AES256-SHA"])
def test_disallowed_tls12_cipher_is_refused_by_rsa_server(
    rsa_server: tuple[Path, Path], cipher: str
) -> None:
    cert, key = rsa_server
    # Control: a permissive server with the same RSA certificate accepts it,
    # so the refusal below really comes from our cipher policy.
    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lax.set_ciphers("ALL:@SECLEVEL=0")
    lax.load_cert_chain(cert, key)
    for server in _serve_once(lax):
        data, description = _talk(server, _tls12_client(cipher), "localhost")
        assert data == b"hello"
        assert f"cipher {cipher} " in description
    for server in _serve_once(server_context(cert, key, None)):
        _expect_refused(server, _tls12_client(cipher))
        assert "NO_SHARED_CIPHER" in str(server.outcome.error)


def test_allowed_tls12_cipher_with_rsa_server(rsa_server: tuple[Path, Path]) -> None:
    cert, key = rsa_server
    for server in _serve_once(server_context(cert, key, None)):
        data, description = _talk(server, _tls12_client("DEFAULT"), "localhost")
        assert data == b"hello"
        assert description.startswith("TLSv1.2 cipher ECDHE-RSA-AES256-GCM-SHA384 ")


def test_client_context_verifies_operator_server(pki: DevPki, operator_server: TlsServer) -> None:
    data, description = _talk(operator_server, client_context(pki.ca_cert), OPERATOR_DOMAIN)
    assert data == b"hello"
    assert description.startswith("TLSv1.3 cipher ")


def test_client_context_rejects_wrong_hostname(pki: DevPki, operator_server: TlsServer) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match=r"[Hh]ostname mismatch"):
        _talk(operator_server, client_context(pki.ca_cert), "wrong.example")
    assert operator_server.outcome.done.wait(TIMEOUT)
    assert operator_server.outcome.identity is None


def test_client_context_rejects_other_ca(other_pki: DevPki, operator_server: TlsServer) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _talk(operator_server, client_context(other_pki.ca_cert), OPERATOR_DOMAIN)


async def test_asyncio_server_peer_identity(pki: DevPki, operator: IssuedCert) -> None:
    """Operator-to-gateway mutual TLS through asyncio, as the servers use it."""
    seen: asyncio.Queue[tuple[PeerIdentity | None, str]] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        await seen.put((peer_identity(ssl_object), describe_tls(ssl_object)))
        writer.write(b"220 ready\r\n")
        await writer.drain()
        await reader.read()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(
        handle,
        "127.0.0.1",
        0,
        ssl=server_context(pki.server_cert, pki.server_key, pki.ca_cert),
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            port,
            ssl=client_context(pki.ca_cert, operator.cert, operator.key),
            server_hostname="localhost",
        )
        assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"220 ready\r\n"
        identity, description = await asyncio.wait_for(seen.get(), TIMEOUT)
        writer.close()
        await writer.wait_closed()

    assert identity is not None
    assert identity.dns_names == (OPERATOR_DOMAIN,)
    assert identity.emails == ()
    assert identity.fingerprint == operator.fingerprint
    assert description.startswith("TLSv1.3 cipher ")
