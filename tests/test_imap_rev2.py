"""IMAP4rev2 (RFC 9051) beside IMAP4rev1, against the real ``serve`` process over implicit TLS,
on SQLite and PostgreSQL, with imaplib and a raw client checking the wire line by line:
ENABLE IMAP4rev2 (no \\Recent, no RECENT, ESEARCH for SEARCH, UTF-8 mailbox names, LIST and
CLOSED at SELECT), BINARY (RFC 3516: FETCH BINARY[...], BINARY.SIZE, APPEND of a literal8),
SEARCHRES (RFC 5182: SEARCH RETURN (SAVE) and ``$``) and SASL-IR (RFC 4959). A session that
does not enable IMAP4rev2 keeps IMAP4rev1's answers."""

from __future__ import annotations

import base64
import imaplib
import re

from imap_store.imap.commands import (
    Append,
    Fetch,
    FetchAttr,
    InvalidCommand,
    Search,
    SearchSet,
    Section,
)
from imap_store.imap.parser import CommandParser
from tests.conftest import INAYA, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import Raw, imap_login

_LITERAL = re.compile(rb"~?\{(\d+)\}\r\n$")


class Wire(Raw):
    """:class:`Raw` reading literals whole: a response line is returned with its literals."""

    def response(self) -> bytes:
        out = b""
        while True:
            line = self.line()
            assert line, out
            out += line
            match = _LITERAL.search(line)
            if match is None:
                return out
            out += self.file.read(int(match[1]))

    def command(self, tag: str, text: str) -> list[bytes]:
        self.send(f"{tag} {text}\r\n".encode())
        return self.until_tagged(tag)

    def until_tagged(self, tag: str) -> list[bytes]:
        lines: list[bytes] = []
        while True:
            lines.append(self.response())
            if lines[-1].startswith(tag.encode() + b" "):
                return lines

    def literal_command(self, tag: str, head: str, data: bytes, *, binary: bool = False
                        ) -> list[bytes]:
        """A command ending with a synchronising literal (``~{n}`` if ``binary``)."""
        self.send(f"{tag} {head} {'~' if binary else ''}{{{len(data)}}}\r\n".encode())
        first = self.response()
        if not first.startswith(b"+"):
            return [first]
        self.send(data + b"\r\n")
        return self.until_tagged(tag)

    def login(self) -> None:
        assert self.command("l", f'LOGIN {INAYA} "{PATIENT_PASSWORD}"')[-1].startswith(b"l OK")


def imap(gw: Gateway) -> imaplib.IMAP4_SSL:
    conn = imap_login(gw)
    return conn


def message(n: int) -> bytes:
    return f"Subject: essai {n}\r\n\r\ncorps {n}\r\n".encode()


# --------------------------------------------------------------------------- rev2 mode


