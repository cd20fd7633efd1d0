"""The outbound worker's Prometheus metrics.

- ``mssante_outbound_deliveries_total{kind, outcome}``: each try of a queue row: ``sent``,
  ``retry`` (a temporary failure, tried again later), ``gave_up`` (bounced to the patient for a
  relay, failed for a notification).
- ``mssante_outbound_failures_total{kind, failure}``: the failed tries, ``temporary`` or
  ``permanent`` (a 5xx, no route).

The queue's depth and age are read from the store at scrape time
(``imap_store/store/metrics.py``).
"""

from __future__ import annotations

from prometheus_client import Counter

DELIVERIES = Counter("mssante_outbound_deliveries", "Tries of outbound queue rows, by outcome",
                     ["kind", "outcome"])
FAILURES = Counter("mssante_outbound_failures", "Failed tries of outbound queue rows",
                   ["kind", "failure"])


def sent(kind: str) -> None:
    DELIVERIES.labels(kind, "sent").inc()


def failed(kind: str, permanent: bool, gave_up: bool) -> None:
    FAILURES.labels(kind, "permanent" if permanent else "temporary").inc()
    DELIVERIES.labels(kind, "gave_up" if gave_up else "retry").inc()
