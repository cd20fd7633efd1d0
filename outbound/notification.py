"""The "you have a new message" e-mail to a patient's personal address (SPEC §6.2): French,
text + HTML from ``templates/notification.*.j2``, DKIM-signed, and nothing about the message
itself."""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, make_msgid

import dkim

from outbound.settings import NotifierSettings
from policy.addresses import domain_of
from templates import Templates


def render_notification(settings: NotifierSettings, templates: Templates, patient_name: str,
                        notify_email: str) -> bytes:
    """The notification e-mail: multipart/alternative, French, DKIM-signed, and nothing
    about the message itself (no sender, subject, content or attachment)."""
    cfg = settings
    service = cfg.service_name
    ctx = {"patient_name": patient_name, "service_name": service,
           "login_url": cfg.login_url,
           "subject": f"Nouveau message dans votre messagerie {service}"}
    msg = EmailMessage()
    msg["From"] = formataddr((service, cfg.system_sender))
    msg["To"] = notify_email
    msg["Subject"] = ctx["subject"]
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=cfg.service_domain)
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(templates.render("notification.txt.j2", **ctx), subtype="plain",
                    charset="utf-8", cte="quoted-printable")
    msg.add_alternative(templates.render("notification.html.j2", **ctx),
                        subtype="html", charset="utf-8", cte="quoted-printable")
    data = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    if cfg.dkim_key is not None:
        signature = dkim.sign(
            data, cfg.dkim_selector.encode(), domain_of(cfg.system_sender).encode(),
            cfg.dkim_key,
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id",
                             b"mime-version", b"content-type", b"auto-submitted"],
        )
        data = signature + data
    return data


