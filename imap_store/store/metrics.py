"""The store's Prometheus metrics: the group writer's batches, and the outbound queue read at
scrape time (``queue_stats``: a read, called by the composition root's metrics listener)."""

from __future__ import annotations

from datetime import datetime

from prometheus_client import Histogram
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from imap_store.store import schema as t
from imap_store.store.fields import as_utc, utcnow

BATCH_JOBS = Histogram(
    "mssante_group_commit_jobs", "Jobs written by one group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
COMMIT_SECONDS = Histogram(
    "mssante_group_commit_seconds", "Time of one group commit, BEGIN to COMMIT returned",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))


def batch_written(jobs: int, seconds: float) -> None:
    BATCH_JOBS.observe(jobs)
    COMMIT_SECONDS.observe(seconds)


def queue_stats(conn: Connection, now: datetime | None = None) -> dict[str, tuple[int, float]]:
    """``{kind: (rows waiting, age in seconds of the oldest)}`` of the outbound queue."""
    when = now or utcnow()
    rows = conn.execute(
        select(t.outbound.c.kind, func.count(), func.min(t.outbound.c.created_at))
        .where(t.outbound.c.state == "queued").group_by(t.outbound.c.kind)).all()
    stats: dict[str, tuple[int, float]] = {}
    for kind, count, oldest in rows:
        age = max(0.0, (when - as_utc(oldest)).total_seconds()) if oldest is not None else 0.0
        stats[str(kind)] = (int(count), age)
    return stats

