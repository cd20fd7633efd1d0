"""Development PKI for the gateway.

This module builds a small, self-contained certificate hierarchy suitable for
local development, tests and demonstrations:

* a self-signed CA (``ca.pem`` / ``ca.key``);
* a TLS server certificate for the SMTP and IMAP listeners
  (``server.pem`` / ``server.key``);
* an RSA 2048 DKIM signing key (``dkim.key``) and the matching DNS TXT record
  (``dkim.txt``);
* on demand, client certificates for health professionals (``rfc822Name`` SAN)
  and operator certificates (``dNSName`` SAN, usable as TLS client and server).

TLS keys use ECDSA P-256 (fast to generate and to handshake with); the DKIM key
uses RSA 2048 because that is what DKIM verifiers universally support.

None of this is meant for production: a real deployment uses certificates
issued by the relevant national authority.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_COMMON_NAME",
    "DevPki",
    "IssuedCert",
    "PkiError",
    "create_dev_pki",
    "dkim_txt_record",
    "fingerprint_sha256",
    "issue_operator_cert",
    "issue_professional_cert",
    "load_ca",
]

CA_COMMON_NAME = "MSSanté gateway dev CA"
ORGANIZATION = "MSSanté gateway (development)"

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
DKIM_KEY_FILE = "dkim.key"
DKIM_TXT_FILE = "dkim.txt"

ISSUED_CERT_FILE = "cert.pem"
ISSUED_KEY_FILE = "key.pem"
ISSUED_CA_FILE = "ca.pem"

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=825)
# Backdate certificates slightly so that small clock skews between the host
# that generated them and the host that checks them do not matter.
CLOCK_SKEW = dt.timedelta(minutes=5)

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644

TlsPrivateKey = ec.EllipticCurvePrivateKey


class PkiError(Exception):
    """Raised when the development PKI cannot be created or used."""


@dataclass(frozen=True, slots=True)
class DevPki:
    """Paths and metadata of a freshly created development PKI."""

    certs_dir: Path
    domain: str
    hostnames: tuple[str, ...]
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    dkim_selector: str
    dkim_key: Path
    dkim_txt: Path
    dkim_record: str
    ca_fingerprint: str
    server_fingerprint: str


@dataclass(frozen=True, slots=True)
class IssuedCert:
    """Paths and metadata of a certificate issued by the development CA."""

    cert: Path
    key: Path
    ca: Path
    subject: str
    fingerprint: str


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def fingerprint_sha256(cert: str | bytes | x509.Certificate) -> str:
    """Return the SHA-256 fingerprint of a certificate as lowercase hex.

    ``cert`` may be a PEM string, PEM bytes, DER bytes or an already parsed
    :class:`cryptography.x509.Certificate`. The fingerprint is computed over the
    DER encoding, as ``openssl x509 -fingerprint -sha256`` does.
    """
    if isinstance(cert, x509.Certificate):
        der = cert.public_bytes(serialization.Encoding.DER)
    else:
        data = cert.encode("ascii") if isinstance(cert, str) else bytes(cert)
        if b"-----BEGIN" in data:
            try:
                parsed = x509.load_pem_x509_certificate(data)
            except ValueError as exc:
                raise PkiError(f"invalid PEM certificate: {exc}") from exc
            der = parsed.public_bytes(serialization.Encoding.DER)
        else:
            der = data
    return hashlib.sha256(der).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_tls_key() -> TlsPrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Atomically write ``data`` to ``path`` with permission bits ``mode``.

    The content is written to a temporary file created in the destination
    directory (mkstemp creates it with mode 0600, so a private key is never
    readable by others, even briefly) and then renamed over the target.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_overwrite(paths: Iterable[Path], force: bool) -> None:
    """Refuse to go on if any of ``paths`` exists, unless ``force`` is set."""
    if force:
        return
    for path in paths:
        if path.exists() or path.is_symlink():
            raise PkiError(f"refusing to overwrite existing file {path} (use force to replace it)")


def _validate_dns_name(name: str, what: str) -> str:
    name = name.strip().rstrip(".").lower()
    if not name:
        raise PkiError(f"{what} must not be empty")
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise PkiError(f"invalid {what} {name!r}: {exc}") from exc
    labels = ascii_name.split(".")
    for label in labels:
        if not label or len(label) > 63:
            raise PkiError(f"invalid {what} {name!r}")
        if label.startswith("-") or label.endswith("-"):
            raise PkiError(f"invalid {what} {name!r}")
        if not all(c.isalnum() or c in "-_" for c in label):
            raise PkiError(f"invalid {what} {name!r}")
    return ascii_name


def _validate_email(address: str) -> str:
    address = address.strip()
    local, sep, domain = address.rpartition("@")
    if not sep or not local or not domain:
        raise PkiError(f"invalid e-mail address {address!r}")
    if any(c.isspace() or c in '<>"(),;:[]\\' for c in local) or not local.isascii():
        raise PkiError(f"invalid e-mail address {address!r}")
    return f"{local}@{_validate_dns_name(domain, 'e-mail domain')}"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


# --------------------------------------------------------------------------
# Certificate builders
# --------------------------------------------------------------------------


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             now: dt.datetime, not_after: dt.datetime, *, ca: bool) -> x509.CertificateBuilder:
    """A certificate from now (less the clock skew) to ``not_after`` with its basic
    constraints and key usage: a CA signs certificates (and CRLs), a leaf signs data."""
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                       critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )


def _build_ca(key: TlsPrivateKey) -> x509.Certificate:
    name = _name(CA_COMMON_NAME)
    now = _now()
    public_key = key.public_key()
    return (
        _builder(name, name, public_key, now, now + CA_VALIDITY, ca=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def _new_leaf(ca_cert: x509.Certificate, ca_key: TlsPrivateKey, common_name: str,
              san: Sequence[x509.GeneralName], ekus: Sequence[x509.ObjectIdentifier],
              ) -> tuple[TlsPrivateKey, x509.Certificate]:
    """A new key and its certificate signed by the CA (server or client, by ``ekus``)."""
    key = _new_tls_key()
    now = _now()
    not_after = min(now + LEAF_VALIDITY, ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        _builder(_name(common_name), ca_cert.subject, key.public_key(), now, not_after,
                 ca=False)
        .add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _host_general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip()))
    except ValueError:
        return x509.DNSName(_validate_dns_name(host, "host name"))


# --------------------------------------------------------------------------
# DKIM
# --------------------------------------------------------------------------


def dkim_txt_record(selector: str, domain: str, public_key: rsa.RSAPublicKey) -> str:
    """Return the zone-file line publishing ``public_key`` for DKIM.

    Format: ``<selector>._domainkey.<domain> IN TXT "v=DKIM1; k=rsa; p=<b64>"``
    where ``<b64>`` is the base64 of the DER SubjectPublicKeyInfo.
    """
    spki = public_key.public_bytes(
        encoding=serialization.Encoding.DER,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    p = base64.b64encode(spki).decode("ascii")
    return f'{selector}._domainkey.{domain} IN TXT "v=DKIM1; k=rsa; p={p}"'


def _validate_selector(selector: str) -> str:
    selector = selector.strip()
    if not selector:
        raise PkiError("DKIM selector must not be empty")
    return _validate_dns_name(selector, "DKIM selector")


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def create_dev_pki(
    certs_dir: Path,
    *,
    domain: str,
    hostnames: Sequence[str],
    dkim_selector: str,
    force: bool = False,
) -> DevPki:
    """Create a complete development PKI in ``certs_dir``.

    Writes ``ca.pem``/``ca.key``, ``server.pem``/``server.key``, ``dkim.key``
    and ``dkim.txt``. Raises :class:`PkiError` if any of these files already
    exists and ``force`` is false; in that case nothing is written.
    """
    if isinstance(hostnames, str):
        raise PkiError("hostnames must be a sequence of host names, not a string")
    certs_dir = Path(certs_dir)
    domain = _validate_dns_name(domain, "domain")
    selector = _validate_selector(dkim_selector)

    paths = {
        name: certs_dir / name
        for name in (
            CA_CERT_FILE,
            CA_KEY_FILE,
            SERVER_CERT_FILE,
            SERVER_KEY_FILE,
            DKIM_KEY_FILE,
            DKIM_TXT_FILE,
        )
    }
    if certs_dir.exists() and not certs_dir.is_dir():
        raise PkiError(f"{certs_dir} exists and is not a directory")
    _check_overwrite(paths.values(), force)

    # Subject alternative names: localhost and 127.0.0.1 always, then the
    # host names given, without duplicates and in a stable order.
    san: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    for host in hostnames:
        general_name = _host_general_name(host)
        if general_name not in san:
            san.append(general_name)
    host_names = tuple(
        gn.value if isinstance(gn, x509.DNSName) else str(gn.value) for gn in san[2:]
    )
    server_cn = host_names[0] if host_names else "localhost"

    ca_key = _new_tls_key()
    ca_cert = _build_ca(ca_key)
    server_key, server_cert = _new_leaf(
        ca_cert, ca_key, server_cn, san,
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    dkim_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    record = dkim_txt_record(selector, domain, dkim_key.public_key())

    certs_dir.mkdir(parents=True, exist_ok=True)
    _write_file(paths[CA_KEY_FILE], _key_pem(ca_key), PRIVATE_MODE)
    _write_file(paths[CA_CERT_FILE], _cert_pem(ca_cert), PUBLIC_MODE)
    _write_file(paths[SERVER_KEY_FILE], _key_pem(server_key), PRIVATE_MODE)
    _write_file(paths[SERVER_CERT_FILE], _cert_pem(server_cert), PUBLIC_MODE)
    _write_file(paths[DKIM_KEY_FILE], _key_pem(dkim_key), PRIVATE_MODE)
    _write_file(paths[DKIM_TXT_FILE], (record + "\n").encode("ascii"), PUBLIC_MODE)

    return DevPki(
        certs_dir=certs_dir,
        domain=domain,
        hostnames=host_names,
        ca_cert=paths[CA_CERT_FILE],
        ca_key=paths[CA_KEY_FILE],
        server_cert=paths[SERVER_CERT_FILE],
        server_key=paths[SERVER_KEY_FILE],
        dkim_selector=selector,
        dkim_key=paths[DKIM_KEY_FILE],
        dkim_txt=paths[DKIM_TXT_FILE],
        dkim_record=record,
        ca_fingerprint=fingerprint_sha256(ca_cert),
        server_fingerprint=fingerprint_sha256(server_cert),
    )


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, TlsPrivateKey]:
    """Load the development CA certificate and key from ``ca_dir``."""
    ca_dir = Path(ca_dir)
    cert_path = ca_dir / CA_CERT_FILE
    key_path = ca_dir / CA_KEY_FILE
    for path, what in ((cert_path, "certificate"), (key_path, "private key")):
        if not path.is_file():
            raise PkiError(f"CA {what} not found: {path} (create the dev PKI first)")
    try:
        ca_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError as exc:
        raise PkiError(f"invalid CA certificate {cert_path}: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"invalid CA private key {key_path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"unsupported CA key type in {key_path} (expected ECDSA)")
    if key.public_key() != ca_cert.public_key():
        raise PkiError(f"CA private key {key_path} does not match certificate {cert_path}")
    try:
        constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PkiError(f"{cert_path} is not a CA certificate")
    return ca_cert, key


def _issue(
    ca_dir: Path,
    out_dir: Path,
    *,
    common_name: str,
    san: Sequence[x509.GeneralName],
    ekus: Sequence[x509.ObjectIdentifier],
    force: bool,
) -> IssuedCert:
    out_dir = Path(out_dir)
    cert_path = out_dir / ISSUED_CERT_FILE
    key_path = out_dir / ISSUED_KEY_FILE
    ca_path = out_dir / ISSUED_CA_FILE
    ca_cert, ca_key = load_ca(ca_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PkiError(f"{out_dir} exists and is not a directory")
    # When out_dir is ca_dir itself, ca.pem is the very file we copy: leave it.
    same_ca_file = ca_path.exists() and ca_path.resolve() == (Path(ca_dir) / CA_CERT_FILE).resolve()
    to_check = [cert_path, key_path] if same_ca_file else [cert_path, key_path, ca_path]
    _check_overwrite(to_check, force)

    key, cert = _new_leaf(ca_cert, ca_key, common_name, san, ekus)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_file(key_path, _key_pem(key), PRIVATE_MODE)
    _write_file(cert_path, _cert_pem(cert), PUBLIC_MODE)
    if not same_ca_file:
        _write_file(ca_path, _cert_pem(ca_cert), PUBLIC_MODE)
    return IssuedCert(
        cert=cert_path,
        key=key_path,
        ca=ca_path,
        subject=cert.subject.rfc4514_string(),
        fingerprint=fingerprint_sha256(cert),
    )


def issue_professional_cert(
    ca_dir: Path, address: str, out_dir: Path, force: bool = False
) -> IssuedCert:
    """Issue a TLS client certificate for a health professional.

    The certificate carries ``address`` both as subject CN and as an
    ``rfc822Name`` SAN, with the clientAuth extended key usage. Files written:
    ``out_dir/cert.pem``, ``out_dir/key.pem`` (0600) and ``out_dir/ca.pem``.
    """
    address = _validate_email(address)
    return _issue(
        ca_dir,
        out_dir,
        common_name=address,
        san=[x509.RFC822Name(address)],
        ekus=[ExtendedKeyUsageOID.CLIENT_AUTH],
        force=force,
    )


def issue_operator_cert(
    ca_dir: Path, domain: str, out_dir: Path, force: bool = False
) -> IssuedCert:
    """Issue an operator certificate for ``domain``.

    The certificate carries ``domain`` as subject CN and ``dNSName`` SAN with
    both the serverAuth and clientAuth extended key usages, so that the same
    certificate can authenticate the operator's relay as a TLS client and its
    servers as a TLS server. Files written as for
    :func:`issue_professional_cert`.
    """
    domain = _validate_dns_name(domain, "operator domain")
    return _issue(
        ca_dir,
        out_dir,
        common_name=domain,
        san=[x509.DNSName(domain)],
        ekus=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        force=force,
    )
