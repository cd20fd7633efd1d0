"""The SMTP edge's Prometheus metrics (served by the composition root's metrics listener).

- ``mssante_smtp_messages_total{listener, outcome, rule}``: the reply to each message's data
  (outcome ``accepted``, ``refused`` for 5xx, ``deferred`` for 4xx); ``rule`` is the rule the
  reply names (``R7``, ``R10``, ``RFC5322``...) or ``none`` (a line too long, a NUL octet...).
- ``mssante_smtp_refusals_total{listener, code, rule}``: every 4xx/5xx reply, whatever the
  command (MAIL's R10, RCPT's R1/R3/R8/R9, AUTH, DATA...).

What is read from live objects at scrape time (DATA bytes held in memory) is collected by the
composition root from ``DataBudget``.
"""

from __future__ import annotations

import functools
import re

from prometheus_client import Counter

MESSAGES = Counter("mssante_smtp_messages", "Messages whose data was answered, by outcome",
                   ["listener", "outcome", "rule"])
REFUSALS = Counter("mssante_smtp_refusals", "SMTP replies refusing a command (4xx and 5xx)",
                   ["listener", "code", "rule"])

#: A policy decision's reply names its rule first (``policy.rules.refuse``): ``550 5.7.1 R10:``.
_RULE = re.compile(r"\d{3}[ -](?:[245]\.\d{1,3}\.\d{1,3} )?(R\d{1,2}|RFC\d{3,4}|relay|auth):")


def rule_of(reply: str) -> str:
    match = _RULE.match(reply)
    return match.group(1) if match else "none"


# The labelled children, looked up once (``labels()`` validates and locks at every call).
_message = functools.cache(MESSAGES.labels)
_refusal = functools.cache(REFUSALS.labels)


def data_answered(listener: str, reply: str) -> None:
    """Count the reply to a message's data."""
    first = reply[:1]
    if first == "2":
        _message(listener, "accepted", "none").inc()
        return
    _message(listener, "deferred" if first == "4" else "refused", rule_of(reply)).inc()


def replied(listener: str, reply: str) -> None:
    """Count a reply if it refuses (cheap for the others: one comparison)."""
    if reply[:1] in ("4", "5"):
        _refusal(listener, reply[:3], rule_of(reply)).inc()
