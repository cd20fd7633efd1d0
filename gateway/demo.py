"""``mssante-gateway demo-operator``: a professional's operator for the demo.

A small SMTP server with STARTTLS standing for the mail operator of a professionals' domain
(``medecin.mssante.fr`` in ``demo.sh``): the gateway relays the patients' replies to it
(``[outbound.routes]``) and it prints each message it receives, then accepts it. It keeps
nothing. Development only: it accepts any recipient of any domain.
"""

from __future__ import annotations

import signal
import ssl
import sys
import threading
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import TextIO

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.tls import server_context
from smtp_in.identity import peer_identity

#: Characters of a message's text shown by the demo operator.
SHOWN_TEXT = 2000
#: The largest message the demo operator takes (bytes).
MAX_MESSAGE = 30 * 1024 * 1024


def describe(envelope: Envelope, data: bytes, peer: str) -> str:
    """What the operator received, for a terminal: envelope, main headers, the text."""
    msg = message_from_bytes(data, policy=policy.default)
    lines = [
        "",
        "=" * 72,
        f"demo operator: message received from {peer}",
        f"  MAIL FROM: {envelope.mail_from}",
        f"  RCPT TO:   {', '.join(envelope.rcpt_tos)}",
    ]
    for name in ("From", "To", "Subject", "Date", "In-Reply-To"):
        value = msg.get(name)
        if value is not None:
            lines.append(f"  {name + ':':12} {value}")
    text = _text_of(msg) if isinstance(msg, EmailMessage) else None
    lines.append("")
    if text is None:
        lines.append("  (no text part)")
    else:
        shown = text.strip()
        if len(shown) > SHOWN_TEXT:
            shown = shown[:SHOWN_TEXT] + " […]"
        lines.extend("  | " + line for line in shown.splitlines())
    attachments = [part.get_filename() or part.get_content_type()
                   for part in msg.iter_attachments()] if msg.is_multipart() else []
    if attachments:
        lines.append(f"  attachments: {', '.join(str(a) for a in attachments)}")
    lines.append("=" * 72)
    return "\n".join(lines)


def _text_of(msg: EmailMessage) -> str | None:
    try:
        body = msg.get_body(preferencelist=("plain", "html"))
        if body is None:
            return None
        content = body.get_content()
    except (LookupError, ValueError, AttributeError):
        return None
    return content if isinstance(content, str) else None


class PrintingHandler:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        transport = server.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        peer = "a client without TLS"
        if ssl_object is not None:
            ident = peer_identity(ssl_object)
            names = (tuple(ident.dns_names) + tuple(ident.emails)) if ident else ()
            peer = (f"{', '.join(names)} (client certificate, {ssl_object.version()})"
                    if names else f"a client without certificate ({ssl_object.version()})")
        self.count += 1
        print(describe(envelope, bytes(envelope.original_content or b""), peer),
              file=self.out, flush=True)
        return "250 2.0.0 received by the demo operator"


def run_operator(host: str, port: int, cert: Path, key: Path, ca: Path,
                 out: TextIO = sys.stdout) -> int:
    """Serve until SIGTERM or SIGINT; STARTTLS with ``cert`` (client certificates asked for
    and checked against ``ca``) is required before MAIL."""
    tls: ssl.SSLContext = server_context(cert, key, ca)
    controller = Controller(
        PrintingHandler(out), hostname=host, port=port, server_hostname="demo-operator",
        tls_context=tls, require_starttls=True, data_size_limit=MAX_MESSAGE,
        ready_timeout=10.0)
    controller.start()
    print(f"demo operator listening on {host}:{port} (STARTTLS, certificate {cert})",
          file=out, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    finally:
        controller.stop()
    return 0
