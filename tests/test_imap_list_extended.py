"""LIST-EXTENDED (RFC 5258), LIST-STATUS (RFC 5819) and STATUS SIZE / DELETED (RFC 8438,
RFC 9051 §6.3.11) against the real ``serve`` process over implicit TLS, on SQLite and
PostgreSQL: RFC 5258 §5's examples replayed on a hierarchy of the same shape, line by line
(whole lines and one byte per TLS record), then with imaplib, aioimaplib and curl."""

from __future__ import annotations

import asyncio
import re
import subprocess

from tests.conftest import INAYA, PATIENT_PASSWORD
from tests.gateway_proc import Gateway
from tests.helpers import aioimaplib_login, imap_login
from tests.test_imap_slips import Wire, append, bytewise, clients, new_client  # noqa: F401

#: RFC 5258 §5's hierarchy, adapted: ``Foo`` exists only as the parent of ``Foo/Bar`` and
#: ``Foo/Baz``; besides the patient's INBOX, Drafts, Sent and Trash.
_CREATED = ("Fruit", "Fruit/Apple", "Fruit/Banana", "Tofu", "Vegetable", "Vegetable/Broccoli",
            "Vegetable/Corn", "Foo/Bar", "Foo/Baz")
#: CREATE subscribes; these are then unsubscribed. Subscribed stay: INBOX, Sent,
#: Fruit/Banana, Vegetable, Vegetable/Broccoli, Foo/Baz.
_UNSUBSCRIBED = ("Drafts", "Trash", "Fruit", "Fruit/Apple", "Tofu", "Vegetable/Corn", "Foo/Bar")
_APPLES = [f"Subject: apple {n}\r\n\r\n{'x' * 10 * n}\r\n".encode() for n in (1, 2, 3)]
_APPLE_SIZE = sum(len(m) for m in _APPLES)


def _populate(client: Wire) -> None:
    for n, name in enumerate(_CREATED):
        client.expect(f"c{n}", f'CREATE "{name}"', [f"c{n} OK CREATE completed\r\n".encode()])
    for n, name in enumerate(_UNSUBSCRIBED):
        assert client.command(f"u{n}", f'UNSUBSCRIBE "{name}"')[-1].startswith(
            f"u{n} OK".encode())
    for message, flags in zip(_APPLES, ("\\Seen", "\\Deleted", ""), strict=True):
        append(client, '"Fruit/Apple"', message, flags)


def _listing(*lines: str) -> list[bytes]:
    return [line.encode() + b"\r\n" for line in lines]


