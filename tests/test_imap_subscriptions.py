"""Subscriptions are names, not mailboxes (issue 13): against the real ``serve`` process over
implicit TLS with imaplib, on SQLite and PostgreSQL. DELETE keeps the subscription (RFC 3501
§6.3.4, §6.3.6), LSUB lists it as ``\\Noselect`` (§6.3.9, §7.2.2), LIST (SUBSCRIBED) as
``\\NonExistent \\Subscribed`` (RFC 5258 §3.1, §5 example 2), UNSUBSCRIBE removes it;
RENAME leaves subscriptions on their names (RFC 9051 §6.3.6, as Dovecot 2.3). And migration
0010 moves the old ``mailbox.subscribed`` flags into the table and back, messages untouched."""

from __future__ import annotations

import asyncio
import imaplib
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import func, select, text

from imap_store.store import schema as t
from imap_store.store.db import MIGRATIONS_DIR, create_engine, write_transaction
from tests.conftest import INAYA, PATIENT_PASSWORD, cli_in_process
from tests.gateway_proc import Gateway
from tests.helpers import imap_login


def _lsub(conn: imaplib.IMAP4_SSL, pattern: str) -> list[bytes]:
    typ, data = conn.lsub('""', pattern)
    assert typ == "OK", data
    return [d for d in data if d is not None]


def _list(conn: imaplib.IMAP4_SSL, *args: str) -> list[bytes]:
    typ, data = conn._simple_command("LIST", *args)
    assert typ == "OK", data
    return list(conn.untagged_responses.pop("LIST", []))


def test_delete_keeps_the_subscription_until_unsubscribe(gateway: Gateway) -> None:
    conn = imap_login(gateway)
    for name in ("Dossier", "Dossier/Bilan"):
        assert conn.create(name)[0] == "OK"  # CREATE subscribes
    assert _lsub(conn, '"Dossier*"') == [b'() "/" "Dossier"', b'() "/" "Dossier/Bilan"']
    assert conn.delete("Dossier/Bilan")[0] == "OK"
    # the name stays subscribed; no mailbox: \Noselect to LSUB ...
    assert _lsub(conn, '"Dossier*"') == [b'() "/" "Dossier"',
                                         b'(\\Noselect) "/" "Dossier/Bilan"']
    # ... \NonExistent \Subscribed to LIST (SUBSCRIBED); Dossier has no child mailbox left
    assert _list(conn, "(SUBSCRIBED)", '""', '"Dossier*"') == [
        b'(\\HasNoChildren \\Subscribed) "/" "Dossier"',
        b'(\\NonExistent \\HasNoChildren \\Subscribed) "/" "Dossier/Bilan"']
    # a plain LIST lists mailboxes only, RETURN (SUBSCRIBED) marks them
    assert _list(conn, '""', '"Dossier*"', "RETURN", "(SUBSCRIBED)") == [
        b'(\\HasNoChildren \\Subscribed) "/" "Dossier"']
    assert _list(conn, '""', '"Dossier*"') == [b'(\\HasNoChildren) "/" "Dossier"']
    # a parent kept by its subscribed child's name: \NonExistent, \Subscribed while it is
    assert conn.delete("Dossier")[0] == "OK"
    assert _list(conn, "(SUBSCRIBED)", '""', '"Dossier*"') == [
        b'(\\NonExistent \\HasNoChildren \\Subscribed) "/" "Dossier"',
        b'(\\NonExistent \\HasNoChildren \\Subscribed) "/" "Dossier/Bilan"']
    assert conn.unsubscribe("Dossier")[0] == "OK"
    assert _list(conn, "(SUBSCRIBED RECURSIVEMATCH)", '""', '"Doss%"') == [
        b'(\\NonExistent \\HasNoChildren) "/" "Dossier" ("CHILDINFO" ("SUBSCRIBED"))']
    assert _lsub(conn, '"Doss%"') == [b'(\\Noselect) "/" "Dossier"']
    # the mailbox made again finds its subscription
    assert conn.create("Dossier/Bilan")[0] == "OK"
    assert _lsub(conn, '"Dossier/*"') == [b'() "/" "Dossier/Bilan"']
    assert conn.delete("Dossier/Bilan")[0] == "OK"
    # UNSUBSCRIBE takes the name of a gone mailbox; a name neither subscribed nor a mailbox
    # is NO, and SUBSCRIBE wants a mailbox
    assert conn.unsubscribe("Dossier/Bilan")[0] == "OK"
    assert _lsub(conn, '"Dossier*"') == []
    assert conn.unsubscribe("Dossier/Bilan")[0] == "NO"
    assert conn.subscribe("Nulle/Part")[0] == "NO"
    assert _list(conn, "(SUBSCRIBED)", '""', '"*"') == [
        b'(\\HasNoChildren \\Subscribed) "/" "INBOX"',
        b'(\\HasNoChildren \\Drafts \\Subscribed) "/" "Drafts"',
        b'(\\HasNoChildren \\Sent \\Subscribed) "/" "Sent"',
        b'(\\HasNoChildren \\Trash \\Subscribed) "/" "Trash"']
    conn.logout()


