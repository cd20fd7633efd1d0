"""The protocol slips of issue 13, each replayed exactly against the real ``serve`` process over
real sockets (implicit TLS), once line by line and once byte at a time (``mode``), on SQLite and
PostgreSQL: keywords announced before use (RFC 3501 §7.2.6), LSUB with ``%`` (§6.3.9), SEARCH
on address headers (§6.4.4), EXAMINE and \\Recent (§2.3.2, §6.3.2), odd mailbox names and long
IDs (§5.1.3, RFC 2971), over-long lines inside IDLE and AUTHENTICATE, and \\Recent given to
exactly one session across two ``serve`` processes sharing one database."""

from __future__ import annotations

import base64
import re
import threading
from collections.abc import Iterable, Iterator

import pytest

from tests.conftest import INAYA, PATIENT_PASSWORD, running
from tests.gateway_proc import Gateway
from tests.helpers import Raw, second_gateway

FLAGS = rb"\Answered \Flagged \Deleted \Seen \Draft"
#: A name made of every printable character but the wildcards, quotes and parentheses: valid
#: ``astring`` syntax, but not modified UTF-7 (``&'+,-`` is no BASE64 run).
ODD_NAME = "!#$&'+,-.0123456789:;<=>?@^_`|[}"
#: Longer than the parser's line limit (imap_store.imap.parser.DEFAULT_MAX_LINE, 8192).
LONG = 9000


class Wire(Raw):
    """A raw IMAP client that sends either whole lines or one byte per TLS record."""

    def __init__(self, gw: Gateway, bytewise: bool) -> None:
        super().__init__(gw)
        self.bytewise = bytewise

    def send(self, data: bytes) -> None:
        if not self.bytewise:
            self.sock.sendall(data)
            return
        for index in range(len(data)):
            self.sock.sendall(data[index : index + 1])

    def login(self) -> None:
        assert self.command("a", f'LOGIN {INAYA} "{PATIENT_PASSWORD}"')[-1].startswith(b"a OK")

    def expect(self, tag: str, text: str | bytes, lines: list[bytes]) -> None:
        """Send ``tag text`` and check every line of the answer, in order."""
        data = text if isinstance(text, bytes) else text.encode()
        self.send(tag.encode() + b" " + data + b"\r\n")
        got = self.until(tag.encode() + b" ")
        assert got == lines, got

    def fill(self, mailbox: str, messages: Iterable[bytes]) -> None:
        """CREATE ``mailbox``, APPEND ``messages`` to it, SELECT it."""
        self.expect("c", f"CREATE {mailbox}", [b"c OK CREATE completed\r\n"])
        for message in messages:
            append(self, mailbox, message)
        assert self.command("s", f"SELECT {mailbox}")[-1].startswith(b"s OK [READ-WRITE]")


