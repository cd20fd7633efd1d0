"""Group commit: many jobs, one transaction; a failing job rolls back only itself (SQLite's
thread path and PostgreSQL's run_sync path)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import OperationalError

from imap_store.store import ops
from imap_store.store.db import migrate
from imap_store.store.directory import Store
from imap_store.store.writer import GroupWriter


def add_domain(name: str, *, audit: bool = False, fail: bool = False,
               seen: dict[str, threading.Thread] | None = None) -> Callable[[Connection], str]:
    """A writer job: insert trusted domain ``name`` (and its audit row with ``audit``), note
    the thread it ran in into ``seen``, then raise ValueError with ``fail``; returns
    ``name``."""
    def job(conn: Connection) -> str:
        if seen is not None:
            seen[name] = threading.current_thread()
        conn.execute(text("INSERT INTO trusted_domain (name, source, added_at) "
                          "VALUES (:n, 'test', CURRENT_TIMESTAMP)"), {"n": name})
        if audit:
            ops.audit(conn, "test", "add", name)
        if fail:
            raise ValueError("refused")
        return name
    return job


async def _started(db_url: str) -> tuple[Store, GroupWriter]:
    """A migrated store and its group writer, started."""
    await migrate(db_url)
    store = Store.from_url(db_url)
    writer = GroupWriter(store)
    writer.start()
    return store, writer


async def test_failing_job_rolls_back_alone(db_url: str) -> None:
    store, writer = await _started(db_url)

    add = partial(add_domain, audit=True)

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

    from imap_store.store.writer import INLINE_BYTES

    store, writer = await _started(db_url)
    seen: dict[str, threading.Thread] = {}

    add = partial(add_domain, seen=seen)

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
    store, writer = await _started(url)

    add = add_domain

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


def _message(n: int) -> bytes:
    return (f"From: Dr A <a{n}@hopital.example>\r\nTo: p@patient.example\r\n"
            f"Subject: R\u00e9sultat {n}\r\nMessage-ID: <m{n}@hopital.example>\r\n"
            "Date: Thu, 26 Nov 2026 10:00:00 +0100\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            f"\r\nBonjour {n}\r\n").encode()


_ROW = text(
    'SELECT m.uid, m.modseq, m.flags, m.keywords, m.size, m.message_id, m.in_reply_to, '
    'm."references", m.subject, m.from_addr, m.sent_date, m.thread_id, m.has_attachments, '
    "m.from_name, m.meta, b.sha256, b.size, b.data, s.from_text, s.to_text, s.subject_text "
    "FROM message m JOIN blob b ON b.id = m.blob_id "
    "LEFT JOIN blob_search s ON s.blob_id = b.id "
    "WHERE m.mailbox_id = :mb ORDER BY m.uid")


async def test_deliveries_in_a_batch_with_failing_jobs(db_url: str) -> None:
    """``deliver`` jobs grouped in one batch (one merged statement per mailbox on PostgreSQL):
    a job failing after its delivery and one naming a missing mailbox are rolled back alone
    (their UIDs, blobs and audit rows too), the others keep strictly increasing UIDs and
    MODSEQs, and the rows are those the statement-by-statement path writes."""
    from imap_store.store.deliver import MailboxName, deliver, derive

    store, writer = await _started(db_url)
    patient = await store.add_patient("test", "1" * 13, "P", "p@example.org", None,
                                      _message(0))
    pid = patient.id
    async with store.read() as conn:
        inbox = await store.mailbox_id(conn, pid, "INBOX")
        sent = await store.mailbox_id(conn, pid, "Sent")

    def put(n: int, fail: bool = False, box: str = "INBOX"):  # type: ignore[no-untyped-def]
        def job(conn: Connection) -> list[tuple[int, int, int]]:
            stored = deliver(conn, [MailboxName(pid, box), sent], _message(n), flags=n % 2)
            ops.audit(conn, "test", "deliver", str(n))
            if fail:
                raise ValueError("refused after delivering")
            return [(s.mailbox_id, s.uid, s.modseq) for s in stored]
        return job

    try:
        results = await asyncio.gather(
            writer.submit_sync(put(1)), writer.submit_sync(put(2, fail=True)),
            writer.submit_sync(put(3)), writer.submit_sync(put(4, box="Nowhere")),
            writer.submit_sync(put(5)), return_exceptions=True)
        assert writer.batches == 1, "one batch: the savepoint re-run path"
        assert isinstance(results[1], ValueError)
        assert isinstance(results[3], ops.MissingMailbox)
        good = [r for r in results if isinstance(r, list)]
        assert [[(mb, uid) for mb, uid, _m in r] for r in good] == [
            [(inbox, 2), (sent, 1)], [(inbox, 3), (sent, 2)], [(inbox, 4), (sent, 3)]]
        for column in (0, 1):  # MODSEQs strictly increasing per mailbox
            modseqs = [r[column][2] for r in good]
            assert modseqs == sorted(set(modseqs))
        async with store.read() as conn:
            blobs = (await conn.execute(text("SELECT count(*) FROM blob"))).scalar_one()
            assert blobs == 1 + 3  # the welcome message and the three delivered ones
            rows = (await conn.execute(_ROW, {"mb": inbox})).all()
        assert [r.subject for r in rows] == ["R\u00e9sultat 0", "R\u00e9sultat 1",
                                             "R\u00e9sultat 3", "R\u00e9sultat 5"]
        assert [r.flags for r in rows] == [0, 1, 1, 1]
        assert [r.subject for r in await store.audit_records()][-3:] == ["1", "3", "5"]
        assert (await store.audit_verify())[1] is None

        # The same message written statement by statement: the same row values.
        def by_statements(conn: Connection) -> None:
            raw = _message(5)
            fields = derive(raw)
            blob_id = ops.blob_put(conn, raw)
            assert fields.search is not None
            ops.blob_search_put(conn, blob_id, fields.search)
            ops.append(conn, sent, raw, fields, blob_id=blob_id, flags=1)

        await writer.submit_sync(by_statements)
        async with store.read() as conn:
            sent_rows = (await conn.execute(_ROW, {"mb": sent})).all()
        merged, plain = sent_rows[-2], sent_rows[-1]
        assert (merged.uid, plain.uid) == (3, 4) and plain.modseq > merged.modseq
        assert tuple(merged)[2:] == tuple(plain)[2:]
        assert merged.subject_text == "r\u00e9sultat 5" and merged.sha256 and merged.data
    finally:
        await writer.close()
        await store.close()


async def test_inline_reads_keep_connections_and_survive_a_lost_one(db_url: str) -> None:
    """``read_inline`` (the RCPT lookups): on PostgreSQL it keeps idle autocommit connections
    (no pool checkout and its three pre-ping round trips per lookup); a kept connection whose
    server backend went away is dropped and the lookup answers on a fresh one."""
    from imap_store.store.directory import INLINE_READERS_KEPT

    await migrate(db_url)
    store = Store.from_url(db_url)
    try:
        if store.sync_engine is not None:
            assert await store.read_inline(ops.trusted_domains) == []
            return  # SQLite: reads on the loop (test_many_reads_at_once_...)

        def backend(conn: Connection) -> int:
            return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())

        results = await asyncio.gather(*(store.read_inline(backend) for _ in range(20)))
        assert len(store._inline_readers) == INLINE_READERS_KEPT
        first = await store.read_inline(backend)
        assert first in results  # a kept connection, not a new one
        assert await store.read_inline(backend) == first  # the same one again
        async with store.engine.connect() as other:
            await other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first})
            await other.commit()
        await asyncio.sleep(0.2)
        # A direct statement (not SQLAlchemy's execution layer) on the lost connection: it
        # is found lost all the same, and the lookup answers on a fresh one.
        assert await store.read_inline(
            lambda conn: ops._PATIENT.first(conn, {"ins": "0" * 13})) is None
        assert await store.read_inline(backend) != first
        assert await store.read_inline(ops.trusted_domains) == []
    finally:
        await store.close()


async def test_direct_statements_take_part_in_the_callers_transaction(db_url: str) -> None:
    """A ``direct`` statement (on asyncpg it runs on the DBAPI cursor, past SQLAlchemy's
    execution layer) is part of the caller's transaction, whether it comes first in it or
    after others: rolled back with it, committed with it. Its errors come as SQLAlchemy's on
    PostgreSQL (as through ``Connection.execute``), without SQLAlchemy's echo of the
    parameters; on SQLite as pysqlite's, as every fast-path statement's."""
    import sqlite3

    from sqlalchemy.exc import IntegrityError

    insert = ops.Stmt("INSERT INTO trusted_domain (name, source, added_at) "
                      "VALUES (:name, 'test', CURRENT_TIMESTAMP)", direct=True)
    store, writer = await _started(db_url)

    def insert_then_fail(conn: Connection) -> None:
        insert.run(conn, {"name": "rolled-back.example"})
        raise RuntimeError("after the insert")

    try:
        with pytest.raises(RuntimeError):
            async with store.engine.begin() as conn:  # the direct statement comes first
                await conn.run_sync(insert_then_fail)
        with pytest.raises(RuntimeError):  # in the writer's batch, after its turn
            await writer.submit_sync(insert_then_fail)
        await writer.submit_sync(lambda conn: insert.run(conn, {"name": "kept.example"}))
        assert await store.trusted_domains() == ["kept.example"]
        with pytest.raises((IntegrityError, sqlite3.IntegrityError)) as refused:
            await writer.submit_sync(lambda conn: insert.run(conn, {"name": "kept.example"}))
        if store.sync_engine is None:  # PostgreSQL
            assert isinstance(refused.value, IntegrityError)
            assert "parameters hidden" in str(refused.value)
        assert await store.trusted_domains() == ["kept.example"]
    finally:
        await writer.close()
        await store.close()


async def test_open_exchange_opens_reopens_and_renames(db_url: str) -> None:
    """R2 through the writer (one merged statement on PostgreSQL): a first message opens the
    exchange, a later one keeps its id and start, a new display name is taken, an ended
    exchange re-opens with a new start; R4 Reply-To aliases are added once."""
    store, writer = await _started(db_url)
    patient = await store.add_patient("test", "2" * 13, "P", "p@example.org", None,
                                      _message(0))
    pid, pro = patient.id, "dr.a@hopital.example"
    read = text("SELECT id, state, professional_name, since FROM exchange "
                "WHERE patient_id = :p AND professional_address = :a")

    async def current() -> tuple[object, ...]:
        async with store.read() as conn:
            return tuple((await conn.execute(read, {"p": pid, "a": pro})).one())

    try:
        first = await writer.submit_sync(lambda c: ops.open_exchange(c, pid, pro, "Dr A"))
        opened = await current()
        assert opened[:3] == (first, "open", "Dr A")
        again = await writer.submit_sync(lambda c: ops.open_exchange(
            c, pid, pro, "Dr A", [("sec@hopital.example", "Secr\u00e9tariat"), (pro, "Dr A")]))
        assert again == first and await current() == opened
        await writer.submit_sync(lambda c: ops.open_exchange(
            c, pid, pro, "Dr A", [("sec@hopital.example", "Secr\u00e9tariat")]))
        renamed = await writer.submit_sync(lambda c: ops.open_exchange(c, pid, pro, "Dr B"))
        assert renamed == first and await current() == (first, "open", "Dr B", opened[3])
        assert await writer.submit_sync(lambda c: ops.end_exchanges(c, pid, pro))
        assert (await current())[1] == "ended"
        await asyncio.sleep(0.01)
        reopened = await writer.submit_sync(lambda c: ops.open_exchange(c, pid, pro, "Dr B"))
        row = await current()
        assert reopened == first and row[1:3] == ("open", "Dr B") and row[3] > opened[3]
        async with store.read() as conn:
            aliases = (await conn.execute(text(
                "SELECT address FROM exchange_alias WHERE exchange_id = :e"),
                {"e": first})).scalars().all()
        assert aliases == ["sec@hopital.example"]
    finally:
        await writer.close()
        await store.close()


async def test_deliver_many_writes_what_deliver_writes(db_url: str) -> None:
    """``deliver_many`` (one statement for a whole batch on PostgreSQL): several messages, two
    to the same mailbox, one to two patients, get consecutive UIDs and MODSEQs per mailbox in
    their order and the very rows ``deliver`` writes one by one; a missing mailbox fails the
    call (MissingMailbox) and the caller's rollback leaves nothing behind."""
    from imap_store.store.deliver import MailboxName, deliver, deliver_many

    store, writer = await _started(db_url)
    a = (await store.add_patient("test", "3" * 13, "A", "a@example.org", None, _message(0))).id
    b = (await store.add_patient("test", "4" * 13, "B", "b@example.org", None, _message(0))).id
    async with store.read() as conn:
        inbox_a = await store.mailbox_id(conn, a, "INBOX")
        inbox_b = await store.mailbox_id(conn, b, "INBOX")
        sent_b = await store.mailbox_id(conn, b, "Sent")
    try:
        stored = await writer.submit_sync(lambda c: deliver_many(c, [
            ([MailboxName(a, "INBOX")], _message(1), _parsed(1)),
            ([MailboxName(a, "INBOX"), MailboxName(b, "INBOX")], _message(2), _parsed(2)),
            ([MailboxName(a, "INBOX")], _message(3), _parsed(3)),
        ]))
        assert [[(s.mailbox_id, s.uid) for s in one] for one in stored] == [
            [(inbox_a, 2)], [(inbox_a, 3), (inbox_b, 2)], [(inbox_a, 4)]]
        modseqs = [stored[0][0].modseq, stored[1][0].modseq, stored[2][0].modseq]
        assert modseqs == sorted(set(modseqs)) and stored[1][0].blob_id == stored[1][1].blob_id
        assert len({one[0].blob_id for one in stored}) == 3
        # The same messages one by one into B's Sent: the same row values.
        await writer.submit_sync(lambda c: [deliver(c, [sent_b], _message(n))
                                            for n in (1, 2, 3)])
        async with store.read() as conn:
            merged = (await conn.execute(_ROW, {"mb": inbox_a})).all()[1:]
            plain = (await conn.execute(_ROW, {"mb": sent_b})).all()
        assert [tuple(r)[2:] for r in merged] == [tuple(r)[2:] for r in plain]
        assert [r.subject_text for r in merged] == [f"r\u00e9sultat {n}" for n in (1, 2, 3)]
        # A missing mailbox: the whole call fails, the transaction is rolled back.
        with pytest.raises(ops.MissingMailbox):
            await writer.submit_sync(lambda c: deliver_many(c, [
                ([MailboxName(a, "INBOX")], _message(4), _parsed(4)),
                ([MailboxName(b, "Nowhere")], _message(5), _parsed(5))]))
        async with store.read() as conn:
            assert len((await conn.execute(_ROW, {"mb": inbox_a})).all()) == 4
            blobs = (await conn.execute(text("SELECT count(*) FROM blob"))).scalar_one()
        assert blobs == 2 + 3 + 3  # two welcome messages, three merged, three one by one
    finally:
        await writer.close()
        await store.close()


