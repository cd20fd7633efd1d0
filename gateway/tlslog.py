"""One log line for each TLS handshake our listeners refuse, with the peer and the reason.

asyncio drops a failed server handshake without a word (``SSLProtocol._fatal_error`` logs an
``OSError``, which ``ssl.SSLError`` is, only in debug mode), so a professional whose
certificate expired, or a client that offers only TLS 1.0, left no trace. The server contexts
(``gateway/tls.py``) make their TLS objects of the class below (``SSLContext.sslobject_class``,
public API): when its handshake fails it logs the peer, the listener's port and OpenSSL's
reason (``UNSUPPORTED_PROTOCOL``, ``NO_SHARED_CIPHER``, ``CERTIFICATE_VERIFY_FAILED`` with the
verification message, ``TLSV1_ALERT_UNKNOWN_CA`` for a client refusing our certificate...),
once, and counts it in ``mssante_tls_handshake_failures_total``.

The peer is known to asyncio's ``SSLProtocol`` only, which calls ``do_handshake`` itself: it is
read from the calling frame (``sslproto.SSLProtocol._do_handshake`` in CPython 3.11-3.13); if
that ever changes the line says ``peer=?`` (and tests/test_ops_logging.py fails).
"""

from __future__ import annotations

import logging
import ssl
import sys
from typing import Any

from prometheus_client import Counter

log = logging.getLogger("gateway.tls")

HANDSHAKE_FAILURES = Counter(
    "mssante_tls_handshake_failures", "TLS handshakes refused by our listeners, by reason",
    ["reason"])


def _endpoints(caller: Any) -> tuple[str, str]:
    """``(peer "ip:port", local port)`` of the asyncio SSL protocol that called us."""
    transport = getattr(caller, "_transport", None)
    if transport is None:
        return "?", "?"
    peer = transport.get_extra_info("peername")
    local = transport.get_extra_info("sockname")
    peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"
    local_text = str(local[1]) if isinstance(local, tuple) and len(local) >= 2 else "?"
    return peer_text, local_text


def describe_failure(exc: ssl.SSLError) -> tuple[str, str]:
    """``(reason, detail)``: OpenSSL's reason code, and the certificate verification message
    or the error text."""
    reason = getattr(exc, "reason", None) or exc.__class__.__name__
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = str(exc.verify_message or "")
    else:
        detail = str(exc.strerror or exc)
    return str(reason), detail


class HandshakeLoggingSSLObject(ssl.SSLObject):
    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # not a failure: the handshake waits for more bytes
        except ssl.SSLError as exc:
            reason, detail = describe_failure(exc)
            peer, port = _endpoints(sys._getframe(1).f_locals.get("self"))
            HANDSHAKE_FAILURES.labels(reason).inc()
            log.warning("TLS handshake refused peer=%s port=%s reason=%s detail=%s",
                        peer, port, reason, detail,
                        extra={"peer": peer, "port": port, "reason": reason, "detail": detail})
            raise


def log_refused_handshakes(context: ssl.SSLContext) -> None:
    """Make ``context``'s server-side TLS objects log a refused handshake (see the top)."""
    context.sslobject_class = HandshakeLoggingSSLObject
