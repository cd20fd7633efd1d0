"""Scripted IMAP sessions against the real session, parser, mail store and database (no
sockets): the state table, logins, literals, FETCH/STORE/SEARCH/COPY/MOVE/EXPUNGE, \\Recent,
change propagation between sessions (RFC 3501, UIDPLUS, MOVE, IDLE)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from imap_store.imap import listing
from imap_store.imap.parser import CommandParser
from imap_store.imap.responses import APPEND_LIMIT
from imap_store.imap.server import ChangeWatcher
from imap_store.imap.session import ALLOWED, Action, Session, State
from imap_store.store.directory import Store
from imap_store.store.mailboxes import SqlMailStores
from imap_store.store.writer import GroupWriter
from policy.authn import Authenticator
from policy.throttle import LoginThrottle
from tests.conftest import INAYA, MARTINE, PATIENT_PASSWORD, cli_in_process

MESSAGE = (
    b"From: Dr Marie <marie.chanteau@medecin.mssante.fr>\r\n"
    b"To: " + INAYA.encode() + b"@patient.mssante.fr\r\n"
    b"Subject: Resultats de votre bilan\r\n"
    b"Date: Mon, 02 Nov 2026 10:00:00 +0100\r\n"
    b"Message-ID: <bilan-1@medecin.mssante.fr>\r\n"
    b"\r\n"
    b"Votre glycemie est normale.\r\n"
)


class Collector:
    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, data: bytes) -> None:
        self.data += data


class Env:
    def __init__(self, store: Store, writer: GroupWriter) -> None:
        self.store = store
        self.writer = writer
        self.stores = SqlMailStores(store, writer.submit, writer.submit_sync)
        self.watcher = ChangeWatcher(self.stores)
        self.audits: list[tuple[str, str, str, dict[str, object]]] = []
        self.authenticator = Authenticator(store, LoginThrottle(5, 300), "patient.mssante.fr")

    def client(self, tls: bool = True) -> Client:
        return Client(self, tls)


class Client:
    def __init__(self, env: Env, tls: bool) -> None:
        self.out = Collector()
        self.parser = CommandParser(max_literal=0)
        self.closed = False

        async def login(user: str, password: str) -> Any:
            return await env.authenticator.login(user, password, "192.0.2.1", "imap",
                                                 patients_only=True)

        self.session = Session(
            self.out, tls=tls, starttls_available=not tls, login=login,
            mail_factory=env.stores.for_patient, watcher=env.watcher,
            audit=lambda *a: env.audits.append(a), conn_id="test",
        )

    async def send(self, data: bytes | str) -> bytes:
        if isinstance(data, str):
            data = data.encode()
        start = len(self.out.data)
        self.parser.feed(data)
        while (event := self.parser.next_event()) is not None:
            action = await self.session.handle(event)
            if action is Action.EXPECT_LINE:
                self.parser.expect_line()
            elif action is Action.REJECT_LITERAL:
                self.parser.reject_literal()
            elif action is Action.CLOSE:
                self.closed = True
            self.parser.max_literal = APPEND_LIMIT if self.session.authenticated else 0
        return bytes(self.out.data[start:])

    async def login(self, ins: str = INAYA) -> None:
        reply = await self.send(f'L1 LOGIN {ins} "{PATIENT_PASSWORD}"\r\n')
        assert b"L1 OK" in reply, reply

    async def select(self, name: str = "INBOX") -> bytes:
        reply = await self.send(f"S1 SELECT {name}\r\n")
        assert b"S1 OK [READ-WRITE]" in reply, reply
        return reply


@pytest.fixture
def patients_url(gw_dir: Path, db_url: str) -> str:
    cfg = gw_dir / "gateway.toml"
    for ins, name in ((INAYA, "Inaya Michel"), (MARTINE, "Martine Leguellec")):
        cli_in_process(cfg, "patient", "add", ins, "--name", name, "--notify-email",
                       "p@example.org", "--password-stdin", stdin=PATIENT_PASSWORD + "\n")
    return db_url


@pytest.fixture
async def env(patients_url: str) -> AsyncIterator[Env]:
    store = Store.from_url(patients_url)
    writer = GroupWriter(store)
    writer.start()
    try:
        yield Env(store, writer)
    finally:
        await writer.close()
        await store.close()


def test_state_table_covers_every_command() -> None:
    from imap_store.imap.commands import Command

    assert set(ALLOWED) == set(Command.__args__)  # type: ignore[attr-defined]
    assert all(State.LOGOUT not in states for states in ALLOWED.values())


def test_every_command_has_one_handler() -> None:
    """IMAP dispatch is a table: each command type has its handler, found by its type."""
    from imap_store.imap.commands import Command
    from imap_store.imap.session import HANDLERS

    assert set(HANDLERS) == set(Command.__args__) == set(ALLOWED)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [("*", "Archives/2024", True), ("%", "Archives/2024", False), ("Arch*", "Archives", True),
     ("inbox", "INBOX", True), ("Inbox", "Sent", False), ("%/%", "a/b", True),
     ("*a*a*a*a*a*a*a*b", "a" * 150, False), ("", "INBOX", False), ("S%t", "Sent", True)],
)
def test_list_wildcards(pattern: str, name: str, expected: bool) -> None:
    assert listing.matches(pattern, name) is expected


async def test_login_requires_tls_and_state_rules(env: Env) -> None:
    plain = env.client(tls=False)
    await plain.session.greet()
    greeting = bytes(plain.out.data)
    assert b"STARTTLS" in greeting and b"LOGINDISABLED" in greeting and b"AUTH=" not in greeting
    reply = await plain.send(f'a LOGIN {INAYA} "{PATIENT_PASSWORD}"\r\n')
    assert reply.startswith(b"a NO [PRIVACYREQUIRED]")
    assert (await plain.send("b AUTHENTICATE PLAIN\r\n")).startswith(b"b NO [PRIVACYREQUIRED]")
    assert (await plain.send("c SELECT INBOX\r\n")).startswith(b"c BAD")
    assert (await plain.send("d FETCH 1 FLAGS\r\n")).startswith(b"d BAD")
    assert (await plain.send("e STARTTLS\r\n")) == b"e OK Begin TLS negotiation now\r\n"

    client = env.client()
    await client.session.greet()
    assert b"AUTH=PLAIN" in client.out.data and b"LOGINDISABLED" not in client.out.data
    assert (await client.send("f FETCH 1 FLAGS\r\n")).startswith(b"f BAD")
    assert (await client.send(f'g LOGIN {INAYA} "wrong"\r\n')).startswith(
        b"g NO [AUTHENTICATIONFAILED]")
    await client.login()
    assert (await client.send("h LOGIN x y\r\n")).startswith(b"h BAD")
    assert (await client.send("i FETCH 1 FLAGS\r\n")).startswith(b"i BAD No mailbox selected")
    assert (await client.send("j STARTTLS\r\n")).startswith(b"j BAD")
    reply = await client.send("k LOGOUT\r\n")
    assert reply == b"* BYE Logging out\r\nk OK LOGOUT completed\r\n" and client.closed
    actions = [a[1] for a in env.audits]
    assert "imap.read" not in actions


async def test_authenticate_plain_with_and_without_initial_response(env: Env) -> None:
    import base64

    token = base64.b64encode(f"\0{INAYA}@patient.mssante.fr\0{PATIENT_PASSWORD}".encode())
    client = env.client()
    assert (await client.send(b"a AUTHENTICATE PLAIN\r\n")) == b"+ \r\n"
    assert (await client.send(token + b"\r\n")).startswith(b"a OK [CAPABILITY")
    other = env.client()
    assert (await other.send(b"b AUTHENTICATE PLAIN " + token + b"\r\n")).startswith(b"b OK")
    third = env.client()
    await third.send(b"c AUTHENTICATE PLAIN\r\n")
    assert (await third.send(b"*\r\n")).startswith(b"c BAD")
    assert (await third.send(b"d AUTHENTICATE CRAM-MD5\r\n")).startswith(b"d NO")


async def test_select_fetch_store_search(env: Env) -> None:
    client = env.client()
    await client.login()
    reply = await client.send(b"a APPEND INBOX (\\Flagged urgent) {%d}\r\n" % len(MESSAGE))
    assert reply == b"+ Ready for literal\r\n"
    reply = await client.send(MESSAGE + b"\r\n")
    assert re.match(rb"a OK \[APPENDUID \d+ 2\] APPEND completed", reply), reply
    selected = await client.select()
    assert b"* 2 EXISTS" in selected and b"* 2 RECENT" in selected
    assert b"* OK [UNSEEN 1]" in selected and b"urgent" in selected
    reply = await client.send("b FETCH 1:* (UID FLAGS RFC822.SIZE)\r\n")
    assert b"* 2 FETCH (UID 2 FLAGS (\\Flagged \\Recent urgent) RFC822.SIZE" in reply
    reply = await client.send(
        "c FETCH 2 (ENVELOPE BODY[HEADER.FIELDS (SUBJECT)] BODY.PEEK[TEXT]<0.6>)\r\n")
    assert b'"Resultats de votre bilan"' in reply
    assert (b"BODY[HEADER.FIELDS (SUBJECT)] {37}\r\nSubject: Resultats de votre bilan\r\n\r\n"
            in reply)
    assert b"BODY[TEXT]<0> {6}\r\nVotre " in reply
    assert b"FLAGS (\\Seen" in reply  # BODY[...] without PEEK sets \Seen
    reply = await client.send("d SEARCH UNSEEN\r\n")
    assert b"* SEARCH 1\r\n" in reply
    assert b"* SEARCH 2\r\n" in await client.send("e SEARCH FROM marie SUBJECT bilan\r\n")
    assert b"* SEARCH 2\r\n" in await client.send("f UID SEARCH BODY glycemie\r\n")
    assert b"* SEARCH 2\r\n" in await client.send("f2 SEARCH SENTON 2-Nov-2026 KEYWORD urgent\r\n")
    assert b"* SEARCH 1 2\r\n" in await client.send("f3 SEARCH OR RECENT LARGER 100000\r\n")
    assert b"* SEARCH\r\n" in await client.send("f4 SEARCH TEXT introuvable\r\n")
    reply = await client.send("g STORE 1:2 +FLAGS (\\Deleted)\r\n")
    assert b"* 1 FETCH (FLAGS (\\Deleted \\Recent))" in reply
    assert (await client.send("h STORE 1 -FLAGS.SILENT (\\Deleted)\r\n")) == \
        b"h OK STORE completed\r\n"
    reply = await client.send("i UID STORE 2 FLAGS (\\Seen)\r\n")
    assert b"* 2 FETCH (UID 2 FLAGS (\\Seen \\Recent))" in reply
    assert (await client.send("j FETCH 3 FLAGS\r\n")).startswith(b"j BAD")
    assert (await client.send("k UID FETCH 99:* FLAGS\r\n")).startswith(
        b"* 2 FETCH (UID 2")  # RFC 3501 §6.4.8: n:* includes the highest UID
    assert (await client.send("k2 UID FETCH 99:4294967295 FLAGS\r\n")) == \
        b"k2 OK UID FETCH completed\r\n"
    assert any(a[1] == "imap.read" for a in env.audits)
    assert all("bilan" not in repr(a) for a in env.audits)  # no content in the audit


async def test_recent_in_exactly_one_session_and_changes_propagate(env: Env) -> None:
    first, second = env.client(), env.client()
    await first.login()
    await second.login()
    assert b"* 1 RECENT" in await first.select()
    assert b"* 0 RECENT" in await second.select()
    reply = await first.send(b"a APPEND INBOX {%d+}\r\n" % len(MESSAGE) + MESSAGE + b"\r\n")
    assert b"* 2 EXISTS" in reply and b"* 2 RECENT" in reply  # RFC 3501 §6.3.11
    reply = await second.send("c NOOP\r\n")
    assert b"* 2 EXISTS" in reply and b"* 0 RECENT" in reply
    await first.send("d STORE 2 +FLAGS (\\Deleted)\r\n")
    reply = await second.send("e NOOP\r\n")
    assert b"* 2 FETCH (UID 2 FLAGS (\\Deleted))" in reply
    assert b"* 2 EXPUNGE" in await first.send("f EXPUNGE\r\n")
    # RFC 3501 §7.4.1: no EXPUNGE during FETCH, STORE or SEARCH; sent after the next command.
    reply = await second.send("g FETCH 1:* (FLAGS)\r\n")
    assert b"EXPUNGE" not in reply and b"g OK" in reply
    assert b"* 2 EXPUNGE" in await second.send("h NOOP\r\n")
    assert b"EXPUNGE" not in await first.send("i NOOP\r\n")  # its own expunge is not repeated


async def test_copy_move_uidplus_and_mailbox_management(env: Env) -> None:
    client = env.client()
    await client.login()
    await client.send(b"a APPEND Drafts (\\Draft) {%d+}\r\n" % len(MESSAGE) + MESSAGE + b"\r\n")
    await client.select("Drafts")
    reply = await client.send("b UID COPY 1 Sent\r\n")
    assert re.search(rb"b OK \[COPYUID \d+ 1 1\] UID COPY completed", reply), reply
    reply = await client.send("c MOVE 1 Trash\r\n")
    assert re.search(rb"\* OK \[COPYUID \d+ 1 1\]", reply) and b"* 1 EXPUNGE" in reply
    assert (await client.send("d COPY 1 Nowhere\r\n")).startswith(b"d BAD")
    await client.select("Trash")
    assert b"[TRYCREATE]" in await client.send("e COPY 1 Nowhere\r\n")
    assert b"f OK" in await client.send('f CREATE "Dossiers/Cardiologie"\r\n')
    assert b"ALREADYEXISTS" in await client.send('f2 CREATE "Dossiers/Cardiologie"\r\n')
    reply = await client.send('g LIST "" "*"\r\n')
    assert b'* LIST (\\Noselect \\HasChildren) "/" "Dossiers"' in reply
    assert b'* LIST (\\HasNoChildren \\Trash) "/" "Trash"' in reply
    assert b'"Dossiers/Cardiologie"' in await client.send('h LIST "Dossiers/" %\r\n')
    assert b"h1 NO [NONEXISTENT]" in await client.send('h1 RENAME "Dossiers" "Archives"\r\n')
    assert b"h2 OK" in await client.send(
        'h2 RENAME "Dossiers/Cardiologie" "Archives/Cardiologie"\r\n')
    assert b'"Archives/Cardiologie"' in await client.send('h3 LIST "" "Arch*"\r\n')
    reply = await client.send(
        'i STATUS "Archives/Cardiologie" (MESSAGES UNSEEN UIDNEXT APPENDLIMIT)\r\n')
    assert b'(MESSAGES 0 UNSEEN 0 UIDNEXT 1 APPENDLIMIT 26214400)' in reply
    assert b"j NO [CANNOT]" in await client.send("j DELETE Trash\r\n")
    assert b"k OK" in await client.send('k DELETE "Archives/Cardiologie"\r\n')
    assert b"l OK" in await client.send("l UNSUBSCRIBE Sent\r\n")
    reply = await client.send('m LSUB "" *\r\n')
    assert b'"Sent"' not in reply and b'"INBOX"' in reply
    reply = await client.send("n RENAME INBOX Ancien\r\n")
    assert b"n OK" in reply
    status = await client.send("o STATUS INBOX (MESSAGES)\r\no2 STATUS Ancien (MESSAGES)\r\n")
    assert b'"INBOX" (MESSAGES 0)' in status and b'"Ancien" (MESSAGES 1)' in status
    assert b'* NAMESPACE (("" "/")) NIL NIL' in await client.send("p NAMESPACE\r\n")
    # RFC 5161 §3.1: ENABLE only in the authenticated state, not with a mailbox selected
    assert (await client.send("q ENABLE CONDSTORE\r\n")) == (
        b"q BAD Only valid before a mailbox is selected\r\n")
    assert b'* ID ("name"' in await client.send("r ID NIL\r\n")
    assert (await client.send("s UNSELECT\r\n")) == b"s OK UNSELECT completed\r\n"


async def test_uid_expunge_close_and_examine(env: Env) -> None:
    client = env.client()
    await client.login()
    for _ in range(3):
        await client.send(b"a APPEND INBOX (\\Deleted) {%d+}\r\n" % len(MESSAGE) + MESSAGE
                          + b"\r\n")
    reply = await client.send("b EXAMINE INBOX\r\n")
    assert b"[READ-ONLY]" in reply and b"* 4 EXISTS" in reply
    assert b"c NO [READ-ONLY]" in await client.send("c STORE 1 +FLAGS (\\Seen)\r\n")
    assert b"c2 OK" in await client.send("c2 FETCH 1 BODY[]\r\n")
    assert b"\\Seen" not in await client.send("c3 FETCH 1 FLAGS\r\n")  # EXAMINE: no \Seen
    await client.select()
    reply = await client.send("d UID EXPUNGE 3\r\n")
    assert reply.startswith(b"* 3 EXPUNGE\r\n") and b"d OK" in reply
    reply = await client.send("e CLOSE\r\n")
    assert reply == b"e OK CLOSE completed\r\n"  # CLOSE expunges silently
    assert b"* 1 EXISTS" in await client.send("f SELECT INBOX\r\n")


async def test_literals_limits_and_bad_commands(env: Env) -> None:
    client = env.client()
    # APPEND before login: its literal is refused before it is read.
    reply = await client.send(b"a APPEND INBOX {10}\r\n")
    assert reply.startswith(b"a NO [TOOBIG]")
    await client.login()
    reply = await client.send(b"b APPEND INBOX {%d}\r\n" % (APPEND_LIMIT + 1))
    assert reply.startswith(b"b NO [TOOBIG]")
    assert (await client.send(b"c NOOP\r\n")) == b"c OK NOOP completed\r\n"
    reply = await client.send(b"x LOGIN {5}\r\n")
    assert reply == b"+ Ready for literal\r\n"  # the literal is read, then the command judged
    assert await client.send(b"abcde wrong\r\n") == b"x BAD Already logged in\r\n"
    fresh = env.client()
    for i in range(25):
        reply = await fresh.send(f"t{i} FOO\r\n")
        if fresh.closed:
            break
    assert fresh.closed and b"* BYE Too many invalid commands" in reply


async def test_isolation_in_the_session(env: Env) -> None:
    martine = env.client()
    await martine.login(MARTINE)
    assert b"a OK" in await martine.send('a CREATE "Secret Martine"\r\n')
    inaya = env.client()
    await inaya.login()
    for name in ('"Secret Martine"', MARTINE, f'"{MARTINE}/INBOX"', '"../INBOX"',
                 '"#shared/INBOX"', '"%"', '"*"', "1", "2", '"&AC4ALgAv-INBOX"'):
        reply = await inaya.send(f"b SELECT {name}\r\n")
        assert b"b OK" not in reply and re.search(rb"(?m)^b (NO|BAD) ", reply), (name, reply)
        reply = await inaya.send(f"c STATUS {name} (MESSAGES)\r\n")
        assert b"c OK" not in reply and re.search(rb"(?m)^c (NO|BAD) ", reply), (name, reply)
    reply = await inaya.send('d LIST "" "*"\r\n')
    assert b"Secret" not in reply and MARTINE.encode() not in reply
    for bad in ('"../x"', '"#shared"', '"a/../b"', '"~martine"'):
        assert b"e NO" in await inaya.send(f"e CREATE {bad}\r\n"), bad


async def _blob_count(env: Env) -> int:
    from sqlalchemy import func, select

    from imap_store.store import schema as t

    async with env.store.read() as conn:
        return int((await conn.execute(select(func.count(t.blob.c.id)))).scalar_one())


async def test_expunged_bodies_are_deleted_unless_still_referenced(env: Env) -> None:
    from datetime import UTC, datetime

    from sqlalchemy import insert, select

    from imap_store.store import schema as t

    client = env.client()
    await client.login()
    before = await _blob_count(env)
    for _ in range(4):
        await client.send(b"a APPEND INBOX {%d+}\r\n" % len(MESSAGE) + MESSAGE + b"\r\n")
    assert await _blob_count(env) == before + 4
    await client.select()  # the welcome message is 1, ours 2..5
    await client.send("b UID COPY 2 Sent\r\n")  # shares UID 2's body
    async with env.store.read() as conn:
        blob_3 = (await conn.execute(
            select(t.message.c.blob_id).join(t.mailbox, t.mailbox.c.id == t.message.c.mailbox_id)
            .where(t.mailbox.c.name == "INBOX", t.message.c.uid == 3)
        )).scalar_one()
    async with env.store.write() as conn:  # an outbound mail still needs UID 3's body
        now = datetime.now(UTC)
        await conn.execute(insert(t.outbound).values(
            kind="relay", sender="a@b.fr", recipient="c@d.fr", blob_id=blob_3, state="queued",
            attempts=0, next_attempt_at=now, created_at=now))
    await client.send("c UID STORE 2:5 +FLAGS.SILENT (\\Deleted)\r\n")
    reply = await client.send("d UID EXPUNGE 2:4\r\n")
    assert b"* 2 EXPUNGE\r\n* 2 EXPUNGE\r\n* 2 EXPUNGE\r\n" in reply
    assert await _blob_count(env) == before + 3  # UID 4's body only: 2 copied, 3 queued
    assert b"e OK" in await client.send("e MOVE 2 Trash\r\n")  # UID 5: the body stays
    assert await _blob_count(env) == before + 3
    assert b"f OK" in await client.send('f CREATE "Archives"\r\n')
    assert b"g OK" in await client.send("g SELECT Sent\r\n")
    assert b"h OK" in await client.send("h COPY 1 Archives\r\n")
    await client.send("i STORE 1 +FLAGS.SILENT (\\Deleted)\r\ni2 EXPUNGE\r\n")
    assert await _blob_count(env) == before + 3  # still in Archives
    await client.send("j SELECT INBOX\r\nk DELETE Archives\r\n")
    assert await _blob_count(env) == before + 2  # UID 2's body: no reference left


async def test_header_fetches_read_only_the_header(env: Env) -> None:
    samples = sorted((Path(__file__).parent / "samples").glob("*.eml"))
    client = env.client()
    await client.login()
    # Without NUL octets: APPEND refuses them (tests/test_security_nul_bytes.py).
    raws = [p.read_bytes().replace(b"\x00", b"") for p in samples] + [
        MESSAGE, b"Subject: sans corps\r\n", b"\r\nno header\r\n"]
    for raw in raws:
        await client.send(b"a APPEND INBOX {%d+}\r\n" % len(raw) + raw + b"\r\n")
    await client.select()
    mail = env.stores.for_patient(client.session.require_mail().patient_id)
    sel = client.session.selected
    assert sel is not None
    uids = list(sel.uids[1:])
    full = await mail.bodies(sel.mailbox_id, uids)
    heads = await mail.bodies(sel.mailbox_id, uids, header_only=True)
    assert [full[u] for u in uids] == raws
    assert sum(map(len, heads.values())) < sum(map(len, full.values())) / 2
    from imap_store.mime import get_section

    for uid in uids:
        raw, head = full[uid], heads[uid]
        assert raw.startswith(head)
        for kind, fields in (("HEADER", ()), ("HEADER.FIELDS", ("SUBJECT", "FROM")),
                             ("HEADER.FIELDS.NOT", ("RECEIVED",))):
            assert get_section(head, (), kind, fields) == get_section(raw, (), kind, fields)
    seq = len(sel.uids)
    command = (f"b FETCH 2:{seq} (RFC822.SIZE RFC822.HEADER BODY.PEEK[HEADER.FIELDS (SUBJECT)]"
               f" BODY.PEEK[HEADER]<0.10>)\r\n")
    reply = await client.send(command)
    for uid, raw in zip(uids, raws, strict=True):
        header = get_section(raw, (), "HEADER")
        expected = (b"* %d FETCH (RFC822.SIZE %d RFC822.HEADER {%d}\r\n" % (
            sel.seq_of(uid), len(raw), len(header)) + header)
        assert expected in reply, uid


@pytest.mark.parametrize("key", [
    "ALL", "UNSEEN", "SEEN", "DELETED", "UNDELETED", "FLAGGED", "ANSWERED", "DRAFT", "RECENT",
    "NEW", "OLD", "UID 2:4", "UID 3,5:*", "2:3", "4:*", "NOT 2", "OR 1 FLAGGED",
    "LARGER 300", "SMALLER 300", "NOT (DELETED UNSEEN)", "OR (UID 1) (SEEN DELETED)",
    "FROM marie", "SUBJECT bilan", "FROM MARIE SUBJECT Resultats UNDELETED", "TO inaya",
    'HEADER Message-ID "bilan-2"', 'HEADER "X-Odd+Name/" x', "CC nobody", 'FROM ""',
    "SENTON 2-Nov-2026", "SENTBEFORE 1-Jan-2000", "KEYWORD urgent", "UNKEYWORD urgent",
    "BODY glycemie", "TEXT bilan-3", "UID 1,3,5,7,9,11,13,15,17,19,21,23,25",
])
async def test_search_in_sql_agrees_with_python(env: Env, key: str) -> None:
    client = env.client()
    await client.login()
    for i, flags in enumerate(("\\Seen", "\\Flagged", "\\Deleted \\Seen", "urgent",
                               "\\Answered \\Draft", "")):
        raw = (MESSAGE.replace(b"bilan-1", b"bilan-%d" % i)
               + b"x" * (i * 100) + (b"\r\nFrom: Marie <marie@medecin.mssante.fr>\r\n"
                                     if i == 2 else b""))
        await client.send(b"a APPEND INBOX (%s) {%d+}\r\n" % (flags.encode(), len(raw)) + raw
                          + b"\r\n")
    await client.select()
    await client.send("b STORE 6 -FLAGS.SILENT (\\Seen)\r\n")
    found = await client.send(f"c SEARCH {key}\r\n")
    assert b"c OK" in found, found
    # an OR with a keyword cannot be SQL: the whole key is then decided in Python
    python = await client.send(f"d SEARCH OR ({key}) KEYWORD never-set\r\n")
    uid_found = await client.send(f"e UID SEARCH {key}\r\n")
    assert found.split(b"\r\n")[0] == python.split(b"\r\n")[0], (found, python)
    seqs = found.split(b"\r\n")[0].split()[2:]
    uids = uid_found.split(b"\r\n")[0].split()[2:]
    assert len(seqs) == len(uids)


async def test_search_and_header_fetch_survive_an_invalid_meta(env: Env) -> None:
    from sqlalchemy import update

    from imap_store.store import schema as t

    client = env.client()
    await client.login()
    await client.send(b"a APPEND INBOX {%d+}\r\n" % len(MESSAGE) + MESSAGE + b"\r\n")
    async with env.store.write() as conn:
        await conn.execute(update(t.message).where(t.message.c.uid == 2).values(meta="{oops"))
    await client.select()
    assert b"* SEARCH 1\r\n" in await client.send("b SEARCH FROM mssante SENTSINCE 1-Jan-2000\r\n")
    reply = await client.send("c FETCH 2 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
    assert b"{37}\r\nSubject: Resultats de votre bilan\r\n\r\n" in reply


async def test_search_fills_the_header_index_of_messages_stored_without_it(env: Env) -> None:
    from sqlalchemy import delete, func, select

    from imap_store.store import schema as t

    client = env.client()
    await client.login()
    for sender in (b"Marie", b"Jean", "Élodie Ÿ".encode()):
        raw = MESSAGE.replace(b"Dr Marie", b"Dr " + sender)
        await client.send(b"a APPEND INBOX {%d+}\r\n" % len(raw) + raw + b"\r\n")

    async def indexed() -> int:
        async with env.store.read() as conn:
            return int((await conn.execute(select(func.count()).select_from(t.blob_search)))
                       .scalar_one())

    # deliver() writes them: the 3 APPENDs and the welcome messages of both patients of
    # the database (conftest)
    assert await indexed() == 5
    async with env.store.write() as conn:  # as if delivered before: none at all
        await conn.execute(delete(t.blob_search))
    await client.select()
    assert b"* SEARCH 2\r\n" in await client.send('b SEARCH FROM "dr marie"\r\n')
    assert await indexed() == 4
    assert b"* SEARCH 4\r\n" in await client.send('c SEARCH FROM "ÉLODIE ÿ"\r\n')
    assert b"* SEARCH 1 3 4\r\n" in await client.send('d SEARCH NOT FROM "dr marie"\r\n')
    assert b"* SEARCH 1\r\n" in await client.send("e SEARCH NOT SUBJECT bilan\r\n")
    assert b"* SEARCH\r\n" in await client.send("f SEARCH CC x\r\n")
    assert b"* SEARCH 1 2 3 4\r\n" in await client.send('g SEARCH OR CC x SUBJECT ""\r\n')