def test_audit_detail_naming_its_uid_twice_is_refused() -> None:
    """``pg_audit_params`` cuts a row's texts around the one place its DeliveredUid's digits
    go: a detail whose nested value spells the same key and stand-in is refused, not
    hashed with the UID in the wrong place."""
    nested = {"uid": ops.DeliveredUid(0), "inner": {"uid": int(ops._UID_MARK)}}
    with pytest.raises(ValueError, match="names its uid more than once"):
        ops.pg_audit_params([("test", "deliver", "x", nested)])
    params = ops.pg_audit_params([("test", "deliver", "x", {"uid": ops.DeliveredUid(0)})])
    assert params["a_d_pre"] == ['{"uid":'] and params["a_d_post"] == ["}"]
    assert params["a_slot"] == [1]


async def test_deliver_many_chains_its_audit_rows(db_url: str) -> None:
    """``deliver_many``'s audit rows name the UIDs the deliveries gave (``DeliveredUid``):
    chained inside the delivering statement on PostgreSQL when nothing of the batch waits to
    be chained before them, after the rows waiting otherwise, and past ``SQL_CHAIN_MAX`` rows
    by the read-then-insert path. Texts that JSON escapes (quotes, backslashes, non-ASCII, a
    look-alike of the UID's key) hash as ``policy.audit`` hashes them: the chain verifies,
    and each detail is the canonical JSON of the entry with its UID."""
    import json

    from imap_store.store.deliver import MailboxName, deliver_many
    from policy.audit import canonical_detail

    store, writer = await _started(db_url)
    a = (await store.add_patient("test", "5" * 13, "A", "a@example.org", None, _message(0))).id
    b = (await store.add_patient("test", "6" * 13, "B", "b@example.org", None, _message(0))).id
    odd = 'x"uid":-7000000001\\ \u00e9\U0001f600\u2028'

    def delivering(n: int, extra: int = 0) -> Callable[[Connection], Any]:
        def job(conn: Connection) -> tuple[bool, list[int]]:
            inline = ops.chains_in_statement(conn)
            entries: list[ops.AuditEntry] = [(odd, "before", str(n), {"why": odd})]
            entries += [(f"actor {odd}", "deliver", f"{n}.{k}",
                         {"from": odd, "uid": ops.DeliveredUid(k), "z": odd})
                        for k in range(3)]
            entries += [("test", "filler", str(i), None) for i in range(extra)]
            stored = deliver_many(conn, [
                ([MailboxName(a, "INBOX")], _message(n), _parsed(n)),
                ([MailboxName(a, "INBOX"), MailboxName(b, "INBOX")], _message(n + 1),
                 _parsed(n + 1))], audit=entries)
            return inline, [s.uid for one in stored for s in one]
        return job

    def audited(conn: Connection) -> None:
        ops.audit(conn, "test", "first", "")

    try:
        postgres = db_url.startswith("postgresql")
        alone = await writer.submit_sync(delivering(1))
        after_other = await asyncio.gather(writer.submit_sync(audited),
                                           writer.submit_sync(delivering(3)))
        many = await writer.submit_sync(delivering(5, extra=ops.SQL_CHAIN_MAX))
        await writer.submit_sync(lambda c: ops.audit_many(
            c, [("test", "bulk", odd, {"n": i}) for i in range(ops.SQL_CHAIN_MAX + 1)]))
        assert alone[0] is postgres, "alone in its batch: chained in the statement"
        assert writer.batches == 4, "the two jobs together: the first one's row goes first"
        assert after_other[1][0] is False
        records = await store.audit_records()
        assert (await store.audit_verify())[1] is None
        for uids, first in ((alone[1], "1"), (after_other[1][1], "3"), (many[1], "5")):
            rows = {r.subject: r for r in records if r.action == "deliver"
                    and r.subject.startswith(first + ".")}
            assert [json.loads(rows[f"{first}.{k}"].detail)["uid"] for k in range(3)] == uids
            for k in range(3):
                row = rows[f"{first}.{k}"]
                assert row.actor == f"actor {odd}"
                assert row.detail == canonical_detail({"from": odd, "uid": uids[k], "z": odd})
        assert [r.action for r in records].count("filler") == ops.SQL_CHAIN_MAX
        assert [r.action for r in records].count("bulk") == ops.SQL_CHAIN_MAX + 1
    finally:
        await writer.close()
        await store.close()


