"""What the outbound worker is told by the composition root (``gateway/``): small typed
settings, built once from the configuration file."""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple


class Relay(NamedTuple):
    """A ``host:port`` the worker connects to."""

    host: str
    port: int


@dataclass(frozen=True)
class NotifierSettings:
    """The notification e-mail (SPEC §6.2)."""

    relay: Relay | None
    system_sender: str
    service_name: str
    service_domain: str
    login_url: str
    dkim_selector: str = "mssante"
    dkim_key: bytes | None = None  # the PEM private key; None = unsigned


@dataclass(frozen=True)
class OutboundSettings:
    hostname: str  # EHLO name
    patient_domain: str
    notifier: NotifierSettings
    default_relay: Relay | None = None
    routes: Mapping[str, Relay] = field(default_factory=dict)
    #: Seconds before each new try after a temporary failure; the last one repeats until
    #: ``max_age``; +/-10 % jitter.
    retry_schedule: tuple[int, ...] = (60, 300, 900, 1800, 3600, 7200, 14400)
    #: Seconds after which an undelivered message bounces (RFC 5321 §4.5.4.1).
    max_age: int = 5 * 24 * 3600
    #: TLS to professionals' relays: peer verified against the trust CA, our certificate shown.
    relay_tls: ssl.SSLContext | None = None
    #: TLS to the notifier relay (peer verified, no client certificate).
    notify_tls: ssl.SSLContext | None = None