def test_rev2_mode_beside_rev1(gateway: Gateway) -> None:
    rev1 = Wire(gateway)
    rev2 = Wire(gateway)
    try:
        rev1.login()
        caps = rev1.command("c", "CAPABILITY")[0].split()
        for cap in (b"IMAP4rev1", b"IMAP4rev2", b"BINARY", b"SEARCHRES", b"ENABLE"):
            assert cap in caps, caps
        # SASL-IR (RFC 4959): the PLAIN response on the AUTHENTICATE line
        ir = base64.b64encode(f"\0{INAYA}\0{PATIENT_PASSWORD}".encode()).decode()
        assert rev2.command("a", f"AUTHENTICATE PLAIN {ir}")[-1].startswith(b"a OK")
        assert rev2.command("e", "ENABLE IMAP4rev2") == [
            b"* ENABLED IMAP4rev2\r\n", b"e OK ENABLE completed\r\n"]
        assert rev2.command("e2", "ENABLE IMAP4rev2") == [
            b"* ENABLED\r\n", b"e2 OK ENABLE completed\r\n"]

        # UTF-8 mailbox names in commands and responses; rev1 still sees modified UTF-7
        assert rev2.command("c1", 'CREATE "Écrits"')[-1].startswith(b"c1 OK")
        for n in (1, 2):
            data = message(n)
            assert rev2.literal_command(f"p{n}", 'APPEND "Écrits"', data)[-1].startswith(
                f"p{n} OK [APPENDUID ".encode())
        assert rev2.command("sb", 'SUBSCRIBE "Écrits"')[-1].startswith(b"sb OK")
        rev2.play(r"""
            C: li LIST "" "É%" RETURN (STATUS (MESSAGES))
            S: * LIST (\HasNoChildren) "/" "Écrits"
            S: * STATUS "Écrits" (MESSAGES 2)
            S: li OK LIST completed
            C: ls LSUB "" "É*"
            S: * LSUB () "/" "Écrits"
            S: ls OK LSUB completed
            C: st STATUS "Écrits" (MESSAGES)
            S: * STATUS "Écrits" (MESSAGES 2)
            S: st OK STATUS completed
        """)
        lines = rev2.command("s", 'SELECT "Écrits"')
        assert b"* 2 EXISTS\r\n" in lines
        assert '* LIST () "/" "Écrits"\r\n'.encode() in lines, lines
        assert not any(b"RECENT" in line or b"UNSEEN" in line for line in lines), lines
        assert lines[-1] == b"s OK [READ-WRITE] SELECT completed\r\n"
        # no \Recent in FETCH; SEARCH answered with ESEARCH (RFC 9051 §6.4.4)
        rev2.play("""
            C: f FETCH 1:* FLAGS
            S: * 1 FETCH (FLAGS ())
            S: * 2 FETCH (FLAGS ())
            S: f OK FETCH completed
            C: q SEARCH ALL
            S: * ESEARCH (TAG "q") ALL 1:2
            S: q OK SEARCH completed
            C: q2 UID SEARCH SUBJECT absent
            S: * ESEARCH (TAG "q2") UID
            S: q2 OK UID SEARCH completed
            C: q3 SEARCH RECENT
            S: * ESEARCH (TAG "q3")
            S: q3 OK SEARCH completed
        """)
        # SELECT while selected: OK [CLOSED] first (RFC 9051 §6.3.2)
        lines = rev2.command("x", "EXAMINE INBOX")
        assert lines[0] == b"* OK [CLOSED] Previous mailbox closed\r\n", lines
        assert b'* LIST () "/" "INBOX"\r\n' in lines
        assert lines[-1] == b"x OK [READ-ONLY] EXAMINE completed\r\n"
        lines = rev2.command("x2", "EXAMINE Sent")  # its special use as attribute
        assert b'* LIST (\\Sent) "/" "Sent"\r\n' in lines, lines
        # a modified UTF-7 name is only its characters under rev2: no such mailbox
        # (and the failed SELECT leaves no mailbox selected, RFC 9051 §6.3.2)
        assert rev2.command("n", "SELECT &AMk-crits") == [
            b"* OK [CLOSED] Previous mailbox closed\r\n",
            b"n NO [NONEXISTENT] No such mailbox\r\n"]

        # the rev1 session: modified UTF-7, RECENT and \Recent as before; rev2 claimed none
        lines = rev1.command("s", "SELECT &AMk-crits")
        assert b"* 2 RECENT\r\n" in lines and b"* OK [UNSEEN 1] First unseen\r\n" in lines
        assert not any(line.startswith(b"* LIST") for line in lines), lines
        assert rev1.command("f", "FETCH 1 FLAGS") == [
            b"* 1 FETCH (FLAGS (\\Recent))\r\n", b"f OK FETCH completed\r\n"]
        assert rev1.command("q", "SEARCH ALL") == [
            b"* SEARCH 1 2\r\n", b"q OK SEARCH completed\r\n"]
        assert rev1.command("st", 'STATUS "Écrits" (MESSAGES)')[-1].startswith(b"st BAD")
        assert rev1.command("li", 'LIST "" "&AMk-%"') == [
            b'* LIST (\\HasNoChildren) "/" "&AMk-crits"\r\n', b"li OK LIST completed\r\n"]
        # a new message reaches the rev2 session as EXISTS only, the rev1 session with RECENT
        assert b"CLOSED" not in rev2.command("s2", 'SELECT "Écrits"')[0]
        lines = rev1.literal_command("p3", "APPEND &AMk-crits", message(3))
        assert lines[:2] == [b"* 3 EXISTS\r\n", b"* 3 RECENT\r\n"], lines
        assert rev2.command("n2", "NOOP") == [b"* 3 EXISTS\r\n", b"n2 OK NOOP completed\r\n"]
        # ENABLE is refused with a mailbox selected, as for every capability (RFC 5161 §3.1)
        assert rev1.command("e", "ENABLE IMAP4rev2")[-1].startswith(b"e BAD")
    finally:
        rev1.close()
        rev2.close()