async def test_open_exchanges_and_notifications_for_a_batch(db_url: str) -> None:
    """The exchanges of a batch (``deliver_many``'s, inside its one statement on PostgreSQL)
    and ``enqueue_notifications`` (one statement on PostgreSQL) leave the rows the one-by-one
    operations leave: a new exchange opened, an ended one re-opened, a repeated pair taking
    its last name; one waiting notification per patient."""
    from imap_store.store.deliver import deliver_many
    from imap_store.store.outbound import enqueue_notification, enqueue_notifications

    store, writer = await _started(db_url)
    a = (await store.add_patient("test", "5" * 13, "A", "a@example.org", None, _message(0))).id
    b = (await store.add_patient("test", "6" * 13, "B", "b@example.org", None, _message(0))).id
    read = text("SELECT patient_id, professional_address, professional_name, state "
                "FROM exchange ORDER BY patient_id, professional_address")
    try:
        await writer.submit_sync(lambda c: ops.open_exchange(c, a, "x@h.example", "X"))
        await writer.submit_sync(lambda c: ops.end_exchanges(c, a, "x@h.example"))
        await writer.submit_sync(lambda c: deliver_many(c, [], [
            (a, "x@h.example", "X"), (a, "y@h.example", "Y"), (b, "y@h.example", "Y1"),
            (b, "y@h.example", "Y2")]))
        async with store.read() as conn:
            rows = [tuple(r) for r in (await conn.execute(read)).all()]
        assert rows == [(a, "x@h.example", "X", "open"), (a, "y@h.example", "Y", "open"),
                        (b, "y@h.example", "Y2", "open")]
        await writer.submit_sync(lambda c: enqueue_notification(c, a, "n@gw.example"))
        await writer.submit_sync(lambda c: enqueue_notifications(c, [a, b, b], "n@gw.example"))
        async with store.read() as conn:
            queued = (await conn.execute(text(
                "SELECT patient_id, recipient, sender, state FROM outbound "
                "WHERE kind = 'notification' ORDER BY patient_id"))).all()
        assert [tuple(r) for r in queued] == [(a, "a@example.org", "n@gw.example", "queued"),
                                              (b, "b@example.org", "n@gw.example", "queued")]
    finally:
        await writer.close()
        await store.close()


