"""TLS policy shared by the SMTP and IMAP servers and the outbound relay client.

Policy:

* TLS 1.2 minimum; TLS 1.3 allowed with OpenSSL's default suites.
* TLS 1.2 cipher suites restricted to ECDHE key exchange with AES-GCM, or
  AES-CBC with SHA-256/SHA-384 MACs (ECDSA or RSA authentication).
* No TLS compression, server cipher preference, no renegotiation.
* Servers request (but do not require) a client certificate: any certificate
  presented is verified against the configured client CA during the handshake,
  and a certificate that fails verification aborts the handshake.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

__all__ = [
    "MINIMUM_VERSION",
    "TLS12_CIPHERS",
    "PeerIdentity",
    "TlsConfigError",
    "client_context",
    "describe_tls",
    "peer_identity",
    "server_context",
]

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

# Explicit OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are configured
# separately by OpenSSL and left at their defaults, which are all AEAD).
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-SHA384",
        "ECDHE-RSA-AES256-SHA384",
        "ECDHE-ECDSA-AES128-SHA256",
        "ECDHE-RSA-AES128-SHA256",
    ]
)

_HARDENING_OPTIONS = (
    ssl.OP_NO_COMPRESSION
    | ssl.OP_CIPHER_SERVER_PREFERENCE
    | ssl.OP_NO_RENEGOTIATION
    | ssl.OP_SINGLE_ECDH_USE
)


class TlsConfigError(Exception):
    """Raised when certificates or keys needed for a TLS context are unusable."""


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Identity extracted from a verified peer certificate."""

    emails: tuple[str, ...]
    dns_names: tuple[str, ...]
    fingerprint: str
    subject: str


def _apply_policy(ctx: ssl.SSLContext) -> None:
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= _HARDENING_OPTIONS
    try:
        ctx.set_ciphers(TLS12_CIPHERS)
    except ssl.SSLError as exc:  # pragma: no cover - depends on the OpenSSL build
        raise TlsConfigError(f"OpenSSL rejected the TLS 1.2 cipher list: {exc}") from exc


def _require_file(path: Path, what: str) -> None:
    if not Path(path).is_file():
        raise TlsConfigError(f"{what} not found: {path}")


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    _require_file(cert, "certificate")
    _require_file(key, "private key")
    try:
        ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    except ssl.SSLError as exc:
        raise TlsConfigError(f"cannot load certificate {cert} with key {key}: {exc}") from exc


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    _require_file(ca, "CA certificate")
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as exc:
        raise TlsConfigError(f"cannot load CA certificate {ca}: {exc}") from exc


def server_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """Build the TLS context of our SMTP and IMAP listeners.

    When ``client_ca`` is given, client certificates are requested but not
    required (``CERT_OPTIONAL``); a certificate that is presented must chain to
    ``client_ca`` or the handshake fails. Without ``client_ca`` no client
    certificate is requested.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _apply_policy(ctx)
    _load_chain(ctx, cert, key)
    if client_ca is not None:
        _load_ca(ctx, client_ca)
        ctx.verify_mode = ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def client_context(
    trust_ca: Path, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """Build the TLS context used by our outbound relays.

    The peer must present a certificate chaining to ``trust_ca`` and matching
    the ``server_hostname`` given when wrapping the socket. Our own client
    certificate is presented when ``cert`` is given (``key`` defaults to the
    key contained in ``cert``).
    """
    if key is not None and cert is None:
        raise TlsConfigError("a client key was given without a client certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _apply_policy(ctx)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, trust_ca)
    if cert is not None:
        _load_chain(ctx, cert, key if key is not None else cert)
    return ctx


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> PeerIdentity | None:
    """Return the identity in the peer certificate, or None if none was sent.

    The binary form is parsed because, with ``CERT_OPTIONAL``, the decoded
    dictionary returned by ``getpeercert()`` may be empty. Chain verification
    is done by OpenSSL during the handshake, so only a verified certificate
    (or none) can be seen here on a server built by :func:`server_context`
    with a client CA.
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    emails: list[str] = []
    dns_names: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    except ValueError:
        # Malformed extension: expose no names rather than failing the session.
        pass
    else:
        for email in san.get_values_for_type(x509.RFC822Name):
            lowered = email.lower()
            if lowered not in emails:
                emails.append(lowered)
        for dns_name in san.get_values_for_type(x509.DNSName):
            lowered = dns_name.lower()
            if lowered not in dns_names:
                dns_names.append(lowered)
    return PeerIdentity(
        emails=tuple(emails),
        dns_names=tuple(dns_names),
        fingerprint=hashlib.sha256(der).hexdigest(),
        subject=cert.subject.rfc4514_string(),
    )


def describe_tls(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str:
    """Describe the negotiated TLS session for a ``Received:`` header.

    Example: ``TLSv1.3 cipher TLS_AES_256_GCM_SHA384 bits 256``.
    """
    version = ssl_object.version() or "TLS"
    cipher = ssl_object.cipher()
    if cipher is None:
        return version
    name, _protocol, bits = cipher
    return f"{version} cipher {name} bits {bits}"