def test_rev2_with_imaplib(gateway: Gateway) -> None:
    conn = imap(gateway)
    assert b"IMAP4rev2" in conn.capability()[1][0].split()
    typ, data = conn._simple_command("ENABLE", "IMAP4rev2")
    assert typ == "OK" and conn.untagged_responses.pop("ENABLED") == [b"IMAP4rev2"]
    conn.create("Essai")
    for n in range(1, 4):
        assert conn.append("Essai", None, None, message(n))[0] == "OK"
    typ, data = conn.select("Essai")
    assert typ == "OK" and data == [b"3"]
    assert "RECENT" not in conn.untagged_responses
    typ, data = conn._simple_command("SEARCH", "SUBJECT", "essai")
    found = conn.untagged_responses.pop("ESEARCH")
    assert typ == "OK" and isinstance(found[0], bytes), found
    assert re.fullmatch(rb'\(TAG "\w+"\) ALL 1:3', found[0]), found
    conn.logout()


# --------------------------------------------------------------------------- BINARY

_B64 = bytes(range(256)) + b"\x00fin"
MULTIPART = (
    b"Subject: binaire\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
    b"--b\r\nContent-Type: text/plain\r\n\r\ntexte\r\n"
    b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    + base64.encodebytes(_B64).replace(b"\n", b"\r\n")
    + b"--b\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"caf=C3=A9 =3D soft=\r\nbreak\r\n"
    b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nzzz\r\n"
    b"--b--\r\n"
)


