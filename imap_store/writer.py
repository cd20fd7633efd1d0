"""Group commit (ARCHITECTURE "Speed, by design"): one writer task per database takes the
jobs that arrived meanwhile, runs them in one transaction with one durable commit, then
releases every waiting caller. A job that fails is rolled back to its own savepoint and only
its caller sees the error; the others still commit.

Durability is unchanged: a caller's future resolves only after the COMMIT returned.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from imap_store.db import write_transaction
from imap_store.store import Store

log = logging.getLogger(__name__)
T = TypeVar("T")
Job = Callable[[AsyncConnection], Awaitable[Any]]

#: Most jobs written in one transaction; more wait for the next round.
MAX_BATCH = 256


@dataclass
class _Pending:
    job: Job
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop()
                                        .create_future())


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

    async def submit(self, job: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``job`` in the next group transaction; return once it is durably committed."""
        if self._closing or self._task is None:
            raise WriterClosed("the store writer is stopped")
        pending = _Pending(job)
        self._queue.put_nowait(pending)
        result: T = await asyncio.shield(pending.future)
        return result

    def submit_nowait(self, job: Job) -> None:
        """Queue a job nobody waits for (audit rows of refused commands); drained on close."""
        if self._closing or self._task is None:
            log.warning("writer stopped: dropping a background job")
            return
        self._queue.put_nowait(_Pending(job))

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

    async def _write(self, batch: list[_Pending]) -> None:
        results: list[tuple[_Pending, bool, Any]] = []
        try:
            async with write_transaction(self.store.engine) as conn:
                for pending in batch:
                    try:
                        async with conn.begin_nested():
                            value = await pending.job(conn)
                        results.append((pending, True, value))
                    except Exception as exc:
                        results.append((pending, False, exc))
        except Exception as exc:
            log.exception("group commit of %d jobs failed", len(batch))
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        self.batches += 1
        self.jobs += len(batch)
        for pending, ok, value in results:
            if pending.future.done():
                continue
            if ok:
                pending.future.set_result(value)
            else:
                pending.future.set_exception(value)