def _parsed(n: int):  # type: ignore[no-untyped-def]
    from imap_store.mime import parse_message

    return parse_message(_message(n))


async def test_delivery_jobs_of_a_batch_run_together(db_url: str) -> None:
    """SMTP intake's store jobs (``smtp_in.delivery.DeliveryJob``) of one batch run together
    (three statements for the batch on PostgreSQL), an end of exchange (R5) by itself between
    them; a job whose patient is gone fails alone (the batch runs again job by job) and the
    others keep their UIDs in order, their exchanges (R2), one notification per patient and
    their audit rows in order."""
    from imap_store.mime import parse_message
    from imap_store.store.notices import Notices, NoticeSettings
    from policy.rules import Identity, Role
    from smtp_in.delivery import Delivery, incoming_from_info
    from smtp_in.settings import SmtpSettings
    from templates import Templates

    store, writer = await _started(db_url)
    ids = [(await store.add_patient("test", str(n) * 13, f"P{n}", f"p{n}@example.org", None,
                                    _message(0))).id for n in (7, 8, 9)]
    a, b, gone = ids
    delivery = Delivery(store, SmtpSettings("mx.example", "patient.example", notify=True,
                                            system_sender="n@gw.example"),
                        Notices(Templates(), NoticeSettings("n@gw.example", "S", "gw.example")))
    pro = Identity(Role.PROFESSIONAL, "dr.x@h.example")

    def job(n: int, *patients: int, end: bool = False):  # type: ignore[no-untyped-def]
        raw = _message(n).replace(b"Subject: ", b"Subject: [FIN] " if end else b"Subject: ")
        info = parse_message(raw)
        return delivery.job(pro, "Dr.X@h.example", [(f"{p}@patient.example", p, f"ins{p}")
                                                    for p in patients],
                            raw, incoming_from_info(info), info, "Dr X", frozenset(),
                            [("test", "rcpt", str(n), {})])

    jobs = [job(1, a), job(2, a, b), job(3, b, end=True), job(5, a)]
    assert [j.mergeable() for j in jobs] == [True, True, False, True]
    await writer.submit_sync(lambda c: c.execute(text("DELETE FROM mailbox WHERE patient_id = :p"),
                                                 {"p": gone}))
    batches = writer.batches
    try:
        # One batch, no failure: jobs 1-2 together, 3 alone, 5 alone after it.
        assert await asyncio.gather(*(writer.submit_sync(j) for j in jobs)) == [None] * 4
        # Another batch where one job fails: run again job by job, the others stored.
        results = await asyncio.gather(*(writer.submit_sync(j) for j in (
            job(6, a), job(4, gone), job(7, a, b))), return_exceptions=True)
        assert writer.batches == batches + 2
        assert [type(r).__name__ for r in results] == ["NoneType", "MissingMailbox", "NoneType"]
        async with store.read() as conn:
            inbox = {p: await store.mailbox_id(conn, p, "INBOX") for p in (a, b)}
            subjects = {p: [r.subject for r in (await conn.execute(_ROW, {"mb": inbox[p]}))]
                        for p in (a, b)}
            exchanges = (await conn.execute(text(
                "SELECT patient_id, state FROM exchange ORDER BY patient_id"))).all()
            queued = (await conn.execute(text(
                "SELECT patient_id FROM outbound WHERE kind = 'notification' "
                "ORDER BY patient_id"))).scalars().all()
        assert subjects[a] == ["R\u00e9sultat " + str(n) for n in (0, 1, 2, 5, 6, 7)]
        assert subjects[b][:3] == ["R\u00e9sultat 0", "R\u00e9sultat 2",
                                   "[FIN] R\u00e9sultat 3"]
        assert "mis fin" in subjects[b][3]  # R5's notice, after the message that ended it
        assert subjects[b][4:] == ["R\u00e9sultat 7"]
        assert [tuple(r) for r in exchanges] == [(a, "open"), (b, "open")]  # 7 re-opened B's
        assert queued == [a, b]
        records = [(r.action, r.subject) for r in await store.audit_records()][-14:]
        assert records == [("rcpt", "1"), ("deliver", f"ins{a}"), ("rcpt", "2"),
                           ("deliver", f"ins{a}"), ("deliver", f"ins{b}"), ("rcpt", "3"),
                           ("deliver", f"ins{b}"), ("rcpt", "5"), ("deliver", f"ins{a}"),
                           ("rcpt", "6"), ("deliver", f"ins{a}"), ("rcpt", "7"),
                           ("deliver", f"ins{a}"), ("deliver", f"ins{b}")]
        assert (await store.audit_verify())[1] is None
    finally:
        await writer.close()
        await store.close()


