"""What the SMTP edge is told by the composition root (``gateway/``): one small typed object,
built once from the configuration file."""

from __future__ import annotations

from dataclasses import dataclass

from smtp_in.data import LINE_LENGTH

#: ``[smtp] bare_newline``: lines ending in a bare LF taken as CRLF, or the message refused.
BARE_NEWLINE_MODES = ("normalize", "reject")


@dataclass(frozen=True)
class SmtpSettings:
    #: Our name in greetings and in the ``Received:`` field.
    hostname: str
    #: Domain of patient addresses ``<INS>@domain`` (SPEC §2).
    patient_domain: str
    #: Whether a notifier relay is configured: a stored professional message then queues a
    #: notification to the patient (SPEC §6.2).
    notify: bool = False
    #: The system sender of notifications (``[notifier] from``).
    system_sender: str = ""
    #: Concurrent connections per client IP, per listener (SPEC §9).
    connections_per_ip: int = 50
    #: RFC 5321 §4.5.3.1.6: octets per text line, CRLF included (``[limits]
    #: smtp_line_length``): the DATA reader's limit and the number in its refusal.
    line_length: int = LINE_LENGTH
    #: Bytes of DATA buffered across all sessions of the process before ``452 4.3.1``.
    data_in_flight: int = 256 * 1024 * 1024
    #: ``[smtp] bare_newline`` (one of ``BARE_NEWLINE_MODES``): ``normalize`` takes a line
    #: ending in a bare LF as ending in CRLF (Postfix >= 3.9's default), ``reject`` refuses the
    #: message with ``554 5.6.0``. A bare CR is refused either way.
    bare_newline: str = "normalize"
