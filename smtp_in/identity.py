"""Who is sending, as TLS tells it (SPEC §4.2): the identity in a verified client certificate
and the negotiated session named in the ``Received:`` field."""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass

from cryptography import x509


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Identity extracted from a verified peer certificate."""

    emails: tuple[str, ...]
    dns_names: tuple[str, ...]
    fingerprint: str
    subject: str


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
