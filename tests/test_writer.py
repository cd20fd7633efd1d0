"""Group commit: many jobs, one transaction; a failing job rolls back only itself (SQLite's
thread path and PostgreSQL's run_sync path)."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from imap_store.store import ops
from imap_store.store.db import migrate
from imap_store.store.directory import Store
from imap_store.store.writer import GroupWriter


async def test_failing_job_rolls_back_alone(db_url: str) -> None:
    await migrate(db_url)
    store = Store.from_url(db_url)
    writer = GroupWriter(store)
    writer.start()

    def add(name: str, fail: bool = False):  # type: ignore[no-untyped-def]
        def job(conn: Connection) -> str:
            conn.execute(text("INSERT INTO trusted_domain (name, source, added_at) "
                              "VALUES (:n, 'test', CURRENT_TIMESTAMP)"), {"n": name})
            ops.audit(conn, "test", "add", name)
            if fail:
                raise ValueError("refused")
            return name
        return job

    try:
        results = await asyncio.gather(
            writer.submit_sync(add("a.example")),
            writer.submit_sync(add("b.example", fail=True)),
            writer.submit_sync(add("c.example")),
            return_exceptions=True,
        )
        assert results[0] == "a.example" and results[2] == "c.example"
        assert isinstance(results[1], ValueError)
        assert await store.trusted_domains() == ["a.example", "c.example"]
        assert writer.batches == 1 and writer.jobs == 3  # one transaction, savepoints inside
        # A lone failing job fails alone too.
        with pytest.raises(ValueError):
            await writer.submit_sync(add("d.example", fail=True))
        assert await store.trusted_domains() == ["a.example", "c.example"]
        # Audit rows of a batch are written together at its end; the failed jobs' are not.
        assert [r.subject for r in await store.audit_records()] == ["a.example", "c.example"]
        assert (await store.audit_verify())[1] is None
        await asyncio.gather(writer.submit_sync(add("e.example")),
                             writer.submit_sync(add("f.example")))
        assert [r.subject for r in await store.audit_records()][-2:] == ["e.example",
                                                                        "f.example"]
        assert (await store.audit_verify())[1] is None
    finally:
        await writer.close()
        await store.close()


async def test_small_batches_on_the_loop_large_ones_in_a_thread(db_url: str) -> None:
    """SQLite: statements of small batches run on the event loop's thread (no GIL ping-pong),
    a batch carrying more than INLINE_BYTES runs in a worker thread (the loop never stalls on
    a large message). PostgreSQL: always on the loop, through run_sync."""
    import threading

    from imap_store.store.writer import INLINE_BYTES

    await migrate(db_url)
    store = Store.from_url(db_url)
    writer = GroupWriter(store)
    writer.start()
    seen: dict[str, threading.Thread] = {}

    def add(name: str):  # type: ignore[no-untyped-def]
        def job(conn: Connection) -> None:
            seen[name] = threading.current_thread()
            conn.execute(text("INSERT INTO trusted_domain (name, source, added_at) "
                              "VALUES (:n, 'test', CURRENT_TIMESTAMP)"), {"n": name})
        return job

    try:
        await asyncio.gather(writer.submit_sync(add("small.example"), size=4096),
                             writer.submit_sync(add("other.example"), size=4096))
        await writer.submit_sync(add("large.example"), size=INLINE_BYTES + 1)
        assert await store.trusted_domains() == ["large.example", "other.example",
                                                 "small.example"]
        loop_thread = threading.current_thread()
        assert seen["small.example"] is loop_thread and seen["other.example"] is loop_thread
        if store.sync_engine is not None:
            assert seen["large.example"] is not loop_thread
    finally:
        await writer.close()
        await store.close()


@pytest.mark.parametrize("size", [0, 2 << 20], ids=["on-loop", "in-thread"])
async def test_sqlite_lock_timeout_fails_the_batch_then_writer_recovers(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        size: int) -> None:
    """Another process holding SQLite's write lock past the busy timeout: the waiting callers
    get the error (their SMTP clients a 451) once, without a second wait (a failed BEGIN is
    not a failed job), nothing half-written; once the lock is free the next batch commits on
    a fresh connection."""
    import sqlite3
    from pathlib import Path

    from imap_store.store import db

    monkeypatch.setattr(db, "SQLITE_BUSY_TIMEOUT_MS", 200)
    path = Path(str(tmp_path)) / "locked.db"
    url = f"sqlite:///{path}"
    await migrate(url)
    store = Store.from_url(url)
    writer = GroupWriter(store)
    writer.start()

    def add(name: str):  # type: ignore[no-untyped-def]
        def job(conn: Connection) -> None:
            conn.execute(text("INSERT INTO trusted_domain (name, source, added_at) "
                              "VALUES (:n, 'test', CURRENT_TIMESTAMP)"), {"n": name})
        return job

    other = sqlite3.connect(path, isolation_level=None)
    try:
        await writer.submit_sync(add("before.example"))  # the writer's connection exists
        other.execute("BEGIN IMMEDIATE")
        caplog.set_level("INFO", logger="imap_store.store.writer")
        results = await asyncio.gather(writer.submit_sync(add("a.example"), size=size),
                                       writer.submit_sync(add("b.example"), size=size),
                                       return_exceptions=True)
        assert all(isinstance(r, OperationalError) and "locked" in str(r)
                   for r in results), results
        assert "running them again" not in caplog.text
        other.execute("ROLLBACK")
        await writer.submit_sync(add("after.example"))
        assert await store.trusted_domains() == ["after.example", "before.example"]
    finally:
        other.close()
        await writer.close()
        await store.close()


async def test_many_reads_at_once_leave_the_shared_pool_usable(tmp_path: object) -> None:
    """Reads on the event loop (SQLite) that begin together each open a connection; once done
    only a couple are kept, so worker-thread reads and the writer still get connections (the
    pool once starved and every thread hop hung)."""
    from pathlib import Path

    from imap_store.store.directory import LOOP_READERS_KEPT

    url = f"sqlite:///{Path(str(tmp_path)) / 'reads.db'}"
    await migrate(url)
    store = Store.from_url(url)
    try:
        results = await asyncio.gather(*(store.read_inline(ops.trusted_domains)
                                         for _ in range(40)))
        assert results == [[]] * 40
        assert len(store._loop_readers) <= LOOP_READERS_KEPT
        assert await asyncio.wait_for(store.run_read(ops.trusted_domains), timeout=10) == []
    finally:
        await store.close()