def test_rename_leaves_subscriptions_on_their_names(gateway: Gateway) -> None:
    conn = imap_login(gateway)
    for name in ("Labo", "Labo/2024"):
        assert conn.create(name)[0] == "OK"
    assert conn.rename("Labo", "Analyses")[0] == "OK"
    # RFC 9051 §6.3.6: the old names stay subscribed, the new ones are not
    assert _lsub(conn, '"*"') == [
        b'() "/" "INBOX"', b'() "/" "Drafts"', b'(\\Noselect) "/" "Labo"',
        b'(\\Noselect) "/" "Labo/2024"', b'() "/" "Sent"', b'() "/" "Trash"']
    assert _list(conn, '""', '"*"', "RETURN", "(SUBSCRIBED)")[1:3] == [
        b'(\\HasChildren) "/" "Analyses"', b'(\\HasNoChildren) "/" "Analyses/2024"']
    # RFC 9051's sequence keeps them in step
    assert conn.subscribe("Analyses")[0] == "OK"
    assert conn.unsubscribe("Labo")[0] == "OK"
    assert _lsub(conn, '"*"') == [
        b'() "/" "INBOX"', b'() "/" "Analyses"', b'() "/" "Drafts"',
        b'(\\Noselect) "/" "Labo/2024"', b'() "/" "Sent"', b'() "/" "Trash"']
    # renaming INBOX makes a mailbox and leaves INBOX subscribed
    assert conn.rename("INBOX", "Ancien")[0] == "OK"
    assert _lsub(conn, "INBOX") == [b'() "/" "INBOX"']
    assert _lsub(conn, "Ancien") == []
    conn.logout()


def _run_alembic(url: str, action: str, revision: str) -> None:
    async def go() -> None:
        engine = create_engine(url, pool_size=1)
        try:
            async with write_transaction(engine) as conn:
                def alembic(sync: object) -> None:
                    cfg = AlembicConfig()
                    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
                    cfg.attributes["connection"] = sync
                    getattr(command, action)(cfg, revision)
                await conn.run_sync(alembic)
        finally:
            await engine.dispose()

    asyncio.run(go())