def test_rfc5258_examples_on_the_wire(gateway: Gateway, bytewise: bool,  # noqa: F811
                                      clients: list[Wire]) -> None:  # noqa: F811
    client = new_client(gateway, bytewise, clients)
    _populate(client)
    cap = client.command("k", "CAPABILITY")[0]
    assert {b"LIST-EXTENDED", b"LIST-STATUS", b"STATUS=SIZE"} <= set(cap.split()), cap
    # A basic LIST: the implied parent Foo is \Noselect (RFC 3501 clients know no other)
    client.expect("l1", 'LIST "" "%"', _listing(
        r'* LIST (\HasNoChildren) "/" "INBOX"',
        r'* LIST (\HasNoChildren \Drafts) "/" "Drafts"',
        r'* LIST (\Noselect \HasChildren) "/" "Foo"',
        r'* LIST (\HasChildren) "/" "Fruit"',
        r'* LIST (\HasNoChildren \Sent) "/" "Sent"',
        r'* LIST (\HasNoChildren) "/" "Tofu"',
        r'* LIST (\HasNoChildren \Trash) "/" "Trash"',
        r'* LIST (\HasChildren) "/" "Vegetable"',
        "l1 OK LIST completed"))
    # The extended syntax (§5 example 3, "LIST () ... RETURN (CHILDREN)"): \NonExistent
    extended = _listing(
        r'* LIST (\HasNoChildren) "/" "INBOX"',
        r'* LIST (\HasNoChildren \Drafts) "/" "Drafts"',
        r'* LIST (\NonExistent \HasChildren) "/" "Foo"',
        r'* LIST (\HasChildren) "/" "Fruit"',
        r'* LIST (\HasNoChildren \Sent) "/" "Sent"',
        r'* LIST (\HasNoChildren) "/" "Tofu"',
        r'* LIST (\HasNoChildren \Trash) "/" "Trash"',
        r'* LIST (\HasChildren) "/" "Vegetable"')
    client.expect("l2", 'LIST () "" "%" RETURN (CHILDREN)',
                  extended + _listing("l2 OK LIST completed"))
    # §5 example 2: the subscribed names, \Subscribed on each
    client.expect("l3", 'LIST (SUBSCRIBED) "" "*"', _listing(
        r'* LIST (\HasNoChildren \Subscribed) "/" "INBOX"',
        r'* LIST (\HasNoChildren \Subscribed) "/" "Foo/Baz"',
        r'* LIST (\HasNoChildren \Subscribed) "/" "Fruit/Banana"',
        r'* LIST (\HasNoChildren \Sent \Subscribed) "/" "Sent"',
        r'* LIST (\HasChildren \Subscribed) "/" "Vegetable"',
        r'* LIST (\HasNoChildren \Subscribed) "/" "Vegetable/Broccoli"',
        "l3 OK LIST completed"))
    # §5 example 8 A: "%" under SUBSCRIBED does not climb to unsubscribed parents ...
    client.expect("l4", 'LIST (SUBSCRIBED) "" "%"', _listing(
        r'* LIST (\HasNoChildren \Subscribed) "/" "INBOX"',
        r'* LIST (\HasNoChildren \Sent \Subscribed) "/" "Sent"',
        r'* LIST (\HasChildren \Subscribed) "/" "Vegetable"',
        "l4 OK LIST completed"))
    # ... RECURSIVEMATCH does, with CHILDINFO (A, A1 and A2: unsubscribed, subscribed,
    # non-existent parent)
    recursive = _listing(
        r'* LIST (\HasNoChildren \Subscribed) "/" "INBOX"',
        r'* LIST (\NonExistent \HasChildren) "/" "Foo" ("CHILDINFO" ("SUBSCRIBED"))',
        r'* LIST (\HasChildren) "/" "Fruit" ("CHILDINFO" ("SUBSCRIBED"))',
        r'* LIST (\HasNoChildren \Sent \Subscribed) "/" "Sent"',
        r'* LIST (\HasChildren \Subscribed) "/" "Vegetable" ("CHILDINFO" ("SUBSCRIBED"))')
    client.expect("l5", 'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"',
                  recursive + _listing("l5 OK LIST completed"))
    # no CHILDINFO where the pattern reaches the subscribed descendants themselves
    lines = client.command("l6", 'LIST (RECURSIVEMATCH SUBSCRIBED) "" "*"')
    assert lines[-1] == b"l6 OK LIST completed\r\n" and len(lines) == 7, lines
    assert not any(b"CHILDINFO" in line for line in lines), lines
    # LSUB names what LIST (SUBSCRIBED RECURSIVEMATCH) names, its parents \Noselect
    client.expect("l7", 'LSUB "" "%"', _listing(
        r'* LSUB () "/" "INBOX"',
        r'* LSUB (\Noselect) "/" "Foo"',
        r'* LSUB (\Noselect) "/" "Fruit"',
        r'* LSUB () "/" "Sent"',
        r'* LSUB () "/" "Vegetable"',
        "l7 OK LSUB completed"))
    # RETURN (SUBSCRIBED), several patterns, REMOTE (no remote mailboxes here), SPECIAL-USE
    client.expect("l8", 'LIST "" ("INBOX" "Fruit/%" "tofu" "Tofu") RETURN (SUBSCRIBED)',
                  _listing(r'* LIST (\HasNoChildren \Subscribed) "/" "INBOX"',
                           r'* LIST (\HasNoChildren) "/" "Fruit/Apple"',
                           r'* LIST (\HasNoChildren \Subscribed) "/" "Fruit/Banana"',
                           r'* LIST (\HasNoChildren) "/" "Tofu"',
                           "l8 OK LIST completed"))
    client.expect("l9", 'LIST (REMOTE) "" "Veg*"', _listing(
        r'* LIST (\HasChildren) "/" "Vegetable"',
        r'* LIST (\HasNoChildren) "/" "Vegetable/Broccoli"',
        r'* LIST (\HasNoChildren) "/" "Vegetable/Corn"',
        "l9 OK LIST completed"))
    client.expect("l10", 'LIST (SPECIAL-USE) "" "*" RETURN (SPECIAL-USE)', _listing(
        r'* LIST (\HasNoChildren \Drafts) "/" "Drafts"',
        r'* LIST (\HasNoChildren \Sent) "/" "Sent"',
        r'* LIST (\HasNoChildren \Trash) "/" "Trash"',
        "l10 OK LIST completed"))
    # Bad syntax answers BAD and the session goes on (RFC 5258 §3.1, §3.2)
    for n, bad in enumerate((
            'LIST (RECURSIVEMATCH) "" "%"', 'LIST (REMOTE RECURSIVEMATCH) "" "%"',
            'LIST (BOGUS) "" "%"', 'LIST "" "%" RETURN (BOGUS)',
            'LIST "" "%" RETURN (STATUS (MESSAGES NOPE))', 'LIST "" "%" RETURN (STATUS ())',
            'LIST "" ("%" RETURN (CHILDREN)')):
        answer = client.command(f"b{n}", bad)
        assert len(answer) == 1 and answer[0].startswith(f"b{n} BAD ".encode()), answer
    client.expect("n", "NOOP", [b"n OK NOOP completed\r\n"])


