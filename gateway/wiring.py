"""Settings of each room, built once from the one configuration object (ARCHITECTURE: the
composition root wires settings into the edges; no edge imports ``gateway/``)."""

from __future__ import annotations

from gateway.config import Config, ConfigError, Listen
from gateway.tls import client_context
from imap_store.imap.settings import ImapListener, ImapSettings
from imap_store.store.notices import Notices, NoticeSettings
from outbound.settings import NotifierSettings, OutboundSettings, Relay
from policy.throttle import FailureCounts, LoginThrottle
from smtp_in.settings import SmtpSettings
from templates import Templates
from web.settings import WebSettings


def notices(config: Config) -> Notices:
    return Notices(Templates(config.templates_dir), NoticeSettings(
        system_sender=config.system_sender, service_name=config.notifier.service_name,
        service_domain=config.domains.service))


def login_throttle(config: Config, counts: FailureCounts) -> LoginThrottle:
    """The throttle of SMTP AUTH, IMAP LOGIN and the portal, over the shared counts."""
    limits = config.limits
    return LoginThrottle(limits.login_failures, limits.login_window,
                         per_ip=limits.login_failures_per_ip, max_delay=limits.login_max_delay,
                         counts=counts)


def smtp_settings(config: Config) -> SmtpSettings:
    return SmtpSettings(
        hostname=config.hostname, patient_domain=config.domains.patient,
        notify=config.notifier.relay is not None, system_sender=config.system_sender,
        connections_per_ip=config.limits.connections_per_ip,
        line_length=config.limits.smtp_line_length,
        data_in_flight=config.limits.data_in_flight,
        bare_newline=config.smtp_bare_newline)


def imap_settings(config: Config) -> ImapSettings:
    listeners = tuple(
        ImapListener(name, listen.host, listen.port, implicit)
        for name, listen, implicit in (("imap", config.imap, False), ("imaps", config.imaps, True))
        if listen is not None)
    return ImapSettings(listeners=listeners,
                        connections_per_ip=config.limits.connections_per_ip,
                        idle_timeout=config.limits.idle_timeout,
                        poll_interval=config.imap_poll_interval)


def _relay(listen: Listen | None) -> Relay | None:
    return Relay(listen.host, listen.port) if listen is not None else None


def notifier_settings(config: Config) -> NotifierSettings:
    n = config.notifier
    dkim_key = None
    if n.dkim_key is not None:  # a key named but missing was ignored: mail went unsigned
        try:
            dkim_key = n.dkim_key.read_bytes()
        except OSError as exc:
            raise ConfigError(f"notifier.dkim_key: cannot read {n.dkim_key} "
                              f"({exc.strerror or exc}); \"\" sends unsigned") from None
    return NotifierSettings(
        relay=_relay(n.relay), system_sender=config.system_sender,
        service_name=n.service_name, service_domain=config.domains.service,
        login_url=n.login_url, dkim_selector=n.dkim_selector, dkim_key=dkim_key)


def outbound_settings(config: Config) -> OutboundSettings:
    """The worker's settings, with its TLS contexts (the certificates must exist)."""
    out = config.outbound
    return OutboundSettings(
        hostname=config.hostname, patient_domain=config.domains.patient,
        notifier=notifier_settings(config),
        default_relay=_relay(out.default_relay),
        routes={domain: Relay(r.host, r.port) for domain, r in out.routes.items()},
        retry_schedule=out.retry_schedule, max_age=out.max_age,
        relay_tls=client_context(config.tls.client_ca, out.cert, out.key),
        notify_tls=client_context(config.tls.client_ca))


def web_settings(config: Config) -> WebSettings | None:
    w = config.web
    if w.listen is None:
        return None
    return WebSettings(
        host=w.listen.host, port=w.listen.port, patient_domain=config.domains.patient,
        service_name=config.notifier.service_name, session_idle=w.session_idle,
        sms_command=w.sms_command, sms_outbox=w.sms_outbox, trash_days=w.trash_days,
        documents_quota=config.documents.quota_bytes)
