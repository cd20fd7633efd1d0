"""Mails from the system sender to a patient's personal address, French, text + HTML from
``templates/``, DKIM-signed: the "you have a new message" notification (SPEC §6.2, nothing about
the message itself) and the portal's one-time login code (SPEC §11)."""

from __future__ import annotations

import ssl

import aiosmtplib
import dkim

from imap_store.store.notices import alternative_mail
from outbound.settings import NotifierSettings
from policy.addresses import domain_of
from templates import Templates


def render_notification(settings: NotifierSettings, templates: Templates, patient_name: str,
                        notify_email: str) -> bytes:
    """The notification e-mail: multipart/alternative, French, DKIM-signed, and nothing
    about the message itself (no sender, subject, content or attachment)."""
    return render_patient_mail(
        settings, templates, "notification", notify_email,
        f"Nouveau message dans votre messagerie {settings.service_name}",
        patient_name=patient_name)


def render_patient_mail(settings: NotifierSettings, templates: Templates, template: str,
                        to: str, subject: str, **context: str) -> bytes:
    """A mail from the system sender to a patient's personal address, from
    ``<template>.txt.j2`` and ``<template>.html.j2``: multipart/alternative, DKIM-signed."""
    cfg = settings
    ctx = {"service_name": cfg.service_name, "login_url": cfg.login_url, "subject": subject,
           **context}
    data = alternative_mail(
        sender=(cfg.service_name, cfg.system_sender), to=to, subject=subject,
        domain=cfg.service_domain, text=templates.render(f"{template}.txt.j2", **ctx),
        html=templates.render(f"{template}.html.j2", **ctx))
    if cfg.dkim_key is not None:
        signature = dkim.sign(
            data, cfg.dkim_selector.encode(), domain_of(cfg.system_sender).encode(),
            cfg.dkim_key,
            include_headers=[b"from", b"to", b"subject", b"date", b"message-id",
                             b"mime-version", b"content-type", b"auto-submitted"],
        )
        data = signature + data
    return data


class CodeMailer:
    """Sends the portal's one-time code to a patient's personal address at once (not through
    the queue: a code is worth nothing ten minutes later) through the notifier relay."""

    def __init__(self, settings: NotifierSettings, templates: Templates, hostname: str,
                 tls: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.templates = templates
        self.hostname = hostname
        self.tls = tls

    @property
    def available(self) -> bool:
        return self.settings.relay is not None

    async def send_code(self, to: str, patient_name: str, code: str) -> None:
        relay = self.settings.relay
        if relay is None:
            raise OSError("no notifier relay configured ([notifier] relay)")
        data = render_patient_mail(self.settings, self.templates, "code", to,
                                   f"Votre code de connexion {self.settings.service_name}",
                                   patient_name=patient_name, code=code)
        client = aiosmtplib.SMTP(hostname=relay.host, port=relay.port, timeout=30,
                                 start_tls=False, local_hostname=self.hostname)
        await client.connect()
        try:
            await client.ehlo()
            if client.supports_extension("starttls") and self.tls is not None:
                await client.starttls(server_hostname=relay.host, tls_context=self.tls)
            await client.sendmail(self.settings.system_sender, [to], data)
        finally:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()
