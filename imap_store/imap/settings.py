"""What the IMAP edge is told by the composition root (``gateway/``): small typed settings,
built once from the configuration file."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImapListener:
    name: str  # "imap" (STARTTLS) or "imaps" (implicit TLS)
    host: str
    port: int
    implicit_tls: bool


@dataclass(frozen=True)
class ImapSettings:
    """What the IMAP edge is told by the composition root (``gateway/``)."""

    listeners: tuple[ImapListener, ...] = ()
    #: Concurrent connections per client IP, per listener (SPEC §9).
    connections_per_ip: int = 50
    #: Idle seconds before a session is closed (IDLE renews it; RFC 3501 §5.4).
    idle_timeout: int = 1800
    #: Seconds between two looks at the selected mailboxes besides the change signals
    #: (``[imap] poll_interval``): changes written by another program show within that.
    poll_interval: float = 1.0