@pytest.fixture(params=["lines", "bytes"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "bytes")


@pytest.fixture
def clients() -> Iterator[list[Wire]]:
    """The test's connections, closed at the end."""
    made: list[Wire] = []
    yield made
    for client in made:
        client.close()


def new_client(gw: Gateway, bytewise: bool, made: list[Wire]) -> Wire:
    client = Wire(gw, bytewise)
    made.append(client)
    client.login()
    return client


def append(client: Wire, mailbox: str, message: bytes, flags: str = "") -> None:
    flag_part = f" ({flags})" if flags else ""
    client.send(f"p APPEND {mailbox}{flag_part} {{{len(message)}+}}\r\n".encode()
                + message + b"\r\n")
    assert client.until(b"p ")[-1].startswith(b"p OK [APPENDUID"), mailbox


def announced(flags: bytes, read_only: bool = False) -> list[bytes]:
    """The two lines that announce a mailbox's ``flags`` (RFC 3501 §7.2.6, §7.1): FLAGS, then
    PERMANENTFLAGS with ``\\*`` (new keywords allowed), or empty when the mailbox is read-only."""
    permanent = (b"* OK [PERMANENTFLAGS ()] Read-only mailbox\r\n" if read_only
                 else b"* OK [PERMANENTFLAGS (" + flags + b" \\*)] Flags permitted\r\n")
    return [b"* FLAGS (" + flags + b")\r\n", permanent]


def told(client: Wire, tag: str, command: str, flags: bytes, *untagged: bytes,
         read_only: bool = False) -> None:
    """``command``'s answer is exactly: ``flags`` announced first, then the ``untagged`` lines,
    then its tagged OK."""
    verb = command.split()[0]
    client.expect(tag, command, [*announced(flags, read_only), *untagged,
                                 f"{tag} OK {verb} completed\r\n".encode()])


def select_lines(client: Wire, tag: str, command: str) -> list[bytes]:
    """A SELECT/EXAMINE answer without its UIDVALIDITY line (a timestamp)."""
    lines = client.command(tag, command)
    return [line for line in lines if b"[UIDVALIDITY " not in line]


def exists_and_recent(client: Wire, tag: str, command: str) -> tuple[int, int]:
    """The EXISTS and RECENT counts of a SELECT/EXAMINE answer, the two lines right after its
    FLAGS and PERMANENTFLAGS."""
    lines = select_lines(client, tag, command)[2:4]
    match = re.fullmatch(rb"\* (\d+) EXISTS\r\n\* (\d+) RECENT\r\n", b"".join(lines))
    assert match, lines
    return int(match[1]), int(match[2])


# --------------------------------------------------------------------------- keywords


def test_keywords_announced_to_every_session_before_any_fetch_shows_them(
    gateway: Gateway, bytewise: bool, clients: list[Wire],
) -> None:
    a, b, c = (new_client(gateway, bytewise, clients) for _ in range(3))
    assert select_lines(a, "s", "SELECT INBOX")[:3] == [
        *announced(FLAGS),
        b"* 1 EXISTS\r\n",
    ]
    b.command("s", "SELECT INBOX")
    c.command("s", "EXAMINE INBOX")
    with_hello = FLAGS + b" $hello"
    told(a, "t1", "STORE 1 +FLAGS ($hello)", with_hello,
         b"* 1 FETCH (FLAGS (\\Recent $hello))\r\n")
    told(b, "n1", "NOOP", with_hello, b"* 1 FETCH (UID 1 FLAGS ($hello))\r\n")
    told(c, "n1", "FETCH 1 (FLAGS)", with_hello,  # read-only: no permanent flags, still announced
         b"* 1 FETCH (FLAGS ($hello))\r\n",
         b"* 1 FETCH (UID 1 FLAGS ($hello))\r\n",  # a's change, reported after the command
         read_only=True)
    # a keyword literally named NIL is a keyword like any other (an atom, RFC 3501 §9)
    with_nil = with_hello + b" NIL"
    told(a, "t2", "STORE 1 +FLAGS (NIL)", with_nil, b"* 1 FETCH (FLAGS (\\Recent $hello NIL))\r\n")
    # b learns of NIL from its own FETCH, before the FETCH line that shows it
    told(b, "f2", "FETCH 1 (FLAGS)", with_nil,
         b"* 1 FETCH (FLAGS ($hello NIL))\r\n", b"* 1 FETCH (UID 1 FLAGS ($hello NIL))\r\n")
    # APPEND of a message with a new keyword, from a session that has INBOX selected
    d = new_client(gateway, bytewise, clients)
    d.command("s", "SELECT Drafts")
    append(d, "INBOX", b"Subject: mot-clef\r\n\r\ncorps\r\n", "$urgent")
    told(a, "n3", "NOOP", FLAGS + b" $hello $urgent NIL", b"* 2 EXISTS\r\n", b"* 2 RECENT\r\n")
    a.expect("f3", "FETCH 2 (FLAGS)", [b"* 2 FETCH (FLAGS (\\Recent $urgent))\r\n",
                                       b"f3 OK FETCH completed\r\n"])


# --------------------------------------------------------------------------- LSUB


def test_lsub_percent_gives_the_unsubscribed_parent_as_noselect(
    gateway: Gateway, bytewise: bool, clients: list[Wire],
) -> None:
    a = new_client(gateway, bytewise, clients)
    for name in ("dossier/2024/bilan", "dossier/autre", "dossier/suivi"):
        assert a.command("c", f"CREATE {name}")[-1] == b"c OK CREATE completed\r\n"
    a.command("s", "SUBSCRIBE dossier/2024/bilan")
    a.command("s", "SUBSCRIBE dossier/suivi")
    a.command("u", "UNSUBSCRIBE dossier/autre")
    a.play(r"""
        C: l1 LSUB "dossier/" "%"
        S: * LSUB (\Noselect) "/" "dossier/2024"
        S: * LSUB () "/" "dossier/suivi"
        S: l1 OK LSUB completed
        C: l2 LSUB "" "dossier/%/%"
        S: * LSUB () "/" "dossier/2024/bilan"
        S: l2 OK LSUB completed
        C: l3 LSUB "" "dossier/*"
        S: * LSUB () "/" "dossier/2024/bilan"
        S: * LSUB () "/" "dossier/suivi"
        S: l3 OK LSUB completed
        C: l4 LSUB "" "doss%"
        S: * LSUB (\Noselect) "/" "dossier"
        S: l4 OK LSUB completed
    """)
    a.expect("l5", 'LSUB "" "dossier"', [b"l5 OK LSUB completed\r\n"])  # no wildcard
    # RENAME leaves the subscription on the old name (RFC 9051 §6.3.6); once the client
    # moves it (and unsubscribes the rest), no stale match
    a.command("r", "RENAME dossier/2024/bilan archives/bilan")
    a.command("u", "UNSUBSCRIBE dossier/suivi")
    a.play(r"""
        C: l6 LSUB "dossier/" "%"
        S: * LSUB (\Noselect) "/" "dossier/2024"
        S: l6 OK LSUB completed
    """)
    a.command("s", "SUBSCRIBE archives/bilan")
    a.command("u", "UNSUBSCRIBE dossier/2024/bilan")
    a.play(r"""
        C: l7 LSUB "dossier/" "%"
        S: l7 OK LSUB completed
        C: l8 LSUB "" "arch%"
        S: * LSUB (\Noselect) "/" "archives"
        S: l8 OK LSUB completed
    """)


# --------------------------------------------------------------------------- SEARCH


ADDRESS_MESSAGES = [
    b"From: dr-from@cabinet.example\r\nTo: pat-to@cabinet.example\r\n"
    b"Cc: sec-cc@cabinet.example\r\nBcc: arch-bcc@cabinet.example\r\n\r\nun\r\n",
    b"From: Docteur Martin <dr-from@cabinet.example>\r\nTo: Patiente <pat-to@cabinet.example>\r\n"
    b"Cc: Secretariat <sec-cc@cabinet.example>\r\nBcc: Archives <arch-bcc@cabinet.example>\r\n"
    b"\r\ndeux\r\n",
    b"From: <dr-from (bureau)@ (site) cabinet.example>\r\nTo: <pat-to @cabinet.example>\r\n"
    b"Cc: <sec-cc@ cabinet.example>\r\nBcc: <arch-bcc (copie)@cabinet.example>\r\n\r\ntrois\r\n",
    b"From: dr-from@cabinet.example (Docteur Martin)\r\nTo: pat-to@cabinet.example (Patiente)\r\n"
    b"Cc: sec-cc@cabinet.example (Secretariat)\r\n"
    b"Bcc: arch-bcc@cabinet.example (Archives)\r\n\r\nquatre\r\n",
    b"From: DR-FROM@CABINET.EXAMPLE\r\nCc: equipe: sec-cc@cabinet.example, autre@cabinet.example;"
    b"\r\n\r\ncinq\r\n",
    b"From: =?utf-8?q?Docteur_=C3=89lise?= <autre@cabinet.example>\r\n"
    b"To: autre@cabinet.example\r\n\r\nsix\r\n",
]


def test_search_address_headers_match_address_and_display_name(
    gateway: Gateway, bytewise: bool, clients: list[Wire],
) -> None:
    a = new_client(gateway, bytewise, clients)
    a.fill("Adresses", ADDRESS_MESSAGES)
    for tag, criteria, found in (
        ("s1", "FROM dr-from@cabinet.example", b"1 2 3 4 5"),
        ("s2", "TO pat-to@cabinet.example", b"1 2 3 4"),
        ("s3", "CC sec-cc@cabinet.example", b"1 2 3 4 5"),
        ("s4", "BCC arch-bcc@cabinet.example", b"1 2 3 4"),
        ("s5", "FROM \"docteur martin\"", b"2 4"),
        ("s6", "TO PATIENTE", b"2 4"),
        ("s7", "FROM octeur", b"2 4 6"),
        ("s8", "CC equipe", b"5"),
        ("s9", "FROM r-fro", b"1 2 3 4 5"),
        ("s10", "OR FROM autre@cabinet.example TO autre@cabinet.example", b"6"),
        ("s11", "BCC sec-cc@cabinet.example", b""),
    ):
        answer = b"* SEARCH" + (b" " + found if found else b"") + b"\r\n"
        a.expect(tag, f"SEARCH {criteria}", [answer, f"{tag} OK SEARCH completed\r\n".encode()])
        a.expect("u" + tag, f"UID SEARCH {criteria}",
                 [answer, f"u{tag} OK UID SEARCH completed\r\n".encode()])
    utf8 = "élise".encode()
    a.send(b"s12 SEARCH CHARSET UTF-8 FROM {%d+}\r\n" % len(utf8) + utf8 + b"\r\n")
    assert a.until(b"s12 ") == [b"* SEARCH 6\r\n", b"s12 OK SEARCH completed\r\n"]


# --------------------------------------------------------------------------- \Recent


def test_examine_reports_recent_and_leaves_it_to_the_next_select(
    gateway: Gateway, bytewise: bool, clients: list[Wire],
) -> None:
    reader, first, second, writer = (new_client(gateway, bytewise, clients) for _ in range(4))
    assert exists_and_recent(reader, "e", "EXAMINE INBOX") == (1, 1)
    reader.expect("f", "FETCH 1 (FLAGS)", [b"* 1 FETCH (FLAGS (\\Recent))\r\n",
                                           b"f OK FETCH completed\r\n"])
    writer.expect("st", "STATUS INBOX (MESSAGES RECENT)",
                  [b'* STATUS "INBOX" (MESSAGES 1 RECENT 1)\r\n', b"st OK STATUS completed\r\n"])
    assert exists_and_recent(first, "s", "SELECT INBOX") == (1, 1)
    assert exists_and_recent(second, "s", "SELECT INBOX") == (1, 0)
    second.expect("f", "FETCH 1 (FLAGS)", [b"* 1 FETCH (FLAGS ())\r\n",
                                           b"f OK FETCH completed\r\n"])
    writer.expect("st", "STATUS INBOX (MESSAGES RECENT)",
                  [b'* STATUS "INBOX" (MESSAGES 1 RECENT 0)\r\n', b"st OK STATUS completed\r\n"])
    append(writer, "INBOX", b"Subject: nouveau\r\n\r\ncorps\r\n")
    # the read-only session sees the new message as recent without taking it away...
    reader.expect("n", "NOOP", [b"* 2 EXISTS\r\n", b"* 2 RECENT\r\n", b"n OK NOOP completed\r\n"])
    # ...from the first read-write session to be told, and only that one
    first.expect("n", "NOOP", [b"* 2 EXISTS\r\n", b"* 2 RECENT\r\n", b"n OK NOOP completed\r\n"])
    second.expect("n", "NOOP", [b"* 2 EXISTS\r\n", b"* 0 RECENT\r\n", b"n OK NOOP completed\r\n"])
    assert exists_and_recent(reader, "e2", "EXAMINE INBOX") == (2, 0)


def test_recent_in_exactly_one_session_across_two_serve_processes(
    gateway: Gateway, bytewise: bool, clients: list[Wire],
) -> None:
    other = second_gateway(gateway)
    for gw2 in running(other):
        assert isinstance(gw2, Gateway)
        sessions = [new_client(gateway, bytewise, clients), new_client(gw2, bytewise, clients),
                    new_client(gateway, bytewise, clients), new_client(gw2, bytewise, clients)]
        writer = new_client(gateway, False, clients)
        for session in sessions:
            session.command("s", "SELECT INBOX")
        total = 1
        for round_ in range(4):
            for n in range(3):
                append(writer, "INBOX", f"Subject: tour {round_} {n}\r\n\r\nx\r\n".encode())
            total += 3
            # every session asks at once: they race for the new messages
            threads = [threading.Thread(target=s.command, args=("n", "NOOP")) for s in sessions]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(30)
        owners: dict[int, int] = {}
        for index, session in enumerate(sessions):
            lines = session.command("f", "FETCH 1:* (UID FLAGS)")
            assert lines[-1] == b"f OK FETCH completed\r\n"
            fetched = [line for line in lines if line.startswith(b"* ") and b" FETCH " in line]
            assert len(fetched) == total, b"".join(lines).decode()
            for line in fetched:
                match = re.match(rb"\* \d+ FETCH \(UID (\d+) FLAGS \(([^)]*)\)\)", line)
                assert match, line
                if b"\\Recent" in match[2].split():
                    uid = int(match[1])
                    assert uid not in owners, (uid, owners[uid], index)
                    owners[uid] = index
        assert sorted(owners) == list(range(1, total + 1)), owners


# --------------------------------------------------------------------------- odd input


def test_odd_names_and_long_ids_cost_nothing_but_a_refusal(
    gateway: Gateway, bytewise: bool, clients: list[Wire],
) -> None:
    a = Wire(gateway, bytewise)
    clients.append(a)
    # before login: an ID far beyond RFC 2971's limits, on one line and as literals
    huge = " ".join(f'"k{i}" "{"v" * 200}"' for i in range(60))
    a.expect("i1", f"ID ({huge})", [b"i1 BAD Line too long\r\n"])
    a.expect("i2", 'ID ("name" "' + "v" * 2000 + '")', [b"i2 BAD ID parameter too long\r\n"])
    pairs = " ".join(f'"k{i}" "v"' for i in range(31))
    a.expect("i3", f"ID ({pairs})", [b"i3 BAD Too many ID parameters\r\n"])
    a.send(b'i4 ID ("name" {100000}\r\n')
    assert a.line().startswith(b"i4 NO [TOOBIG]")
    a.send(b'i5 ID ("name" {100000+}\r\n' + b"v" * 100000 + b")\r\n")
    assert a.line().startswith(b"i5 NO [TOOBIG]")
    a.expect("i6", 'ID ("name" "client")', [b'* ID ("name" "mssante-gateway")\r\n',
                                             b"i6 OK ID completed\r\n"])
    a.login()
    a.expect("s1", f"SELECT {ODD_NAME}",
             [b"s1 NO [NONEXISTENT] No such mailbox (invalid name)\r\n"])
    a.expect("s2", f'SELECT "{ODD_NAME}"',
             [b"s2 NO [NONEXISTENT] No such mailbox (invalid name)\r\n"])
    a.expect("s3", f"EXAMINE {ODD_NAME}",
             [b"s3 NO [NONEXISTENT] No such mailbox (invalid name)\r\n"])
    a.expect("s4", f"CREATE {ODD_NAME}", [b"s4 NO [CANNOT] No such mailbox (invalid name)\r\n"])
    a.expect("l1", f'LIST "" {ODD_NAME}%*', [b"l1 OK LIST completed\r\n"])
    a.expect("l2", f'LIST "" "{ODD_NAME}*"', [b"l2 OK LIST completed\r\n"])
    a.expect("l3", f'LSUB "" {ODD_NAME}%', [b"l3 OK LSUB completed\r\n"])
    a.expect("i7", f"ID ({huge})", [b"i7 BAD Line too long\r\n"])
    a.expect("n", "NOOP", [b"n OK NOOP completed\r\n"])
    a.expect("l4", 'LIST "" INBOX', [b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n',
                                      b"l4 OK LIST completed\r\n"])


def test_over_long_line_in_idle_or_authenticate_ends_that_command(
    gateway: Gateway, bytewise: bool, clients: list[Wire],
) -> None:
    a = Wire(gateway, bytewise)
    clients.append(a)
    a.send(b"x1 AUTHENTICATE PLAIN\r\n")
    assert a.line() == b"+ \r\n"
    a.send(b"A" * LONG + b"\r\n")
    assert a.line() == b"x1 BAD Line too long\r\n"
    a.expect("n0", "NOOP", [b"n0 OK NOOP completed\r\n"])
    a.send(b"x2 AUTHENTICATE PLAIN\r\n")
    assert a.line() == b"+ \r\n"
    token = base64.b64encode(f"\0{INAYA}\0{PATIENT_PASSWORD}".encode())
    a.send(token + b"\r\n")
    assert a.line().startswith(b"x2 OK [CAPABILITY ")
    a.command("s", "SELECT INBOX")
    # IDLE, an over-long line, then the client's DONE: the DONE is no command
    a.send(b"i1 IDLE\r\n")
    assert a.line() == b"+ idling\r\n"
    a.send(b"D" * LONG + b"\r\n")
    assert a.line() == b"i1 BAD Line too long\r\n"
    a.send(b"DONE\r\n")
    a.expect("n1", "NOOP", [b"n1 OK NOOP completed\r\n"])
    # the same, but the client sends a command instead of DONE: it is answered
    a.send(b"i2 IDLE\r\n")
    assert a.line() == b"+ idling\r\n"
    a.send(b"D" * LONG + b"\r\n")
    assert a.line() == b"i2 BAD Line too long\r\n"
    a.expect("n2", "NOOP", [b"n2 OK NOOP completed\r\n"])
    a.expect("n3", "NOOP", [b"n3 OK NOOP completed\r\n"])
    # a normal IDLE still works afterwards
    a.send(b"i3 IDLE\r\n")
    assert a.line() == b"+ idling\r\n"
    a.send(b"DONE\r\n")
    assert a.line() == b"i3 OK IDLE terminated\r\n"
