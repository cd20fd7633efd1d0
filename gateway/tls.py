"""TLS policy of the SMTP and IMAP servers and the outbound relay client: the composition
root builds their contexts here and hands them over.

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

import ssl
from pathlib import Path

from gateway.tlslog import log_refused_handshakes

__all__ = [
    "MINIMUM_VERSION",
    "TLS12_CIPHERS",
    "TlsConfigError",
    "client_context",
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
    log_refused_handshakes(ctx)
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