def test_runs_of_mergeable_jobs_run_together() -> None:
    """The writer hands each run of consecutive mergeable jobs of one class to that class's
    ``run_together`` (a run of one is called alone), in order, the others one by one."""
    from imap_store.store.writer import MergeableJob, _run_jobs

    calls: list[tuple[str, ...]] = []

    class Put(MergeableJob):
        def __init__(self, name: str, alone: bool = False) -> None:
            self.name, self.alone = name, alone

        def mergeable(self) -> bool:
            return not self.alone

        def __call__(self, conn: Connection) -> str:
            calls.append((self.name,))
            return self.name

        @classmethod
        def run_together(cls, conn: Connection, jobs):  # type: ignore[no-untyped-def]
            calls.append(tuple(j.name for j in jobs))
            return [j.name.upper() for j in jobs]

    class Other(Put):
        pass

    def plain(conn: Connection) -> str:
        calls.append(("plain",))
        return "plain"

    jobs = [Put("a"), Put("b"), Put("c", alone=True), Put("d"), Other("e"), Other("f"), plain,
            Put("g"), Put("h")]
    assert _run_jobs(None, jobs) == ["A", "B", "c", "d", "E", "F", "plain", "G", "H"]  # type: ignore[arg-type]
    assert calls == [("a", "b"), ("c",), ("d",), ("e", "f"), ("plain",), ("g", "h")]