def test_list_status_on_the_wire(gateway: Gateway, bytewise: bool,  # noqa: F811
                                 clients: list[Wire]) -> None:  # noqa: F811
    client = new_client(gateway, bytewise, clients)
    _populate(client)
    # RFC 5819 §2: a STATUS after each selectable mailbox's LIST line, none for Foo
    client.expect("s1", 'LIST "" ("Fruit*" "Foo*") RETURN (STATUS (MESSAGES UNSEEN DELETED SIZE))',
                  _listing(
        r'* LIST (\NonExistent \HasChildren) "/" "Foo"',
        r'* LIST (\HasNoChildren) "/" "Foo/Bar"',
        '* STATUS "Foo/Bar" (MESSAGES 0 UNSEEN 0 DELETED 0 SIZE 0)',
        r'* LIST (\HasNoChildren) "/" "Foo/Baz"',
        '* STATUS "Foo/Baz" (MESSAGES 0 UNSEEN 0 DELETED 0 SIZE 0)',
        r'* LIST (\HasChildren) "/" "Fruit"',
        '* STATUS "Fruit" (MESSAGES 0 UNSEEN 0 DELETED 0 SIZE 0)',
        r'* LIST (\HasNoChildren) "/" "Fruit/Apple"',
        f'* STATUS "Fruit/Apple" (MESSAGES 3 UNSEEN 2 DELETED 1 SIZE {_APPLE_SIZE})',
        r'* LIST (\HasNoChildren) "/" "Fruit/Banana"',
        '* STATUS "Fruit/Banana" (MESSAGES 0 UNSEEN 0 DELETED 0 SIZE 0)',
        "s1 OK LIST completed"))
    # the same counts as STATUS; RECENT, UIDNEXT, UIDVALIDITY and HIGHESTMODSEQ too
    items = "SIZE DELETED MESSAGES RECENT UIDNEXT UIDVALIDITY HIGHESTMODSEQ UNSEEN"
    status = client.command("s2", f'STATUS "Fruit/Apple" ({items})')
    assert status[-1] == b"s2 OK STATUS completed\r\n", status
    assert re.fullmatch(
        rb'\* STATUS "Fruit/Apple" \(SIZE %d DELETED 1 MESSAGES 3 RECENT \d UIDNEXT 4 '
        rb'UIDVALIDITY \d+ HIGHESTMODSEQ \d+ UNSEEN 2\)\r\n' % _APPLE_SIZE, status[0]), status
    listed = client.command("s3", f'LIST (SUBSCRIBED) "" "Fruit/%" RETURN (STATUS ({items}))')
    assert listed == [b'* LIST (\\HasNoChildren \\Subscribed) "/" "Fruit/Banana"\r\n',
                      listed[1], b"s3 OK LIST completed\r\n"], listed
    assert listed[1].startswith(b'* STATUS "Fruit/Banana" (SIZE 0 DELETED 0 MESSAGES 0 '), listed
    listed = client.command("s4", f'LIST "" "Fruit/Apple" RETURN (STATUS ({items}))')
    assert listed[1] == status[0], (listed, status)
    # not a basic LIST's habit: no STATUS without the return option
    client.expect("s5", 'LIST "" "Tofu"',
                  _listing(r'* LIST (\HasNoChildren) "/" "Tofu"', "s5 OK LIST completed"))


