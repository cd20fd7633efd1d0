"""The messages the gateway itself places in a patient's mailbox (SPEC §6.3): the welcome
message, the end-of-exchange notice (R5) and the bounce notice (§6.1), rendered from the Jinja2
templates ``<name>.txt.j2`` and ``<name>.html.j2`` into one multipart/alternative message.

Every notice is built here and stored with :func:`imap_store.store.deliver.deliver`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, make_msgid
from typing import Any

from templates import Templates

WELCOME_SUBJECT = "Bienvenue dans votre messagerie sécurisée de santé"
BOUNCE_SUBJECT = "Message non distribué"


@dataclass(frozen=True)
class NoticeSettings:
    """Who notices come from: the system sender, the service's name and domain."""

    system_sender: str
    service_name: str
    service_domain: str


class Notices:
    def __init__(self, templates: Templates, settings: NoticeSettings) -> None:
        self.templates = templates
        self.settings = settings

    def welcome(self, *, patient_name: str, address: str) -> bytes:
        return self._render("welcome", to=address, subject=WELCOME_SUBJECT,
                            patient_name=patient_name, patient_address=address)

    def end_of_exchange(self, *, patient_name: str, address: str, professional_name: str,
                        in_reply_to: str | None, references: str | None) -> bytes:
        """R5: "<name> a mis fin à vos échanges", threaded to the professional's message."""
        return self._render("end_of_exchange", to=address,
                            subject=f"{professional_name} a mis fin à vos échanges",
                            in_reply_to=in_reply_to, references=references,
                            patient_name=patient_name, professional_name=professional_name)

    def bounce(self, *, patient_name: str, address: str, recipient: str, reason: str,
               original_subject: str | None, in_reply_to: str | None,
               references: str | None = None) -> bytes:
        """A patient's message that could not be delivered (SPEC §6.1), in French, threaded
        to it (so it shows in that conversation)."""
        return self._render("bounce", to=address, subject=BOUNCE_SUBJECT,
                            in_reply_to=in_reply_to, references=references,
                            patient_name=patient_name,
                            recipient=recipient, reason=reason,
                            original_subject=original_subject or "(sans objet)")

    def _render(self, name: str, *, to: str, subject: str, in_reply_to: str | None = None,
                references: str | None = None, **context: Any) -> bytes:
        s = self.settings
        ctx = {"subject": subject, "service_name": s.service_name, **context}
        text = self.templates.render(f"{name}.txt.j2", **ctx)
        html = self.templates.render(f"{name}.html.j2", **ctx)
        return alternative_mail(
            sender=(s.service_name, s.system_sender), to=to, subject=subject,
            domain=s.service_domain, text=text, html=html, in_reply_to=in_reply_to,
            references=references)


def alternative_mail(*, sender: tuple[str, str], to: str, subject: str, domain: str, text: str,
                     html: str, in_reply_to: str | None = None,
                     references: str | None = None) -> bytes:
    """A French multipart/alternative mail (text, then HTML) from the system sender, marked
    ``Auto-Submitted``: the shape of every mail the gateway writes itself."""
    msg = EmailMessage()
    msg["From"] = formataddr(sender)
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = format_datetime(datetime.now(UTC))
    msg["Message-ID"] = make_msgid(domain=domain)
    msg["Auto-Submitted"] = "auto-generated"
    if in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = references or in_reply_to
    msg.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(html, subtype="html", charset="utf-8", cte="quoted-printable")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