def _query(url: str, statement: object) -> list[tuple[object, ...]]:
    async def go() -> list[tuple[object, ...]]:
        engine = create_engine(url, pool_size=1)
        try:
            async with engine.connect() as conn:
                return [tuple(r) for r in await conn.execute(statement)]  # type: ignore[arg-type]
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_migration_0010_moves_the_flags_both_ways(gw_dir: Path, db_url: str) -> None:
    cli_in_process(gw_dir / "gateway.toml", "patient", "add", INAYA, "--name", "Inaya Michel",
                   "--notify-email", "inaya@example.org", "--password-stdin",
                   stdin=PATIENT_PASSWORD + "\n")
    messages = _query(db_url, select(func.count()).select_from(t.message))
    assert messages[0][0] >= 1  # the welcome message
    _run_alembic(db_url, "downgrade", "0009")
    rows = _query(db_url, text("SELECT name, subscribed FROM mailbox ORDER BY name"))
    assert rows == [("Drafts", 1), ("INBOX", 1), ("Sent", 1), ("Trash", 1)]
    async def unflag() -> None:
        engine = create_engine(db_url, pool_size=1)
        try:
            async with write_transaction(engine) as conn:
                await conn.execute(text(
                    "UPDATE mailbox SET subscribed = 0 WHERE name IN ('Drafts', 'Trash')"))
        finally:
            await engine.dispose()

    asyncio.run(unflag())
    _run_alembic(db_url, "upgrade", "head")
    assert _query(db_url, select(t.subscription.c.name).order_by(t.subscription.c.name)) == [
        ("INBOX",), ("Sent",)]
    # SQLite: the column went without copying the table (which would cascade to messages)
    assert _query(db_url, select(func.count()).select_from(t.message)) == messages
    _run_alembic(db_url, "downgrade", "0009")
    rows = _query(db_url, text("SELECT name, subscribed FROM mailbox ORDER BY name"))
    assert rows == [("Drafts", 0), ("INBOX", 1), ("Sent", 1), ("Trash", 0)]
    assert _query(db_url, select(func.count()).select_from(t.message)) == messages
    _run_alembic(db_url, "upgrade", "head")


def test_subscribe_refusals_and_the_limit(gateway: Gateway, db_url: str) -> None:
    """SUBSCRIBE of a name that is no mailbox, UNSUBSCRIBE of a name never subscribed: NO
    [NONEXISTENT]. At MAX_SUBSCRIPTIONS names SUBSCRIBE answers NO [LIMIT] (subscriptions
    outlive their mailboxes, so the table is bounded), CREATE still makes the mailbox without
    subscribing it, subscribing a name already subscribed stays OK, and one UNSUBSCRIBE makes
    room again."""
    from imap_store.store.mailboxes import MAX_SUBSCRIPTIONS

    conn = imap_login(gateway)
    assert conn.subscribe("Absent") == ("NO", [b"[NONEXISTENT] No such mailbox"])
    assert conn.unsubscribe("Absent") == ("NO", [b"[NONEXISTENT] No such mailbox"])

    async def fill() -> None:  # the names of mailboxes deleted long ago, up to the limit
        engine = create_engine(db_url, pool_size=1)
        try:
            async with write_transaction(engine) as db:
                patient = (await db.execute(
                    select(t.patient.c.id).where(t.patient.c.ins == INAYA))).scalar_one()
                held = (await db.execute(select(func.count()).select_from(t.subscription).where(
                    t.subscription.c.patient_id == patient))).scalar_one()
                await db.execute(t.subscription.insert(), [
                    {"patient_id": patient, "name": f"Ancien/{i}"}
                    for i in range(MAX_SUBSCRIPTIONS - held)])
        finally:
            await engine.dispose()

    asyncio.run(fill())
    assert conn.create("Nouveau")[0] == "OK"  # made, not subscribed
    assert _lsub(conn, "Nouveau") == []
    assert conn.subscribe("Nouveau") == ("NO", [b"[LIMIT] Too many subscriptions"])
    assert conn.subscribe("INBOX")[0] == "OK"  # already subscribed: nothing to add
    assert conn.unsubscribe("Ancien/0")[0] == "OK"
    assert conn.subscribe("Nouveau")[0] == "OK"
    assert _lsub(conn, "Nouveau") == [b'() "/" "Nouveau"']
    conn.logout()