async def test_sender_and_patient_in_one_lookup_read_what_two_lookups_read(db_url: str) -> None:
    """An RCPT's first question (``ConnectionFacts.sender_and_patient``: one statement) reads
    the same facts as ``professional`` then ``patient``: a known, suspended or unknown
    professional (trusted domain or not), a known, closed or unknown patient."""
    from imap_store.store.ops import ConnectionFacts

    await migrate(db_url)
    store = Store.from_url(db_url)
    try:
        await writer_job(store, lambda c: c.execute(text(
            "INSERT INTO trusted_domain (name, source, added_at) "
            "VALUES ('h.example', 'test', CURRENT_TIMESTAMP)")))
        await store.add_professional("test", "dr.a@h.example", "Dr A", None, None)
        await store.add_professional("test", "dr.s@h.example", "Dr S", None, None)
        await store.set_professional_state("test", "dr.s@h.example", "suspended")
        await store.add_patient("test", "1" * 13, "P", "p@example.org", None, _message(0))
        await store.add_patient("test", "2" * 13, "Q", "q@example.org", None, _message(0))
        await store.set_patient_state("test", "2" * 13, "closed")
        cases = [(pro, ins) for pro in ("dr.a@h.example", "dr.s@h.example", "x@h.example",
                                        "y@elsewhere.example")
                 for ins in ("1" * 13, "2" * 13, "3" * 13)]

        def read(conn: Connection) -> list[tuple[object, object]]:
            facts = ConnectionFacts(conn)
            return [(facts.sender_and_patient(pro, ins),
                     (facts.professional(pro), facts.patient(ins))) for pro, ins in cases]

        pairs = await store.run_read(read)
        assert all(one == two for one, two in pairs)
        seen = {(p.in_directory, p.active, p.trusted_domain, pt.exists, pt.state.value
                 if pt.exists else None) for (p, (pt, _id)), _two in pairs}
        assert len(seen) == 12  # every case reads differently from the others but itself
    finally:
        await store.close()