def test_binary_fetch_and_literal8_append(gateway: Gateway) -> None:
    wire = Wire(gateway)
    try:
        wire.login()
        assert wire.command("c", "CREATE Bin")[-1].startswith(b"c OK")
        assert wire.literal_command("p", "APPEND Bin", MULTIPART)[-1].startswith(b"p OK")
        wire.command("s", "SELECT Bin")
        lines = wire.command("f1", "FETCH 1 (BINARY.SIZE[2] BINARY.PEEK[2])")
        assert lines == [
            b"* 1 FETCH (BINARY.SIZE[2] %d BINARY[2] ~{%d}\r\n%s)\r\n"
            % (len(_B64), len(_B64), _B64),
            b"f1 OK FETCH completed\r\n"], lines
        # no NUL: a plain literal; the partial form; the whole message as it is
        assert wire.command("f2", "FETCH 1 (BINARY.PEEK[3] BINARY.PEEK[2]<1.3>)") == [
            b"* 1 FETCH (BINARY[3] {17}\r\ncaf\xc3\xa9 = softbreak"
            b" BINARY[2]<1> {3}\r\n\x01\x02\x03)\r\n",
            b"f2 OK FETCH completed\r\n"]
        assert wire.command("f3", "FETCH 1 BINARY.PEEK[]") == [
            b"* 1 FETCH (BINARY[] {%d}\r\n%s)\r\n" % (len(MULTIPART), MULTIPART),
            b"f3 OK FETCH completed\r\n"]
        assert wire.command("f4", "FETCH 1 FLAGS") == [
            b"* 1 FETCH (FLAGS (\\Recent))\r\n", b"f4 OK FETCH completed\r\n"]
        # an encoding we cannot undo: NO [UNKNOWN-CTE] (RFC 3516 §4.3)
        assert wire.command("f5", "FETCH 1 BINARY.PEEK[4]") == [
            b"f5 NO [UNKNOWN-CTE] Unknown Content-Transfer-Encoding\r\n"]
        assert wire.command("f6", "FETCH 1 BINARY[1.HEADER]")[-1].startswith(b"f6 BAD")
        # over several messages, the NO answers the whole command (RFC 3516 §4.2): every
        # message is checked before any FETCH line is sent or any \Seen set (Dovecot 2.3
        # sends the earlier messages' lines, then the NO)
        unknown = b"Subject: inconnu\r\nContent-Transfer-Encoding: x-unknown\r\n\r\nzzz\r\n"
        assert wire.literal_command("p2", "APPEND Bin", unknown)[-1].startswith(b"p2 OK")
        wire.command("n", "NOOP")
        for tag, items in (("m1", "BINARY[1]"), ("m2", "(FLAGS BINARY.SIZE[1])"),
                           ("m3", "(UID BINARY.PEEK[2] BINARY.PEEK[1])")):
            assert wire.command(tag, f"FETCH 1:2 {items}") == [
                tag.encode() + b" NO [UNKNOWN-CTE] Unknown Content-Transfer-Encoding\r\n"]
        assert wire.command("m4", "FETCH 1:2 FLAGS") == [
            b"* 1 FETCH (FLAGS (\\Recent))\r\n", b"* 2 FETCH (FLAGS (\\Recent))\r\n",
            b"m4 OK FETCH completed\r\n"]
        # the whole message is sent as it is, whatever its encoding
        assert wire.command("m5", "FETCH 2 BINARY.PEEK[]") == [
            b"* 2 FETCH (BINARY[] {%d}\r\n%s)\r\n" % (len(unknown), unknown),
            b"m5 OK FETCH completed\r\n"]
        assert wire.command("x", "STORE 2 +FLAGS.SILENT (\\Deleted)")[-1].startswith(b"x OK")
        assert wire.command("x2", "EXPUNGE")[-1].startswith(b"x2 OK")
        # BINARY without .PEEK sets \Seen
        lines = wire.command("f7", "FETCH 1 BINARY[1]")
        assert lines[0] == b"* 1 FETCH (BINARY[1] {5}\r\ntexte FLAGS (\\Seen \\Recent))\r\n"

        # APPEND: NUL refused in a plain literal, taken in a literal8 (RFC 3516 §4.4)
        nul = b"Subject: nul\r\n\r\navant\x00apres\r\n"
        assert wire.literal_command("a1", "APPEND Bin", nul) == [
            b"a1 NO [CANNOT] Message contains a NUL octet (RFC 3501 CHAR8)\r\n"]
        lines = wire.literal_command("a2", "APPEND Bin", nul, binary=True)
        assert lines[-1].startswith(b"a2 OK [APPENDUID ") and b"* 2 EXISTS\r\n" in lines, lines
        assert wire.command("f8", "FETCH 2 (RFC822.SIZE BINARY.PEEK[1])") == [
            b"* 2 FETCH (RFC822.SIZE %d BINARY[1] ~{13}\r\navant\x00apres\r\n)\r\n" % len(nul),
            b"f8 OK FETCH completed\r\n"]
    finally:
        wire.close()


def test_binary_with_imaplib(gateway: Gateway) -> None:
    conn = imap(gateway)
    conn.create("Bin")
    assert conn.append("Bin", None, None, MULTIPART)[0] == "OK"
    conn.select("Bin")
    typ, data = conn.fetch("1", "(BINARY.PEEK[2] BINARY.SIZE[3])")
    assert typ == "OK"
    assert isinstance(data[0], tuple) and data[0][1] == _B64, data
    assert b"BINARY.SIZE[3] 17" in data[1], data
    conn.logout()