def test_list_extended_with_imaplib_aioimaplib_and_curl(gateway: Gateway) -> None:
    conn = imap_login(gateway)
    for name in ("Projets", "Projets/Alpha", "Projets/Beta"):
        assert conn.create(name)[0] == "OK"
    assert conn.unsubscribe("Projets")[0] == "OK"
    assert conn.unsubscribe("Projets/Alpha")[0] == "OK"
    message = b"Subject: beta\r\n\r\nun message\r\n"
    assert conn.append("Projets/Beta", "(\\Deleted)", None, message)[0] == "OK"
    typ, data = conn._simple_command("LIST", "(SUBSCRIBED RECURSIVEMATCH)", '""', '"Proj%"',
                                     "RETURN", "(CHILDREN STATUS (MESSAGES DELETED SIZE))")
    assert typ == "OK", data
    assert conn.untagged_responses.pop("LIST") == [
        b'(\\HasChildren) "/" "Projets" ("CHILDINFO" ("SUBSCRIBED"))']
    # listed for its CHILDINFO, but a selectable mailbox: it has its STATUS
    assert conn.untagged_responses.pop("STATUS") == [b'"Projets" (MESSAGES 0 DELETED 0 SIZE 0)']
    typ, data = conn._simple_command("LIST", '""', '"Projets/*"', "RETURN",
                                     "(STATUS (MESSAGES DELETED SIZE))")
    assert typ == "OK", data
    assert conn.untagged_responses.pop("STATUS") == [
        b'"Projets/Alpha" (MESSAGES 0 DELETED 0 SIZE 0)',
        b'"Projets/Beta" (MESSAGES 1 DELETED 1 SIZE %d)' % len(message)]
    assert conn.status("Projets/Beta", "(SIZE DELETED)") == (
        "OK", [b'"Projets/Beta" (SIZE %d DELETED 1)' % len(message)])
    conn.logout()

    async def with_aioimaplib() -> tuple[list[bytes], list[bytes]]:
        async with aioimaplib_login(gateway, INAYA) as client:
            listed = await client.list('(SUBSCRIBED) ""',
                                       '"Projets/%" RETURN (STATUS (MESSAGES))')
            status = await client.status('"Projets/Beta"', "(SIZE DELETED)")
        assert listed.result == "OK" and status.result == "OK", (listed, status)
        return [bytes(x) for x in listed.lines], [bytes(x) for x in status.lines]

    # aioimaplib keeps the LIST lines of a LIST (the STATUS ones are checked above and below)
    listed, status = asyncio.run(with_aioimaplib())
    assert listed == [b'(\\HasNoChildren \\Subscribed) "/" "Projets/Beta"', b"LIST completed"]
    assert status[0] == b'"Projets/Beta" (SIZE %d DELETED 1)' % len(message), status

    def curl(command: str) -> bytes:
        done = subprocess.run(
            ["curl", "-sS", "--cacert", str(gateway.ca), "-u", f"{INAYA}:{PATIENT_PASSWORD}",
             "-X", command, f"imaps://127.0.0.1:{gateway.ports['imaps']}/"],
            capture_output=True, timeout=30, check=True)
        return done.stdout

    # curl prints the untagged responses named like its command: LIST-STATUS's LIST lines
    # (the STATUS lines are on the wire, as above), then STATUS=SIZE
    assert curl('LIST "" "Projets/*" RETURN (STATUS (MESSAGES SIZE))') == (
        b'* LIST (\\HasNoChildren) "/" "Projets/Alpha"\r\n'
        b'* LIST (\\HasNoChildren) "/" "Projets/Beta"\r\n')
    assert curl('STATUS "Projets/Beta" (MESSAGES SIZE DELETED)') == (
        b'* STATUS "Projets/Beta" (MESSAGES 1 SIZE %d DELETED 1)\r\n' % len(message))


def test_many_patterns_merged_or_refused(gateway: Gateway) -> None:
    """A pattern given many times is matched once; more than MAX_PATTERNS distinct patterns
    get ``NO [LIMIT]`` (each pattern is matched against each name on the event loop: 6,000
    of them in one command held other sessions over 100 ms, tests/test_security_event_loop)."""
    from imap_store.imap.listing import MAX_PATTERNS

    conn = imap_login(gateway)
    try:
        many = " ".join(['"INBOX"'] * 500)
        typ, data = conn._simple_command("LIST", '""', f"({many})")  # type: ignore[attr-defined]
        assert typ == "OK" and conn.untagged_responses.pop("LIST") == [
            b'(\\HasNoChildren) "/" "INBOX"'], data
        distinct = " ".join(f'"x{n}"' for n in range(MAX_PATTERNS))
        typ, data = conn._simple_command("LIST", '""', f"({distinct})")  # type: ignore[attr-defined]
        assert typ == "OK", data
        typ, data = conn._simple_command(  # type: ignore[attr-defined]
            "LIST", '""', f'({distinct} "INBOX")')
        assert typ == "NO" and b"[LIMIT]" in data[-1], data
        assert conn.noop()[0] == "OK"
    finally:
        conn.logout()
