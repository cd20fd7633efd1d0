"""ENABLE is valid only in the authenticated state (RFC 5161 §3.1, RFC 9051 §6.3.1): with a
mailbox selected it is refused with BAD and the session goes on; after UNSELECT it works again.
Against the real ``serve`` process, line by line and byte at a time, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from tests.gateway_proc import Gateway
from tests.test_imap_slips import Wire


@pytest.mark.parametrize("bytewise", [False, True], ids=["lines", "bytes"])
def test_enable_refused_in_selected_state(gateway: Gateway, bytewise: bool) -> None:
    client = Wire(gateway, bytewise)
    try:
        client.login()
        assert client.command("s", "SELECT INBOX")[-1].startswith(b"s OK [READ-WRITE]")
        client.expect("e1", "ENABLE CONDSTORE",
                      [b"e1 BAD Only valid before a mailbox is selected\r\n"])
        client.expect("n", "NOOP", [b"n OK NOOP completed\r\n"])
        client.expect("u", "UNSELECT", [b"u OK UNSELECT completed\r\n"])
        client.expect("e2", "ENABLE CONDSTORE",
                      [b"* ENABLED CONDSTORE\r\n", b"e2 OK ENABLE completed\r\n"])
    finally:
        client.close()
