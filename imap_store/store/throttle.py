"""The login throttle's counts in the database (``policy.throttle.FailureCounts``): one
``login_failure`` row per account or client address, keyed by the SHA-256 of the policy's key,
shared by every ``serve`` process on the database, SQLite or PostgreSQL. What a row becomes
is computed by the policy (a ``Step``).

A failure's rows are read and rewritten in one short write transaction of its own, not through
the group writer: they are locked (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite's ``BEGIN
IMMEDIATE`` takes the database) in one order, by key, so two processes never wait for each
other in a cycle, which several such jobs in one group transaction could. Expired rows are
deleted now and then, at the end of such a transaction, skipping rows others hold.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from imap_store.store import schema as t
from imap_store.store.directory import Store
from policy.throttle import FailureRecord, Step

#: Seconds between two deletions of expired rows by one process (at a failure), and the most
#: rows one deletion takes.
PRUNE_EVERY = 60.0
PRUNE_BATCH = 10_000


def row_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _record(row: Any) -> FailureRecord:
    return FailureRecord(int(row.failures), float(row.first_at), float(row.last_at),
                         float(row.expires_at))


def _read(conn: Connection, keys: list[str]) -> list[Any]:
    lf = t.login_failure
    return list(conn.execute(select(lf).where(lf.c.key.in_(keys))).all())


def _update(conn: Connection, steps: list[tuple[str, Step]],
            prune_before: float | None) -> None:
    lf = t.login_failure
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    for key, step in steps:  # in key order: every process locks rows in the same order
        conn.execute(dialect.insert(lf).values(key=key, failures=0, first_at=0.0, last_at=0.0,
                                               expires_at=0.0).on_conflict_do_nothing())
        row = conn.execute(select(lf).where(lf.c.key == key).with_for_update()).one()
        new = step(_record(row) if row.failures else None)
        conn.execute(update(lf).where(lf.c.key == key).values(
            failures=new.failures, first_at=new.first_at, last_at=new.last_at,
            expires_at=new.expires_at))
    if prune_before is not None:  # last, and waiting for no row another process holds
        expired = (select(lf.c.key).where(lf.c.expires_at < prune_before)
                   .limit(PRUNE_BATCH).with_for_update(skip_locked=True))
        conn.execute(delete(lf).where(lf.c.key.in_(expired.scalar_subquery())))


def _clear(conn: Connection, key: str) -> None:
    conn.execute(delete(t.login_failure).where(t.login_failure.c.key == key))


class StoreFailureCounts:
    """:class:`policy.throttle.FailureCounts` over the store's ``login_failure`` table."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._pruned = 0.0

    async def read(self, keys: Sequence[str]) -> dict[str, FailureRecord]:
        names = {row_key(k): k for k in keys}
        rows = await self.store.read_inline(_read, list(names))
        return {names[row.key]: _record(row) for row in rows}

    async def update(self, steps: Mapping[str, Step]) -> None:
        ordered = sorted(((row_key(k), step) for k, step in steps.items()),
                         key=lambda pair: pair[0])
        now = self.clock()
        prune_before = None
        if now - self._pruned >= PRUNE_EVERY:
            self._pruned, prune_before = now, now
        async with self.store.write() as conn:
            await conn.run_sync(_update, ordered, prune_before)

    async def clear(self, key: str) -> None:
        async with self.store.write() as conn:
            await conn.run_sync(_clear, row_key(key))