async def writer_job(store: Store, job):  # type: ignore[no-untyped-def]
    writer = GroupWriter(store)
    writer.start()
    try:
        return await writer.submit_sync(job)
    finally:
        await writer.close()


async def test_audit_rows_chain_after_rows_other_writers_appended(db_url: str) -> None:
    """The writer appends its batch's audit rows after the chain's end as it finds it (one
    statement on PostgreSQL, which chains them itself): when another connection appended
    meanwhile (another process's writer, the admin command line), its rows chain after those:
    the chain stays one chain, in id order."""
    store, writer = await _started(db_url)
    try:
        for n in range(3):
            await asyncio.gather(*(writer.submit_sync(
                lambda c, i=i, n=n: ops.audit(c, "writer", "batch", f"{n}.{i}")) for i in range(3)))
            async with store.write() as conn:  # another connection appends in between
                await store.audit(conn, "other", "append", str(n))
        await writer.submit_sync(lambda c: ops.audit(c, "writer", "last", ""))
        records = await store.audit_records()
        assert [r.subject for r in records][-13:] == [
            "0.0", "0.1", "0.2", "0", "1.0", "1.1", "1.2", "1", "2.0", "2.1", "2.2", "2", ""]
        assert (await store.audit_verify())[1] is None
    finally:
        await writer.close()
        await store.close()