# --------------------------------------------------------------------------- SEARCHRES


def test_searchres(gateway: Gateway) -> None:
    wire = Wire(gateway)
    try:
        wire.login()
        wire.command("c", "CREATE Res")
        for n in range(1, 7):
            wire.literal_command(f"p{n}", "APPEND Res" + (" (\\Seen)" if n % 2 else ""),
                                 message(n))
        wire.command("s", "SELECT Res")
        # $ before any SAVE: the empty set
        wire.play("""
            C: f0 FETCH $ FLAGS
            S: f0 OK FETCH completed
        """)
        # SAVE alone: no ESEARCH (RFC 5182 §2.1); $ in FETCH, UID FETCH, STORE, SEARCH
        wire.play("""
            C: q1 SEARCH RETURN (SAVE) UNSEEN
            S: q1 OK SEARCH completed
            C: f1 FETCH $ (UID)
            S: * 2 FETCH (UID 2)
            S: * 4 FETCH (UID 4)
            S: * 6 FETCH (UID 6)
            S: f1 OK FETCH completed
        """)
        assert wire.command("f2", "UID FETCH $ (UID)")[:-1] == [
            b"* 2 FETCH (UID 2)\r\n", b"* 4 FETCH (UID 4)\r\n", b"* 6 FETCH (UID 6)\r\n"]
        wire.play(r"""
            C: t STORE $ +FLAGS.SILENT (\Flagged)
            S: t OK STORE completed
            C: q2 SEARCH FLAGGED
            S: * SEARCH 2 4 6
            S: q2 OK SEARCH completed
            C: q3 SEARCH $ SUBJECT "essai 4"
            S: * SEARCH 4
            S: q3 OK SEARCH completed
            C: q4 SEARCH OR UID $ 1
            S: * SEARCH 1 2 4 6
            S: q4 OK SEARCH completed
        """)
        # SAVE with other options: ESEARCH as asked; with MIN and MAX only, those are saved
        wire.play("""
            C: q5 SEARCH RETURN (SAVE MIN MAX) SEEN
            S: * ESEARCH (TAG "q5") MIN 1 MAX 5
            S: q5 OK SEARCH completed
        """)
        assert wire.command("f3", "FETCH $ (UID)")[:-1] == [
            b"* 1 FETCH (UID 1)\r\n", b"* 5 FETCH (UID 5)\r\n"]
        assert wire.command("m", "COPY $ INBOX")[-1].startswith(b"m OK [COPYUID ")
        # an expunged message leaves $; UID EXPUNGE $
        wire.command("q6", "UID SEARCH RETURN (SAVE) UID 2:3")
        wire.command("d", "STORE 2:3 +FLAGS.SILENT (\\Deleted)")
        assert wire.command("x", "UID EXPUNGE $") == [
            b"* 2 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n", b"x OK UID EXPUNGE completed\r\n"]
        assert wire.command("f4", "FETCH $ (UID)") == [b"f4 OK FETCH completed\r\n"]
        # a new SELECT forgets the result
        wire.command("q7", "SEARCH RETURN (SAVE) ALL")
        wire.command("s2", "SELECT Res")
        assert wire.command("f5", "FETCH $ (UID)") == [b"f5 OK FETCH completed\r\n"]
        # RFC 5182 §2.1: a SEARCH ... SAVE that fails empties $, a syntax error too (the
        # parser's BAD reaches the session); a failed SEARCH without SAVE leaves $ alone
        saved = [b"* 1 FETCH (UID 1)\r\n", b"* 2 FETCH (UID 4)\r\n", b"* 3 FETCH (UID 5)\r\n",
                 b"* 4 FETCH (UID 6)\r\n", b"f6 OK FETCH completed\r\n"]
        assert wire.command("q8", "SEARCH RETURN (SAVE) ALL") == [b"q8 OK SEARCH completed\r\n"]
        assert wire.command("b1", "SEARCH RETURN (MIN) BADKEY")[-1].startswith(b"b1 BAD ")
        assert wire.command("f6", "FETCH $ (UID)") == saved
        assert wire.command("b2", "SEARCH RETURN (SAVE) BADKEY")[-1].startswith(b"b2 BAD ")
        assert wire.command("f7", "FETCH $ FLAGS") == [b"f7 OK FETCH completed\r\n"]
        wire.command("q9", "UID SEARCH RETURN (SAVE) ALL")
        assert wire.command("b3", "uid search return (min save) CHARSET KOI8-R ALL")[-1] \
            .startswith(b"b3 NO [BADCHARSET ")
        assert wire.command("f8", "FETCH $ FLAGS") == [b"f8 OK FETCH completed\r\n"]
    finally:
        wire.close()


