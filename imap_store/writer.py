"""Group commit (ARCHITECTURE "Speed, by design"): one writer task per database takes the
jobs that arrived meanwhile, runs them in one transaction with one durable commit, then
releases every waiting caller. A job that fails is rolled back to its own savepoint and only
its caller sees the error; the others still commit.

Jobs are either synchronous (``submit_sync``: ``fn(Connection)``, the hot paths, written with
``imap_store.ops``) or asynchronous (``submit``: ``fn(AsyncConnection)``). On SQLite a batch of
synchronous jobs runs in a worker thread on a pysqlite connection: one thread hop per batch.
Otherwise the batch runs on the async engine, synchronous jobs through ``run_sync``.

Durability is unchanged: a caller's future resolves only after the COMMIT returned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from imap_store.db import write_transaction
from imap_store.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")
Job = Callable[[AsyncConnection], Awaitable[Any]]
SyncJob = Callable[[Connection], Any]

#: Most jobs written in one transaction; more wait for the next round.
MAX_BATCH = 256


@dataclass
class _Pending:
    job: Job | SyncJob | None
    sync: bool
    future: asyncio.Future[Any] | None = field(default=None)


class WriterClosed(RuntimeError):
    pass


class GroupWriter:
    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.batches = 0
        self.jobs = 0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="group-writer")

    def _put(self, job: Job | SyncJob, sync: bool, wait: bool) -> asyncio.Future[Any] | None:
        if self._closing or self._task is None:
            if not wait:
                log.warning("writer stopped: dropping a background job")
                return None
            raise WriterClosed("the store writer is stopped")
        future = asyncio.get_running_loop().create_future() if wait else None
        self._queue.put_nowait(_Pending(job, sync, future))
        return future

    async def submit(self, job: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run an async ``job`` in the next group transaction; return once committed."""
        future = self._put(job, False, True)
        assert future is not None
        result: T = await asyncio.shield(future)
        return result

    async def submit_sync(self, job: Callable[[Connection], T]) -> T:
        """Run a synchronous ``job`` in the next group transaction; return once committed."""
        future = self._put(job, True, True)
        assert future is not None
        result: T = await asyncio.shield(future)
        return result

    def submit_nowait(self, job: Job) -> None:
        """Queue a job nobody waits for (e.g. audit rows); drained on close."""
        self._put(job, False, False)

    def submit_sync_nowait(self, job: SyncJob) -> None:
        self._put(job, True, False)

    async def close(self) -> None:
        """Finish every queued job, then stop."""
        if self._task is None:
            return
        self._closing = True
        self._queue.put_nowait(None)
        await self._task
        self._task = None

    async def _run(self) -> None:
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stop = True
                    break
                batch.append(item)
            await self._write(batch)
            del batch, first  # do not keep the last batch's messages alive while idle

    async def _write(self, batch: list[_Pending]) -> None:
        try:
            if self.store.sync_engine is not None and all(p.sync for p in batch):
                results = await asyncio.to_thread(self._write_in_thread, batch)
            else:
                results = await self._write_async(batch)
        except Exception as exc:
            log.exception("group commit of %d jobs failed", len(batch))
            for pending in batch:
                if pending.future is not None and not pending.future.done():
                    pending.future.set_exception(exc)
            return
        self.batches += 1
        self.jobs += len(batch)
        for pending, (ok, value) in zip(batch, results, strict=True):
            pending.job = None
            if pending.future is None:
                if not ok:
                    log.error("background store job failed: %s", value.__class__.__name__)
                continue
            if pending.future.done():
                continue
            if ok:
                pending.future.set_result(value)
            else:
                pending.future.set_exception(value)

    def _write_in_thread(self, batch: list[_Pending]) -> list[tuple[bool, Any]]:
        engine = self.store.sync_engine
        assert engine is not None
        results: list[tuple[bool, Any]] = []
        with engine.connect() as raw_conn:
            conn = raw_conn.execution_options(sqlite_write=True)
            with conn.begin():
                # Savepoints straight on the sqlite3 connection (one per job): the statements
                # SQLAlchemy's begin_nested() would send, without its bookkeeping.
                sqlite3_conn: Any = conn.connection.driver_connection
                for pending in batch:
                    job = pending.job
                    assert job is not None
                    run = cast(SyncJob, job)
                    if len(batch) == 1:
                        results.append((True, run(conn)))
                        continue
                    sqlite3_conn.execute("SAVEPOINT job")
                    try:
                        value = run(conn)
                    except Exception as exc:  # handed to that job's caller
                        sqlite3_conn.execute("ROLLBACK TO SAVEPOINT job")
                        sqlite3_conn.execute("RELEASE SAVEPOINT job")
                        results.append((False, exc))
                    else:
                        sqlite3_conn.execute("RELEASE SAVEPOINT job")
                        results.append((True, value))
        return results

    async def _write_async(self, batch: list[_Pending]) -> list[tuple[bool, Any]]:
        results: list[tuple[bool, Any]] = []
        async with write_transaction(self.store.engine) as conn:
            for pending in batch:
                job = pending.job
                assert job is not None
                try:
                    async with conn.begin_nested():
                        if pending.sync:
                            value = await conn.run_sync(cast(SyncJob, job))
                        else:
                            value = await cast(Job, job)(conn)
                    results.append((True, value))
                except Exception as exc:
                    results.append((False, exc))
        return results
