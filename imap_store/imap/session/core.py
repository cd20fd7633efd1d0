"""The IMAP session (RFC 3501 §3, §6), sans-IO: it consumes the parser's events and writes
responses through an :class:`Output`; the asyncio edge (``server.py``) owns the socket, TLS,
timeouts and the change watcher. No asyncio here.

A command is checked against the state table (:func:`check_state`), then run by the one
handler :data:`HANDLERS` names for its type. Handlers live with their command family
(``auth``, ``mailboxes``, ``selected``, ``fetch``, ``search``, ``copy``): each is a function
of the session and the command that answers it, usually through :meth:`Session.complete`.

Other sessions' changes (EXISTS, EXPUNGE, FETCH FLAGS) are read from the store's MODSEQs when
the watcher says the mailbox moved, after commands and during IDLE. EXPUNGE is held back
during FETCH, STORE and SEARCH (RFC 3501 §7.4.1), and sent after any other command.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, get_args

from imap_store.imap import commands as c
from imap_store.imap import responses as r
from imap_store.imap.parser import Event, LineTooLong, LiteralTooLarge, NeedContinuation, RawLine
from imap_store.imap.session import auth, copy, fetch, mailboxes, search, selected, sort
from imap_store.imap.session.state import (
    ALLOWED,
    AUTH_STATES,
    Action,
    AuditFn,
    LoginFn,
    Output,
    Selected,
    State,
    Watcher,
    check_state,
)
from imap_store.store.mailboxes import MailStore, MailStoreError

log = logging.getLogger(__name__)

#: BAD answers tolerated on one connection before it is closed (pymap's bad_command_limit).
BAD_COMMAND_LIMIT = 20
#: Output is written to the socket once this much is pending (and at the end of a command).
FLUSH_SIZE = 64 * 1024


class Session:
    """One client connection's IMAP state; see the module docstring."""

    __slots__ = (
        "_bad", "_buf", "_replay", "address", "audit", "condstore", "conn_id", "idle_tag",
        "listener", "login_fn", "mail", "mail_factory", "out", "qresync", "rev2", "sasl_tag",
        "selected", "starttls_available", "state", "stray_done", "tls", "wake", "watcher",
    )

    def __init__(
        self, out: Output, *, tls: bool, starttls_available: bool, login: LoginFn,
        mail_factory: Callable[[int], MailStore], watcher: Watcher, audit: AuditFn,
        conn_id: str = "-",
    ) -> None:
        self.out = out
        self.tls = tls
        self.starttls_available = starttls_available
        self.login_fn = login
        self.mail_factory = mail_factory
        self.watcher = watcher
        self.audit = audit
        self.conn_id = conn_id
        self.state = State.NOT_AUTHENTICATED
        self.address = ""
        self.mail: MailStore | None = None
        self.selected: Selected | None = None
        self.wake: Callable[[], None] | None = None  # set by the edge while idling
        self.sasl_tag: str | None = None  # AUTHENTICATE waiting for its response line
        self.idle_tag: str | None = None  # IDLE waiting for DONE
        # IDLE was ended by an over-long line: the client's DONE may still come, and is not
        # a command (a line that is not DONE is replayed as one).
        self.stray_done = False
        self._replay = b""
        # RFC 7162: CONDSTORE enabled (ENABLE, or a CONDSTORE-enabling command), QRESYNC
        # enabled (ENABLE QRESYNC only; it implies CONDSTORE)
        self.condstore = False
        self.qresync = False
        # RFC 9051: IMAP4rev2 enabled (ENABLE IMAP4rev2): no \Recent, ESEARCH for SEARCH,
        # mailbox names in UTF-8; a session that never enables it stays IMAP4rev1.
        self.rev2 = False
        self.listener = self._on_change  # given to the watcher for the selected mailbox
        self._buf = bytearray()
        self._bad = 0

    # --- output -------------------------------------------------------------------------

    async def emit(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= FLUSH_SIZE:
            await self.flush()

    async def flush(self) -> None:
        if self._buf:
            data = bytes(self._buf)
            self._buf.clear()
            await self.out.write(data)

    async def greet(self) -> None:
        caps = self.capabilities()
        await self.emit(b"* OK [CAPABILITY " + caps + b"] " + r.GREETING.text.encode() + b"\r\n")
        await self.flush()

    @property
    def authenticated(self) -> bool:
        return self.state in AUTH_STATES

    @property
    def idling(self) -> bool:
        return self.idle_tag is not None

    def capabilities(self) -> bytes:
        return r.capabilities(tls=self.tls, starttls=self.starttls_available,
                              authenticated=self.authenticated)

    def quote(self, name: str) -> bytes:
        """A mailbox name as this session writes it: UTF-8 under IMAP4rev2, else modified
        UTF-7 (RFC 9051 §5.1, RFC 3501 §5.1.3)."""
        return r.quote(name, self.rev2)

    def _on_change(self) -> None:
        if self.wake is not None:
            self.wake()

    # --- events -------------------------------------------------------------------------

    async def handle(self, event: Event) -> Action:
        """Handle one parser event; responses are flushed before returning."""
        try:
            action = await self._handle(event)
        finally:
            await self.flush()
        return action

    async def bad_reply(self, tag: str | None, reply: r.Reply) -> Action:
        """A BAD (or NO) that counts towards :data:`BAD_COMMAND_LIMIT`."""
        await self.emit(reply.tagged(tag))
        self._bad += 1
        if self._bad >= BAD_COMMAND_LIMIT:
            await self.emit(r.BYE_TOO_MANY_BAD.untagged())
            self.close_quietly()
            return Action.CLOSE
        return Action.NONE

    async def _handle(self, event: Event) -> Action:
        if isinstance(event, RawLine):
            return await self._raw_line(event.line)
        self.stray_done = False
        if isinstance(event, NeedContinuation):
            if event.command == "APPEND" and not self.authenticated:
                await self.emit(r.BAD_STATE_AUTH.tagged(event.tag))
                return Action.REJECT_LITERAL
            await self.emit(b"+ Ready for literal\r\n")
            return Action.NONE
        if isinstance(event, LiteralTooLarge):
            return await self.bad_reply(event.tag, r.NO_TOOBIG)
        if isinstance(event, LineTooLong):
            if event.tag is None and (self.sasl_tag or self.idle_tag):
                return await self._continuation_too_long()
            return await self.bad_reply(event.tag, r.BAD_LINE_TOO_LONG)
        if isinstance(event, c.InvalidCommand):
            if event.saves and self.selected is not None:
                self.selected.saved = []  # RFC 5182 §2.1: a failed SEARCH ... SAVE empties $
            reply = r.Reply(event.status, event.text, event.code)
            if event.status == "NO":
                await self.emit(reply.tagged(event.tag))
                return Action.NONE
            return await self.bad_reply(event.tag, reply)
        refusal = check_state(self.state, event)
        if refusal is not None:
            return await self.bad_reply(event.tag, refusal)
        try:
            return await HANDLERS[type(event)](self, event)
        except MailStoreError as exc:
            await self.emit(r.Reply("NO", exc.text, exc.code).tagged(event.tag))
            return Action.NONE

    async def _continuation_too_long(self) -> Action:
        """An over-long line where AUTHENTICATE or IDLE waited for one: the command ends with
        its tagged BAD (RFC 3501 §7.1.3), not an untagged one that leaves it hanging."""
        if self.sasl_tag is not None:
            tag, self.sasl_tag = self.sasl_tag, None
            return await self.bad_reply(tag, r.BAD_LINE_TOO_LONG)
        idle_tag, self.idle_tag = self.idle_tag, None
        action = await self.bad_reply(idle_tag, r.BAD_LINE_TOO_LONG)
        if action is Action.CLOSE:
            return action
        self.stray_done = True
        return Action.EXPECT_LINE

    def take_replay(self) -> bytes:
        """The line of :attr:`Action.REPLAY`, to be read again as a command."""
        line, self._replay = self._replay, b""
        return line

    async def _raw_line(self, line: bytes) -> Action:
        """A line read after :attr:`Action.EXPECT_LINE`: a SASL response or IDLE's DONE."""
        if self.stray_done:
            self.stray_done = False
            if line.strip().upper() == b"DONE":
                return Action.NONE  # the DONE of the IDLE already answered
            self._replay = line
            return Action.REPLAY
        if self.sasl_tag is not None:
            tag, self.sasl_tag = self.sasl_tag, None
            return await auth.sasl_response(self, tag, line)
        if self.idle_tag is not None:
            tag, self.idle_tag = self.idle_tag, None
            return await selected.idle_done(self, tag, line)
        return await self.bad_reply(None, r.Reply("BAD", "Unexpected line"))

    async def complete(self, cmd: c.Command, code: str | None = None, *,
                       allow_expunge: bool = True) -> Action:
        """The tagged OK of ``cmd`` (with a response ``code``), after other sessions' changes
        to the selected mailbox; their EXPUNGEs wait unless ``allow_expunge``."""
        if self.selected is not None:
            await selected.sync(self, allow_expunge=allow_expunge)
        code_text = f"[{code}] " if code else ""
        await self.emit(f"{cmd.tag} OK {code_text}{cmd.name} completed\r\n".encode())
        return Action.NONE

    async def idle_update(self) -> None:
        """The watcher woke an idling session: send what changed (RFC 2177 §3)."""
        if self.idle_tag is not None and self.selected is not None:
            await selected.sync(self, allow_expunge=True)
            await self.flush()

    # --- state shared by the handlers ------------------------------------------------------

    def require_mail(self) -> MailStore:
        """The patient's mail store (the state table lets only logged-in sessions here)."""
        assert self.mail is not None
        return self.mail

    def require_selected(self) -> Selected:
        """The selected mailbox (the state table lets only the selected state here)."""
        assert self.selected is not None
        return self.selected

    def unselect(self) -> None:
        if self.selected is not None:
            self.watcher.unwatch(self.selected.mailbox_id, self.listener)
            self.selected = None
            self.state = State.AUTHENTICATED if self.mail is not None else self.state

    def close_quietly(self) -> None:
        """The connection ends: forget the watcher subscription."""
        self.unselect()
        self.state = State.LOGOUT

    def tls_started(self) -> None:
        self.tls = True

    def audit_patient(self, action: str, detail: dict[str, object]) -> None:
        """An audit record of the logged-in patient's access."""
        self.audit(f"patient {self.address}", action, self.address, detail)


# --------------------------------------------------------------------------- dispatch

#: A command handler: answers the command (tagged reply included) and tells the edge what next.
Handler = Callable[[Session, Any], Awaitable[Action]]
C = TypeVar("C", bound=c.Command)


def _on(kind: type[C], handler: Callable[[Session, C], Awaitable[Action]]
        ) -> tuple[type, Handler]:
    """One row of :data:`HANDLERS`: the handler must take ``kind`` (checked by mypy)."""
    return kind, handler


def _table(*rows: tuple[type, Handler]) -> dict[type, Handler]:
    """The dispatch table, refused at import unless every command type has exactly one
    handler and a row in the state table :data:`ALLOWED`."""
    table: dict[type, Handler] = {}
    for kind, handler in rows:
        if kind in table:
            raise TypeError(f"two handlers for {kind.__name__}")
        table[kind] = handler
    commands = set(get_args(c.Command))
    if table.keys() != commands or ALLOWED.keys() != commands:
        odd = commands.symmetric_difference(table) | commands.symmetric_difference(ALLOWED)
        names = sorted(k.__name__ for k in odd)
        raise TypeError(f"commands without exactly one handler or state row: {names}")
    return table


#: RFC 3501 §6: the handler of each command type.
HANDLERS: dict[type, Handler] = _table(
    # any state (§6.1) and not authenticated (§6.2), ENABLE (RFC 5161)
    _on(c.Capability, auth.capability), _on(c.Noop, auth.noop), _on(c.Logout, auth.logout),
    _on(c.Id, auth.id_), _on(c.StartTls, auth.starttls), _on(c.Login, auth.login),
    _on(c.Authenticate, auth.authenticate), _on(c.Enable, auth.enable),
    # authenticated (§6.3): mailboxes
    _on(c.Create, mailboxes.create), _on(c.Delete, mailboxes.delete),
    _on(c.Rename, mailboxes.rename), _on(c.Subscribe, mailboxes.subscribe),
    _on(c.Unsubscribe, mailboxes.unsubscribe), _on(c.List, mailboxes.list_),
    _on(c.Lsub, mailboxes.lsub), _on(c.Status, mailboxes.status), _on(c.Append, mailboxes.append),
    _on(c.Namespace, mailboxes.namespace),
    # selecting and the selected mailbox (§6.3.1, §6.4), IDLE (RFC 2177)
    _on(c.Select, selected.select), _on(c.Check, auth.noop), _on(c.Close, selected.close),
    _on(c.Unselect, selected.unselect), _on(c.Expunge, selected.expunge),
    _on(c.Idle, selected.idle),
    # messages (§6.4.4-6.4.8, RFC 6851)
    _on(c.Fetch, fetch.fetch), _on(c.Store, fetch.store), _on(c.Search, search.search),
    _on(c.Sort, sort.sort), _on(c.Thread, sort.thread),
    _on(c.Copy, copy.copy), _on(c.Move, copy.move),
)