# --------------------------------------------------------------------------- the grammar


def _parse(data: bytes, *, utf8: bool = False) -> object:
    parser = CommandParser()
    parser.utf8_names = utf8
    parser.feed(data)
    events = []
    while (event := parser.next_event()) is not None:
        events.append(event)
    return events[-1]


def test_parser_rev2_grammar() -> None:
    event = _parse(b"a APPEND INBOX ~{3+}\r\na\x00b\r\n")
    assert isinstance(event, Append) and event.binary and event.message == b"a\x00b"
    event = _parse(b"a APPEND INBOX {3+}\r\nabc\r\n")
    assert isinstance(event, Append) and not event.binary
    event = _parse(b"a UID FETCH $ (BINARY.PEEK[1.2]<0.10> BINARY.SIZE[] BINARY[3])\r\n")
    assert isinstance(event, Fetch) and event.seq_set.saved and event.uid
    assert event.attributes == (
        FetchAttr("BINARY", Section((1, 2)), (0, 10), peek=True),
        FetchAttr("BINARY.SIZE", Section(())), FetchAttr("BINARY", Section((3,))))
    assert [str(a) for a in event.attributes] == [
        "BINARY.PEEK[1.2]<0.10>", "BINARY.SIZE[]", "BINARY[3]"]
    for bad in (b"BINARY[1.TEXT]", b"BINARY.SIZE[1]<0.2>", b"BINARY.SIZE.PEEK[1]",
                b"BINARY", b"BINARY[0]"):
        assert _parse(b"a FETCH 1 " + bad + b"\r\n").__class__.__name__ == "InvalidCommand"
    event = _parse(b"a SEARCH RETURN (SAVE) $\r\n")
    assert isinstance(event, Search) and event.returns == ("SAVE",)
    assert isinstance(event.criteria, SearchSet) and event.criteria.seq_set.saved
    # a refused SEARCH says whether its RETURN named SAVE (RFC 5182 §2.1: $ is emptied)
    event = _parse(b"a uid search return (min save) BADKEY\r\n")
    assert isinstance(event, InvalidCommand) and event.saves and event.status == "BAD"
    for other in (b"a SEARCH RETURN (MIN) BADKEY", b"a SEARCH BADKEY SAVE",
                  b"a FETCH RETURN (SAVE) BADKEY"):
        event = _parse(other + b"\r\n")
        assert isinstance(event, InvalidCommand) and not event.saves, other
    # names: modified UTF-7 by default, UTF-8 once IMAP4rev2 is enabled
    event = _parse("a APPEND \"Écrits\" {1+}\r\nx\r\n".encode(), utf8=True)
    assert isinstance(event, Append) and event.mailbox == "Écrits"
    event = _parse(b"a APPEND &AMk-crits {1+}\r\nx\r\n")
    assert isinstance(event, Append) and event.mailbox == "Écrits"
    event = _parse(b"a APPEND &AMk-crits {1+}\r\nx\r\n", utf8=True)
    assert isinstance(event, Append) and event.mailbox == "&AMk-crits"
