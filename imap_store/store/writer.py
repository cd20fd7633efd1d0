"""Group commit (ARCHITECTURE "Speed, by design"): one writer task per database takes the
jobs that arrived meanwhile, runs them in one transaction with one durable commit, then
releases every waiting caller. Durability is unchanged: a caller's future resolves only after
the COMMIT returned.

Jobs are either synchronous (``submit_sync``: ``fn(Connection)``, the hot paths, written with
``imap_store.store.ops``) or asynchronous (``submit``: ``fn(AsyncConnection)``).

On SQLite a batch of synchronous jobs goes to the writer's own pysqlite connection: ``BEGIN
IMMEDIATE`` and the jobs' statements run on the event loop, and ``COMMIT`` (the fsync) too
while the disk is fast (``INLINE_COMMIT_MAX``), else in a worker thread. Statements of a few
microseconds each are cheaper there than in a thread, where every one of them would give up
the GIL and wait to take it back from the busy event loop (measured: 0.88 -> 0.66 ms of CPU per
message on bench/smtp_intake.py). A batch carrying more than ``INLINE_BYTES`` of data runs
whole in the thread instead, so large messages never stall the loop.

On PostgreSQL a batch of synchronous jobs runs in one ``run_sync`` on the writer's own
connection, kept from one batch to the next: a connection taken from the pool for each batch
cost three round trips more (the pool's pre-ping: BEGIN, an empty query, ROLLBACK), and on
PostgreSQL the writer's time is its round trips (issue 14; ``deliver`` merges its statements
there for the same reason). The connection is dropped after a failed BEGIN, COMMIT or
rollback, or when SQLAlchemy found it lost; the next batch takes a fresh one. Otherwise (a
batch with asynchronous jobs) the batch runs on the async engine, synchronous jobs through
``run_sync``.

Consecutive jobs of one ``MergeableJob`` class run together (``run_together``): SMTP intake's
deliveries of a batch are then one statement on PostgreSQL, not three per message.

Every batch first runs without savepoints. If a job raises, that transaction is rolled back
and the batch runs again with one savepoint per job: the failing job is rolled back alone and
only its caller sees the error. A job may therefore run twice; jobs act on the connection only
(no effects outside the database). A failure of BEGIN or COMMIT is never retried (after a
failed COMMIT nobody knows whether it happened): every caller of the batch gets the error.

The audit rows the jobs write (``ops.audit``) are collected and appended to the chain once,
at the end of the batch (one read of the chain's end, one insert).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from imap_store.store import db, metrics, ops
from imap_store.store.db import write_transaction
from imap_store.store.directory import Store

log = logging.getLogger(__name__)
T = TypeVar("T")
Job = Callable[[AsyncConnection], Awaitable[Any]]
SyncJob = Callable[[Connection], Any]

#: Most jobs written in one transaction; more wait for the next round.
MAX_BATCH = 256
#: Data a batch may carry (the ``size`` hints of its jobs) and still run on the event loop.
INLINE_BYTES = 1 << 20
#: SQLite: while another process holds the writer lock file, this writer tries again on its
#: loop every ``LOCK_POLL`` seconds, for ``LOCK_POLL_LIMIT`` seconds, then waits for it in a
#: worker thread.
LOCK_POLL = 0.001
LOCK_POLL_LIMIT = 0.05
#: SQLite: COMMIT (the fsync) runs on the loop while the writer's commits take less than this
#: on average (a fast disk: then the hop to a worker thread and back, with the GIL handed over
#: twice, costs more than the fsync and holds the lock longer); otherwise in a worker thread.
INLINE_COMMIT_MAX = 0.002
#: SQLite: the commits on the loop that judge the disk (the median of the last ones, so one
#: commit that also checkpointed the WAL does not send the next batches to a worker thread:
#: on this machine commits take ~1 ms with a spike of 6-7 ms every few hundred, and a moving
#: average sent half the batches to a thread, bench/smtp_intake.py 1,727 -> 1,793 msg/s when
#: they all stayed on the loop); while they go to a thread, one batch in
#: ``COMMIT_REMEASURE`` commits on the loop again to measure the disk.
COMMIT_SAMPLES = 5
COMMIT_REMEASURE = 16


#: PostgreSQL: the group writers of several processes (``[server] workers``, or several
#: ``serve`` on one database) take turns, one transaction at a time, on this advisory lock,
#: taken first in each batch. Without it two batches locked the mailbox rows they deliver to
#: in different orders and PostgreSQL broke the deadlock after a second by failing one
#: (bench/smtp_intake.py --db postgresql --workers 2: p90 1 s, a 451 to a client).
#: The audit chain's lock is taken in the same round trip (turn first, then the chain, the
#: order every taker of both follows): the batch's ``append_audit`` then needs no lock of its
#: own. Each round trip of the writer waits its turn on the busy event loop (measured: ~1 to
#: 3 ms each under SMTP load), so the writer saves them where it can.
WRITER_LOCK_KEY = 0x777274  # "wrt"
_TAKE_TURN = ops.Stmt("SELECT pg_advisory_xact_lock(:k), pg_advisory_xact_lock(:audit)",
                      direct=True)


def _take_turn(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        _TAKE_TURN.run(conn, {"k": WRITER_LOCK_KEY, "audit": ops.AUDIT_LOCK_KEY})


class MergeableJob:
    """A synchronous job that the writer may run together with the jobs of its class next to
    it in a batch (``run_together``: one statement for all where one per job would be a round
    trip each, e.g. SMTP intake on PostgreSQL). Called alone it runs by itself, as when a
    failed batch is run again one job at a time."""

    def __call__(self, conn: Connection) -> Any:
        raise NotImplementedError

    @classmethod
    def run_together(cls, conn: Connection, jobs: Sequence[Any]) -> list[Any]:
        """The results of ``jobs`` (all of class ``cls``), as calling each in turn would
        give them; raises when any fails."""
        return [job(conn) for job in jobs]

    def mergeable(self) -> bool:
        """Whether this one may be run together with others."""
        return True


def _run_jobs(conn: Connection, jobs: Sequence[SyncJob]) -> list[Any]:
    """Every job in order, runs of mergeable jobs of one class together."""
    results: list[Any] = []
    i = 0
    while i < len(jobs):
        job = jobs[i]
        kind = type(job)
        j = i + 1
        if isinstance(job, MergeableJob) and job.mergeable():
            while j < len(jobs) and type(jobs[j]) is kind and jobs[j].mergeable():  # type: ignore[attr-defined]
                j += 1
        if j - i > 1:
            results.extend(kind.run_together(conn, jobs[i:j]))  # type: ignore[attr-defined]
        else:
            results.append(job(conn))
        i = j
    return results


@dataclass
class _Pending:
    job: Job | SyncJob | None
    sync: bool
    future: asyncio.Future[Any] | None = field(default=None)
    size: int = 0


class WriterClosed(RuntimeError):
    pass


class _Turn:
    """SQLite: this writer's hold of the writer lock file for one batch (``fd`` None: no
    lock file). Released once, by whichever thread finishes first with the batch."""

    __slots__ = ("fd", "held")

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.held = False

    def try_take(self) -> bool:
        """Take the lock if it is free (on the loop); False if another process holds it."""
        if self.fd is None or self.held:
            return True
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        return True

    def take_blocking(self) -> None:
        """Wait for the lock (in a worker thread)."""
        if self.fd is not None and not self.held:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.held = True

    async def take(self) -> None:
        if not self.try_take():  # another process writes: wait for it off the loop
            await asyncio.shield(asyncio.to_thread(self.take_blocking))

    async def poll(self, limit: float, meanwhile: Callable[[], None]) -> bool:
        """Take the lock on the loop, trying again every ``LOCK_POLL`` seconds while another
        process holds it, calling ``meanwhile`` after each wait; False after ``limit``
        seconds without it."""
        deadline = time.monotonic() + limit
        while not self.try_take():
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(LOCK_POLL)
            meanwhile()
        return True

    def release(self) -> None:
        if self.held:
            self.held = False
            assert self.fd is not None
            fcntl.flock(self.fd, fcntl.LOCK_UN)


def _begin_now(conn: Connection) -> Any:
    """``BEGIN IMMEDIATE`` without waiting (the writer holds the lock file, so only a program
    that does not take it, such as a second tool on the file, can hold SQLite's write lock):
    the transaction, or None when SQLite's lock is taken."""
    raw = conn.connection.driver_connection
    assert raw is not None
    raw.execute("PRAGMA busy_timeout = 0")
    try:
        return conn.begin()
    except OperationalError:
        return None
    finally:
        raw.execute(f"PRAGMA busy_timeout = {db.SQLITE_BUSY_TIMEOUT_MS}")


def _commit_then_release(transaction: Any, turn: _Turn) -> float:
    """COMMIT, then the lock released; the seconds that took."""
    started = time.perf_counter()
    try:
        transaction.commit()
    finally:
        turn.release()
    return time.perf_counter() - started


class GroupWriter:
    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._stopping = False  # the queue's end (None) was taken
        self._carried: _Pending | None = None  # taken from the queue for the next batch
        self.batches = 0
        self.jobs = 0
        self._conn: Connection | None = None  # SQLite: the writer's own connection
        self._aconn: AsyncConnection | None = None  # PostgreSQL: the writer's own connection
        self._lock: int | None = None  # SQLite: the writer lock file's descriptor (-1: none)
        #: SQLite: how long the last COMMITs on the loop took.
        self._commit_times: collections.deque[float] = collections.deque(maxlen=COMMIT_SAMPLES)

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._run(), name="group-writer")

    def _put(self, job: Job | SyncJob, sync: bool, wait: bool,
             size: int = 0) -> asyncio.Future[Any] | None:
        if self._closing or self._task is None:
            if not wait:
                log.warning("writer stopped: dropping a background job")
                return None
            raise WriterClosed("the store writer is stopped")
        future = asyncio.get_running_loop().create_future() if wait else None
        self._queue.put_nowait(_Pending(job, sync, future, size))
        return future

    async def submit(self, job: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run an async ``job`` in the next group transaction; return once committed."""
        future = self._put(job, False, True)
        assert future is not None
        result: T = await asyncio.shield(future)
        return result

    async def submit_sync(self, job: Callable[[Connection], T], size: int = 0) -> T:
        """Run a synchronous ``job`` in the next group transaction; return once committed.
        ``size``: about how many bytes it writes (large batches are written off the loop)."""
        future = self._put(job, True, True, size)
        assert future is not None
        result: T = await asyncio.shield(future)
        return result

    def submit_sync_nowait(self, job: SyncJob) -> None:
        """Queue a job nobody waits for (e.g. audit rows); drained on close."""
        self._put(job, True, False)

    def audit_later(self, actor: str, action: str, subject: str,
                    detail: dict[str, object]) -> None:
        """An audit row written with the next group commit (nobody waits for it)."""
        self.audit_many_later([(actor, action, subject, dict(detail))])

    def audit_many_later(self, entries: Sequence[ops.AuditEntry]) -> None:
        if entries:
            rows = list(entries)
            self.submit_sync_nowait(lambda conn: ops.audit_many(conn, rows))

    async def close(self) -> None:
        """Finish every queued job, then stop."""
        if self._task is None:
            return
        self._closing = True
        self._queue.put_nowait(None)
        await self._task
        self._task = None
        self._drop_connection(failed=False)
        await self._drop_pg_connection(failed=False)
        if self._lock is not None and self._lock >= 0:
            os.close(self._lock)
            self._lock = None

    async def _connection(self) -> Connection:
        if self._conn is None:
            engine = self.store.sync_engine
            assert engine is not None
            # In a thread: opening runs PRAGMAs that may wait for a lock.
            conn = await asyncio.to_thread(engine.connect)
            self._conn = conn.execution_options(sqlite_write=True)
        return self._conn

    def _drop_connection(self, failed: bool = True) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if failed:
                conn.invalidate()  # its state is unknown after a failure: never reuse it
            conn.close()
        except Exception:  # already failing; the next batch opens a new connection
            log.debug("closing the writer connection failed", exc_info=True)

    async def _pg_connection(self) -> AsyncConnection:
        if self._aconn is not None and self._aconn.invalidated:
            await self._drop_pg_connection()
        if self._aconn is None:
            self._aconn = await self.store.engine.connect()
        return self._aconn

    async def _drop_pg_connection(self, failed: bool = True) -> None:
        conn, self._aconn = self._aconn, None
        if conn is None:
            return
        try:
            if failed:
                await conn.invalidate()  # its state is unknown after a failure: never reuse it
            await conn.close()
        except Exception:  # already failing; the next batch opens a new connection
            log.debug("closing the writer connection failed", exc_info=True)

    async def _run(self) -> None:
        while True:
            first, self._carried = self._carried, None
            if first is None:
                if self._stopping:
                    break
                first = await self._queue.get()
                if first is None:
                    break
            batch = [first]
            self._take_queued(batch)
            await self._write(batch)
            del batch, first  # do not keep the last batch's messages alive while idle

    def _take_queued(self, batch: list[_Pending], sync_only: bool = False) -> None:
        """Adds the jobs queued meanwhile to ``batch`` (``max_batch`` at the most). With
        ``sync_only`` (a batch of synchronous jobs waiting for its turn), only while they are
        synchronous and the batch's data stays within ``INLINE_BYTES``: the first that is
        not is kept for the next batch."""
        size = sum(p.size for p in batch) if sync_only else 0
        while len(batch) < self.max_batch and not self._stopping and not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None:
                self._stopping = True
                break
            if sync_only:
                size += item.size
                if not item.sync or size > INLINE_BYTES:
                    self._carried = item
                    break
            batch.append(item)

    async def _write(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            if self.store.sync_engine is not None:  # SQLite: in turn with other processes
                results = await self._in_turn(batch)
            elif all(p.sync for p in batch):
                results = await self._write_pg(batch)
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
        self.store.signals.committed()
        metrics.batch_written(len(batch), time.perf_counter() - started)
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

    def _lock_fd(self) -> int | None:
        """SQLite: a lock file beside the database, held by a writer across its BEGIN
        IMMEDIATE ... COMMIT. The group writers of several processes (``[server] workers``)
        then take turns at once on the kernel's lock instead of sleeping in SQLite's busy
        handler (1, 2, 5, 10 ... ms between tries): measured with bench/smtp_intake.py,
        2 workers stored 715 messages/s that way against 1,390/s for one."""
        if self._lock is None:
            assert self.store.sync_engine is not None
            database = self.store.sync_engine.url.database or ""
            try:
                self._lock = os.open(f"{database}-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as exc:
                log.warning("no writer lock file (%s): writers of several processes take "
                            "turns through SQLite's busy handler", exc.strerror or exc)
                self._lock = -1
        return self._lock if self._lock >= 0 else None

    async def _in_turn(self, batch: list[_Pending]) -> list[tuple[bool, Any]]:
        """SQLite: the batch under the writer lock file (synchronous jobs on the writer's
        pysqlite connection, a batch with asynchronous jobs through aiosqlite).

        The lock is never held while this writer waits for a turn of its event loop (2 to
        5 ms each under SMTP load, measured: with 2 workers each held it ~10 ms per batch of
        3 to 7 messages, and 75 % of batches waited for the other): taken on the loop, with
        BEGIN IMMEDIATE and the statements right after it, it is released in the worker
        thread that commits, as soon as COMMIT returns. While another process holds it the
        writer tries again on its loop every millisecond, and the jobs that arrive meanwhile
        join the batch (under contention batches grow and commits get fewer, as within one
        process); waiting in a worker thread instead, then running the batch there, held
        the lock for the GIL's switch interval at every statement (measured: 5 of 6 batches
        of each worker went that way under bench/smtp_intake.py --workers 2). Past
        ``LOCK_POLL_LIMIT`` the whole batch still runs in a worker thread."""
        turn = _Turn(self._lock_fd())
        try:
            if not all(p.sync for p in batch):
                await turn.take()
                return await self._write_async(batch)
            return await self._write_sqlite(batch, turn)
        finally:
            turn.release()

    async def _write_sqlite(self, batch: list[_Pending], turn: _Turn) -> list[tuple[bool, Any]]:
        conn = await self._connection()
        try:
            transaction = None
            if (sum(p.size for p in batch) <= INLINE_BYTES
                    and await turn.poll(LOCK_POLL_LIMIT,
                                        lambda: self._take_queued(batch, sync_only=True))):
                transaction = _begin_now(conn)
            jobs = [cast(SyncJob, p.job) for p in batch]  # it may have grown meanwhile
            if transaction is None:
                # The batch is large, another process held the lock for long, or a program
                # that takes no lock file writes: all of it in a worker thread.
                return await asyncio.to_thread(self._write_in_thread, conn, jobs, turn)
            try:
                results = self._run_all(conn, jobs)  # on the loop: see the top
            except Exception as exc:  # a job failed (not BEGIN or COMMIT)
                await asyncio.to_thread(transaction.rollback)
                if len(jobs) == 1:
                    return [(False, exc)]
                log.info("a job of a batch of %d failed: running them again one by one",
                         len(jobs))
                return await asyncio.to_thread(self._write_each_in_turn, conn, jobs, turn)
            # The lock is released as soon as COMMIT returns. A slow fsync goes to a worker
            # thread; one batch in COMMIT_REMEASURE then commits on the loop again to measure
            # the disk (in a thread the time would count the waits for the GIL too).
            if self._disk_is_fast() or self.batches % COMMIT_REMEASURE == 0:
                self._commit_times.append(_commit_then_release(transaction, turn))
            else:
                await asyncio.to_thread(_commit_then_release, transaction, turn)
            return results
        except Exception:
            # Not on cancellation: a worker thread may still be using the connection.
            self._drop_connection()
            raise

    def _disk_is_fast(self) -> bool:
        """SQLite: the median of the last COMMITs on the loop is below INLINE_COMMIT_MAX."""
        times = sorted(self._commit_times)
        return not times or times[len(times) // 2] < INLINE_COMMIT_MAX

    def _write_each_in_turn(self, conn: Connection, jobs: list[SyncJob],
                            turn: _Turn) -> list[tuple[bool, Any]]:
        try:
            return self._write_each(conn, jobs)
        finally:
            turn.release()

    def _write_in_thread(self, conn: Connection, jobs: list[SyncJob],
                         turn: _Turn) -> list[tuple[bool, Any]]:
        """The whole batch in this worker thread: the lock taken (if not yet), BEGIN
        IMMEDIATE, the jobs, COMMIT, the lock released."""
        try:
            turn.take_blocking()
            with conn.begin() as transaction:
                try:
                    return self._run_all(conn, jobs)
                except Exception as exc:  # a job failed: BEGIN and COMMIT failures propagate
                    transaction.rollback()
                    if len(jobs) == 1:
                        return [(False, exc)]
            log.info("a job of a batch of %d failed: running them again one by one",
                     len(jobs))
            return self._write_each(conn, jobs)
        finally:
            turn.release()

    @staticmethod
    def _run_all(conn: Connection, jobs: list[SyncJob]) -> list[tuple[bool, Any]]:
        """Every job, then all their audit rows at once (raises if a job fails). The caller
        has its turn: SQLite's lock file, PostgreSQL's ``_take_turn``."""
        with ops.audit_batch(conn) as audit:
            results = [(True, value) for value in _run_jobs(conn, jobs)]
        ops.append_audit(conn, audit, locked=True)
        return results

    @staticmethod
    def _write_each(conn: Connection, jobs: list[SyncJob]) -> list[tuple[bool, Any]]:
        """One transaction, each job in its own savepoint: a failing job is rolled back alone
        (with its audit rows) and its caller gets the error."""
        results: list[tuple[bool, Any]] = []
        with conn.begin():
            # Savepoints straight on the sqlite3 connection (one per job): the statements
            # SQLAlchemy's begin_nested() would send, without its bookkeeping.
            sqlite3_conn: Any = conn.connection.driver_connection
            with ops.audit_batch(conn) as audit:
                for run in jobs:  # callers handle a lone job themselves
                    mark = len(audit)
                    sqlite3_conn.execute("SAVEPOINT job")
                    try:
                        value = run(conn)
                    except Exception as exc:  # handed to that job's caller
                        sqlite3_conn.execute("ROLLBACK TO SAVEPOINT job")
                        sqlite3_conn.execute("RELEASE SAVEPOINT job")
                        del audit[mark:]
                        results.append((False, exc))
                    else:
                        sqlite3_conn.execute("RELEASE SAVEPOINT job")
                        results.append((True, value))
            ops.append_audit(conn, audit, locked=True)
        return results

    async def _write_pg(self, batch: list[_Pending]) -> list[tuple[bool, Any]]:
        """PostgreSQL, synchronous jobs: the turn, then the whole batch in one ``run_sync``
        on the writer's connection (no pool checkout)."""
        try:
            conn = await self._pg_connection()
            async with conn.begin() as transaction:  # COMMIT at the end: never retried
                # The turn first (it waits while another process writes), then the jobs
                # that arrived meanwhile join the batch: under contention batches grow and
                # round trips per message fall, as with SQLite's lock file.
                await conn.run_sync(_take_turn)
                self._take_queued(batch, sync_only=True)
                jobs = [cast(SyncJob, p.job) for p in batch]
                try:
                    return await conn.run_sync(self._run_all, jobs)
                except Exception as exc:  # a job failed
                    await transaction.rollback()
                    if len(jobs) == 1:
                        return [(False, exc)]
            log.info("a job of a batch of %d failed: running them again one by one",
                     len(jobs))
            conn = await self._pg_connection()  # a fresh one if the failure lost it
            async with conn.begin():
                return await conn.run_sync(self._write_each_nested, jobs)
        except Exception:
            await self._drop_pg_connection()
            raise

    @staticmethod
    def _write_each_nested(conn: Connection, jobs: list[SyncJob]) -> list[tuple[bool, Any]]:
        """``_write_each`` through SQLAlchemy's savepoints (PostgreSQL), in the caller's
        transaction."""
        _take_turn(conn)
        results: list[tuple[bool, Any]] = []
        with ops.audit_batch(conn) as audit:
            for run in jobs:
                mark = len(audit)
                savepoint = conn.begin_nested()
                try:
                    value = run(conn)
                except Exception as exc:  # handed to that job's caller
                    savepoint.rollback()
                    del audit[mark:]
                    results.append((False, exc))
                else:
                    savepoint.commit()
                    results.append((True, value))
        ops.append_audit(conn, audit, locked=True)
        return results

    async def _write_async(self, batch: list[_Pending]) -> list[tuple[bool, Any]]:
        async with write_transaction(self.store.engine) as conn:
            await conn.run_sync(_take_turn)
            try:
                with ops.audit_batch(self._sync_of(conn)) as audit:
                    results = [(True, await self._run_async(conn, p)) for p in batch]
                await conn.run_sync(ops.append_audit, audit, True)
                return results  # COMMIT when the block ends; its failure is not retried
            except Exception as exc:  # a job failed
                await conn.rollback()
                if len(batch) == 1:
                    return [(False, exc)]
        log.info("a job of a batch of %d failed: running them again one by one", len(batch))
        results = []
        async with write_transaction(self.store.engine) as conn:
            await conn.run_sync(_take_turn)
            with ops.audit_batch(self._sync_of(conn)) as audit:
                for pending in batch:
                    mark = len(audit)
                    try:
                        async with conn.begin_nested():
                            value = await self._run_async(conn, pending)
                        results.append((True, value))
                    except Exception as exc:
                        del audit[mark:]
                        results.append((False, exc))
            await conn.run_sync(ops.append_audit, audit, True)
        return results

    @staticmethod
    def _sync_of(conn: AsyncConnection) -> Connection:
        sync = conn.sync_connection
        assert sync is not None
        return sync

    @staticmethod
    async def _run_async(conn: AsyncConnection, pending: _Pending) -> Any:
        job = pending.job
        assert job is not None
        if pending.sync:
            return await conn.run_sync(cast(SyncJob, job))
        return await cast(Job, job)(conn)