@pytest.mark.parametrize("limit", [5.0, 0.1], ids=["on-loop", "then-in-thread"])
async def test_sqlite_writer_waits_for_the_lock_file_and_its_batch_grows(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch, limit: float) -> None:
    """Another process holding the writer lock file: the writer tries again on its loop, and
    the jobs that arrive meanwhile join its batch (one transaction for all). Once the lock
    is free it runs the batch on the loop; past LOCK_POLL_LIMIT it waits for it in a worker
    thread with the grown batch. Every caller gets its own result either way."""
    import fcntl
    import os
    from pathlib import Path

    from imap_store.store import writer as writer_module

    monkeypatch.setattr(writer_module, "LOCK_POLL_LIMIT", limit)
    path = Path(str(tmp_path)) / "turns.db"
    url = f"sqlite:///{path}"
    store, writer = await _started(url)
    seen: dict[str, threading.Thread] = {}

    add = partial(add_domain, seen=seen)

    other = os.open(f"{path}-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await writer.submit_sync(add("before.example"))
        batches, jobs = writer.batches, writer.jobs
        fcntl.flock(other, fcntl.LOCK_EX)  # another process's turn
        first = asyncio.ensure_future(writer.submit_sync(add("a.example")))
        await asyncio.sleep(0.01)  # the writer took a.example and waits for the lock
        later = [asyncio.ensure_future(writer.submit_sync(add(name)))
                 for name in ("b.example", "c.example")]
        await asyncio.sleep(0.02 if limit > 1 else 3 * limit)
        assert not first.done()
        fcntl.flock(other, fcntl.LOCK_UN)
        results = await asyncio.wait_for(asyncio.gather(first, *later), 30)
        assert results == ["a.example", "b.example", "c.example"]
        assert (writer.batches, writer.jobs) == (batches + 1, jobs + 3)  # one transaction
        on_loop = {seen[name] is threading.current_thread() for name in results}
        assert on_loop == {limit > 1}
        assert await store.trusted_domains() == ["a.example", "b.example", "before.example",
                                                 "c.example"]
    finally:
        os.close(other)
        await writer.close()
        await store.close()


async def _commits_placed(tmp_path: object, domains: int, spike_at: int | None = None
                          ) -> tuple[list[bool], Store]:
    """A SQLite store and its group writer adding ``domains`` domains one batch each; where
    each COMMIT ran (True: on the event loop's thread). ``spike_at``: that commit (1-based)
    takes 0.3 s more, counted in its time. The store is returned open (callers close it)."""
    import time
    from pathlib import Path

    from sqlalchemy import event

    url = f"sqlite:///{Path(str(tmp_path)) / 'commits.db'}"
    await migrate(url)
    store = Store.from_url(url)
    assert store.sync_engine is not None
    committed_in: list[bool] = []
    loop_thread = threading.current_thread()

    def on_commit(conn: object) -> None:
        committed_in.append(threading.current_thread() is loop_thread)
        if len(committed_in) == spike_at:
            time.sleep(0.3)

    event.listen(store.sync_engine, "commit", on_commit)
    writer = GroupWriter(store)
    writer.start()
    try:
        for i in range(domains):
            await writer.submit_sync(add_domain(f"d{i}.example"))
    finally:
        await writer.close()
    placed = list(committed_in)  # before the read below, which may commit too
    assert len(await store.trusted_domains()) == domains
    return placed, store


@pytest.mark.parametrize("fast", [True, False], ids=["fast-disk", "slow-disk"])
async def test_sqlite_commit_on_the_loop_while_the_disk_is_fast(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    """SQLite: COMMIT runs on the loop while the median of the last commits there took less
    than INLINE_COMMIT_MAX; with a slow disk in a worker thread, but for one batch in
    COMMIT_REMEASURE that measures the disk again on the loop."""
    from imap_store.store import writer as writer_module

    monkeypatch.setattr(writer_module, "INLINE_COMMIT_MAX", 10.0 if fast else 0.0)
    batches, store = await _commits_placed(tmp_path, 66)
    await store.close()
    assert len(batches) == 66  # where each of the 66 batches committed
    if fast:
        assert all(batches)
    else:
        assert [i for i, on_loop in enumerate(batches) if on_loop] == [
            i for i in range(66) if i % writer_module.COMMIT_REMEASURE == 0]


async def test_sqlite_one_slow_commit_keeps_commits_on_the_loop(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite: one slow COMMIT among fast ones (a WAL checkpoint) does not send the next
    batches to a worker thread: the writer judges the disk by the median of its last
    commits, not by one."""
    from imap_store.store import writer as writer_module

    monkeypatch.setattr(writer_module, "INLINE_COMMIT_MAX", 0.05)
    batches, store = await _commits_placed(tmp_path, 12, spike_at=3)
    await store.close()
    assert batches == [True] * 12


async def test_jobs_arriving_while_another_process_writes_join_the_batch(db_url: str) -> None:
    """Another process's turn to write (SQLite: its hold of the lock file; PostgreSQL: the
    writers' advisory lock): the jobs that arrive while this writer waits for its turn join
    its batch, one transaction for all, each caller getting its own result."""
    import fcntl
    import os

    from imap_store.store.writer import WRITER_LOCK_KEY
    from tests.conftest import _pg_connect

    store, writer = await _started(db_url)

    add = partial(add_domain, audit=True)

    other: Any = None
    try:
        await writer.submit_sync(add("before.example"))
        batches, jobs = writer.batches, writer.jobs
        if store.sync_engine is not None:
            other = os.open(f"{store.sync_engine.url.database}-writer.lock", os.O_RDWR)
            fcntl.flock(other, fcntl.LOCK_EX)
        else:
            other = await _pg_connect()
            await other.execute("SELECT pg_advisory_lock($1)", WRITER_LOCK_KEY)
        first = asyncio.ensure_future(writer.submit_sync(add("a.example")))
        await asyncio.sleep(0.02)  # the writer took a.example and waits for its turn
        later = [asyncio.ensure_future(writer.submit_sync(add(name)))
                 for name in ("b.example", "c.example")]
        await asyncio.sleep(0.02)
        assert not first.done()
        if store.sync_engine is not None:
            fcntl.flock(other, fcntl.LOCK_UN)
        else:
            await other.execute("SELECT pg_advisory_unlock($1)", WRITER_LOCK_KEY)
        results = await asyncio.wait_for(asyncio.gather(first, *later), 30)
        assert results == ["a.example", "b.example", "c.example"]
        assert (writer.batches, writer.jobs) == (batches + 1, jobs + 3)
        assert [r.subject for r in await store.audit_records()] == [
            "before.example", "a.example", "b.example", "c.example"]
        assert (await store.audit_verify())[1] is None
    finally:
        if isinstance(other, int):
            os.close(other)
        elif other is not None:
            await other.close()
        await writer.close()
        await store.close()
