"""The IMAP session state machine (RFC 3501 §3, §6), sans-IO: it consumes the parser's events
and writes responses through an :class:`Output`; the asyncio edge (``server.py``) owns the
socket, TLS, timeouts and the change watcher. No asyncio here.

States and what is allowed where are data (:data:`ALLOWED`), checked in one function
(:func:`check_state`). The selected mailbox is kept small: an ``array('L')`` of UIDs in
sequence order, the MODSEQ last seen, and the UID ranges this session announced as \\Recent.

Other sessions' changes (EXISTS, EXPUNGE, FETCH FLAGS) are read from the store's MODSEQs when
the watcher says the mailbox moved, after commands and during IDLE. EXPUNGE is held back
during FETCH, STORE and SEARCH (RFC 3501 §7.4.1), and sent after any other command.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import logging
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Protocol

from sqlalchemy import and_, false, not_, or_, true

from imap_store.imap import listing
from imap_store.imap import responses as r
from imap_store.imap.commands import (
    Append,
    Authenticate,
    Capability,
    Check,
    Close,
    Command,
    Copy,
    Create,
    DateRelation,
    Delete,
    Enable,
    Expunge,
    Fetch,
    FetchAttr,
    Id,
    Idle,
    InvalidCommand,
    List,
    Login,
    Logout,
    Lsub,
    Move,
    Namespace,
    Noop,
    Rename,
    Search,
    SearchAll,
    SearchAnd,
    SearchBody,
    SearchFlag,
    SearchHeader,
    SearchInternalDate,
    SearchKey,
    SearchLarger,
    SearchNot,
    SearchOr,
    SearchSentDate,
    SearchSequence,
    SearchSmaller,
    SearchText,
    SearchUid,
    Select,
    SequenceSet,
    StartTls,
    Status,
    Store,
    Subscribe,
    Unselect,
    Unsubscribe,
)
from imap_store.imap.parser import Event, LineTooLong, LiteralTooLarge, NeedContinuation, RawLine
from imap_store.imap.wire import render_bodystructure, render_envelope
from imap_store.mime import get_section, parse_message
from imap_store.mime import text_for_search as mime_text_for_search
from imap_store.store import schema as t
from imap_store.store.mailboxes import (
    DELIMITER,
    SEARCH_COLUMNS,
    SYSTEM_FLAG_BITS,
    MailStore,
    MailStoreError,
    TryCreate,
)
from policy.authn import LoginResult

log = logging.getLogger(__name__)

#: BAD answers tolerated on one connection before it is closed (pymap's bad_command_limit).
BAD_COMMAND_LIMIT = 20
#: Output is written to the socket once this much is pending (and at the end of a command).
FLUSH_SIZE = 64 * 1024
#: Message bodies read in one query by FETCH (at least one message per query).
BODY_BATCH_BYTES = 8 * 1024 * 1024
#: FETCH items answered by Session._fetch_flags: the line format and its arguments (0: seq,
#: flags, UID; 1: seq, UID, flags; 2: seq, flags; 3: seq, UID).
_FLAG_FETCHES: dict[tuple[str, ...], tuple[bytes, int]] = {
    ("FLAGS", "UID"): (b"* %d FETCH (FLAGS %b UID %d)\r\n", 0),
    ("UID", "FLAGS"): (b"* %d FETCH (UID %d FLAGS %b)\r\n", 1),
    ("FLAGS",): (b"* %d FETCH (FLAGS %b)\r\n", 2),
    ("UID",): (b"* %d FETCH (UID %d)\r\n", 3),
}
#: More UID ranges than this in a SEARCH key: decided in Python rather than in SQL.
_MAX_SQL_RANGES = 50
#: Sections of the top-level header: FETCH reads only the header bytes of the blob.
_HEADER_SECTIONS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"})


class State(enum.Enum):
    """RFC 3501 §3 connection states."""

    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


class Action(enum.Enum):
    """What the edge must do after an event."""

    NONE = "none"
    EXPECT_LINE = "expect line"  # call parser.expect_line(): SASL response or IDLE's DONE
    REJECT_LITERAL = "reject literal"  # call parser.reject_literal()
    STARTTLS = "starttls"  # handshake now (the OK was sent)
    CLOSE = "close"  # close the connection (the BYE was sent)


_ANY = frozenset(State) - {State.LOGOUT}
_NOT_AUTH = frozenset({State.NOT_AUTHENTICATED})
_AUTH = frozenset({State.AUTHENTICATED, State.SELECTED})
_SELECTED = frozenset({State.SELECTED})

#: RFC 3501 §6.1-6.4: in which states each command is valid.
ALLOWED: dict[type, frozenset[State]] = {
    Capability: _ANY, Noop: _ANY, Logout: _ANY, Id: _ANY,
    StartTls: _NOT_AUTH, Authenticate: _NOT_AUTH, Login: _NOT_AUTH,
    Select: _AUTH, Create: _AUTH, Delete: _AUTH, Rename: _AUTH, Subscribe: _AUTH,
    Unsubscribe: _AUTH, List: _AUTH, Lsub: _AUTH, Status: _AUTH, Append: _AUTH,
    Namespace: _AUTH, Enable: _AUTH, Idle: _AUTH,
    Check: _SELECTED, Close: _SELECTED, Unselect: _SELECTED, Expunge: _SELECTED,
    Search: _SELECTED, Fetch: _SELECTED, Store: _SELECTED, Copy: _SELECTED, Move: _SELECTED,
}


def check_state(state: State, command: Command) -> r.Reply | None:
    """The one place where the state table is consulted: None if allowed, else the BAD."""
    allowed = ALLOWED.get(type(command), frozenset())
    if state in allowed:
        return None
    if allowed is _SELECTED:
        return r.BAD_STATE_SELECTED
    if allowed is _NOT_AUTH:
        return r.BAD_STATE_NOT_AUTH
    return r.BAD_STATE_AUTH


class Output(Protocol):
    async def write(self, data: bytes) -> None: ...


class Watcher(Protocol):
    """Tells sessions that a mailbox changed (implemented by the edge, shared per process)."""

    def watch(self, mailbox_id: int, modseq: int, listener: Callable[[], None]) -> None: ...

    def unwatch(self, mailbox_id: int, listener: Callable[[], None]) -> None: ...

    def latest(self, mailbox_id: int) -> int: ...

    def touched(self, mailbox_id: int, modseq: int) -> None: ...


LoginFn = Callable[[str, str], Awaitable[LoginResult]]
AuditFn = Callable[[str, str, str, dict[str, object]], None]


@dataclass(slots=True)
class Selected:
    """The selected mailbox, as this session sees it (RFC 3501 §2.3.1)."""

    mailbox_id: int
    name: str
    readonly: bool
    uidvalidity: int
    uids: array[int]
    modseq: int
    recent: list[tuple[int, int]] = field(default_factory=list)  # (low, high] UID ranges
    pending_expunge: list[int] = field(default_factory=list)
    own_modseqs: set[int] = field(default_factory=set)

    def is_recent(self, uid: int) -> bool:
        return any(low < uid <= high for low, high in self.recent)

    def recent_count(self) -> int:
        return sum(
            bisect_right(self.uids, high) - bisect_right(self.uids, low)
            for low, high in self.recent
        )

    def seq_of(self, uid: int) -> int:
        """1-based sequence number of ``uid``, 0 if not in the view."""
        index = bisect_left(self.uids, uid)
        return index + 1 if index < len(self.uids) and self.uids[index] == uid else 0


class Session:
    """One client connection's IMAP state; see the module docstring."""

    __slots__ = (
        "_bad", "_buf", "_idle_tag", "_listener", "_sasl_tag", "address", "audit", "conn_id",
        "login_fn", "mail", "mail_factory", "out", "selected", "starttls_available", "state",
        "tls", "wake", "watcher",
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
        self._buf = bytearray()
        self._bad = 0
        self._sasl_tag: str | None = None
        self._idle_tag: str | None = None
        self._listener = self._on_change

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
        caps = self._capabilities()
        await self.emit(b"* OK [CAPABILITY " + caps + b"] " + r.GREETING.text.encode() + b"\r\n")
        await self.flush()

    @property
    def authenticated(self) -> bool:
        return self.state in _AUTH

    @property
    def idling(self) -> bool:
        return self._idle_tag is not None

    def _capabilities(self) -> bytes:
        return r.capabilities(tls=self.tls, starttls=self.starttls_available,
                              authenticated=self.authenticated)

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

    async def _bad_reply(self, tag: str | None, reply: r.Reply) -> Action:
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
        if isinstance(event, NeedContinuation):
            if event.command == "APPEND" and not self.authenticated:
                await self.emit(r.BAD_STATE_AUTH.tagged(event.tag))
                return Action.REJECT_LITERAL
            await self.emit(b"+ Ready for literal\r\n")
            return Action.NONE
        if isinstance(event, LiteralTooLarge):
            return await self._bad_reply(event.tag, r.NO_TOOBIG)
        if isinstance(event, LineTooLong):
            return await self._bad_reply(event.tag, r.BAD_LINE_TOO_LONG)
        if isinstance(event, InvalidCommand):
            reply = r.Reply(event.status, event.text, event.code)
            if event.status == "NO":
                await self.emit(reply.tagged(event.tag))
                return Action.NONE
            return await self._bad_reply(event.tag, reply)
        refusal = check_state(self.state, event)
        if refusal is not None:
            return await self._bad_reply(event.tag, refusal)
        try:
            return await self._dispatch(event)
        except MailStoreError as exc:
            await self.emit(r.Reply("NO", exc.text, exc.code).tagged(event.tag))
            return Action.NONE

    async def _dispatch(self, cmd: Command) -> Action:
        tag = cmd.tag
        if isinstance(cmd, Capability):
            await self.emit(b"* CAPABILITY " + self._capabilities() + b"\r\n")
        elif isinstance(cmd, Noop | Check):
            await self._sync(allow_expunge=True, force=True)
        elif isinstance(cmd, Logout):
            await self.emit(r.BYE_LOGOUT.untagged())
            await self.emit(r.Reply("OK", "LOGOUT completed").tagged(tag))
            self.close_quietly()
            return Action.CLOSE
        elif isinstance(cmd, Id):
            await self.emit(b'* ID ("name" "mssante-gateway")\r\n')
        elif isinstance(cmd, StartTls):
            return await self._starttls(tag)
        elif isinstance(cmd, Login):
            if not self.tls:
                await self.emit(r.NO_LOGIN_DISABLED.tagged(tag))
                return Action.NONE
            try:
                password = cmd.password.decode("utf-8")
            except UnicodeDecodeError:
                await self.emit(r.NO_AUTH_FAILED.tagged(tag))
                return Action.NONE
            await self._login(tag, cmd.user, password)
            return Action.NONE
        elif isinstance(cmd, Authenticate):
            return await self._authenticate(cmd)
        elif isinstance(cmd, Select):
            await self._select(cmd)
            return Action.NONE
        elif isinstance(cmd, Idle):
            await self.emit(b"+ idling\r\n")
            self._idle_tag = tag
            await self._sync(allow_expunge=True)
            return Action.EXPECT_LINE
        else:
            return await self._mailbox_command(cmd)
        completion = "CHECK" if isinstance(cmd, Check) else cmd.name
        if self.selected is not None and not isinstance(cmd, Noop | Check):
            await self._sync(allow_expunge=True)
        await self.emit(r.Reply("OK", f"{completion} completed").tagged(tag))
        return Action.NONE

    async def _mailbox_command(self, cmd: Command) -> Action:
        """Commands of the authenticated and selected states (RFC 3501 §6.3, §6.4)."""
        tag = cmd.tag
        code: str | None = None
        allow_expunge = True
        if isinstance(cmd, Create):
            if cmd.special_use:
                raise MailStoreError("Special-use attributes cannot be set", "USEATTR")
            await self._mail().create(cmd.mailbox)
        elif isinstance(cmd, Delete):
            await self._mail().delete(cmd.mailbox)
            if self.selected is not None and self.selected.name == cmd.mailbox:
                self._unselect()
        elif isinstance(cmd, Rename):
            await self._mail().rename(cmd.mailbox, cmd.new_name)
        elif isinstance(cmd, Subscribe | Unsubscribe):
            await self._mail().subscribe(cmd.mailbox, isinstance(cmd, Subscribe))
        elif isinstance(cmd, List):
            await self._list(cmd.reference, cmd.patterns, cmd.selection_options,
                             cmd.return_options, lsub=False)
        elif isinstance(cmd, Lsub):
            await self._list(cmd.reference, (cmd.pattern,), ("SUBSCRIBED",), (), lsub=True)
        elif isinstance(cmd, Status):
            await self._status(cmd)
        elif isinstance(cmd, Append):
            code = await self._append(cmd)
            if code is None:
                return Action.NONE
        elif isinstance(cmd, Namespace):
            await self.emit(b'* NAMESPACE (("" "' + DELIMITER.encode() + b'")) NIL NIL\r\n')
        elif isinstance(cmd, Enable):
            await self.emit(b"* ENABLED\r\n")
        elif isinstance(cmd, Close | Unselect):
            sel = self._sel()
            if isinstance(cmd, Close) and not sel.readonly:
                modseq, _uids = await self._mail().expunge(sel.mailbox_id)
                if modseq:
                    self.watcher.touched(sel.mailbox_id, modseq)
            self._unselect()
        elif isinstance(cmd, Expunge):
            code = await self._expunge(cmd)
        elif isinstance(cmd, Fetch):
            if not await self._fetch(cmd):
                return Action.NONE
            allow_expunge = cmd.uid
        elif isinstance(cmd, Store):
            if not await self._store(cmd):
                return Action.NONE
            allow_expunge = cmd.uid
        elif isinstance(cmd, Search):
            await self._search(cmd)
            allow_expunge = cmd.uid
        elif isinstance(cmd, Copy | Move):
            code = await self._copy(cmd)
            if code is None:
                return Action.NONE
            if code == "":
                code = None
        if self.selected is not None:
            await self._sync(allow_expunge=allow_expunge)
        code_text = f"[{code}] " if code else ""
        await self.emit(f"{tag} OK {code_text}{cmd.name} completed\r\n".encode())
        return Action.NONE

    def _mail(self) -> MailStore:
        assert self.mail is not None
        return self.mail

    def _sel(self) -> Selected:
        assert self.selected is not None
        return self.selected

    def close_quietly(self) -> None:
        """The connection ends: forget the watcher subscription."""
        self._unselect()
        self.state = State.LOGOUT

    # --- STARTTLS and logins (RFC 3501 §6.2) ---------------------------------------------

    async def _starttls(self, tag: str) -> Action:
        if self.tls or not self.starttls_available:
            return await self._bad_reply(tag, r.BAD_STARTTLS)
        await self.emit(r.Reply("OK", "Begin TLS negotiation now").tagged(tag))
        return Action.STARTTLS

    def tls_started(self) -> None:
        self.tls = True

    async def _login(self, tag: str, user: str, password: str) -> None:
        result = await self.login_fn(user, password)
        if result.throttled:
            await self.emit(r.NO_AUTH_THROTTLED.tagged(tag))
            return
        identity = result.identity
        if identity is None:
            await self.emit(r.NO_AUTH_FAILED.tagged(tag))
            return
        self.state = State.AUTHENTICATED
        self.address = identity.address or ""
        self.mail = self.mail_factory(identity.account_id)
        log.info("conn=%s patient logged in", self.conn_id)
        await self.emit(
            f"{tag} OK [CAPABILITY ".encode() + self._capabilities() + b"] Logged in\r\n"
        )

    async def _authenticate(self, cmd: Authenticate) -> Action:
        if not self.tls:
            await self.emit(r.NO_LOGIN_DISABLED.tagged(cmd.tag))
            return Action.NONE
        if cmd.mechanism != "PLAIN":
            await self.emit(r.NO_MECHANISM.tagged(cmd.tag))
            return Action.NONE
        if cmd.initial_response is None:
            await self.emit(b"+ \r\n")
            self._sasl_tag = cmd.tag
            return Action.EXPECT_LINE
        await self._sasl_plain(cmd.tag, cmd.initial_response)
        return Action.NONE

    async def _sasl_plain(self, tag: str, response: bytes) -> None:
        """RFC 4616: ``[authzid] NUL authcid NUL passwd``; authzid empty or equal to authcid."""
        parts = response.split(b"\x00")
        if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
            await self._bad_reply(tag, r.BAD_AUTH_SYNTAX)
            return
        try:
            user, password = parts[1].decode("utf-8"), parts[2].decode("utf-8")
        except UnicodeDecodeError:
            await self.emit(r.NO_AUTH_FAILED.tagged(tag))
            return
        await self._login(tag, user, password)

    async def _raw_line(self, line: bytes) -> Action:
        if self._sasl_tag is not None:
            tag, self._sasl_tag = self._sasl_tag, None
            if line.strip() == b"*":
                return await self._bad_reply(tag, r.BAD_AUTH_CANCELLED)
            try:
                decoded = base64.b64decode(line.strip(), validate=True)
            except (binascii.Error, ValueError):
                return await self._bad_reply(tag, r.BAD_AUTH_SYNTAX)
            await self._sasl_plain(tag, decoded)
            return Action.NONE
        if self._idle_tag is not None:
            tag, self._idle_tag = self._idle_tag, None
            if line.strip().upper() != b"DONE":
                return await self._bad_reply(tag, r.BAD_EXPECTED_DONE)
            if self.selected is not None:
                await self._sync(allow_expunge=True)
            await self.emit(r.Reply("OK", "IDLE terminated").tagged(tag))
            return Action.NONE
        return await self._bad_reply(None, r.Reply("BAD", "Unexpected line"))

    async def idle_update(self) -> None:
        """The watcher woke an idling session: send what changed (RFC 2177 §3)."""
        if self._idle_tag is not None and self.selected is not None:
            await self._sync(allow_expunge=True)
            await self.flush()

    # --- SELECT and change tracking (RFC 3501 §6.3.1, §7.3-7.4) ---------------------------

    def _unselect(self) -> None:
        if self.selected is not None:
            self.watcher.unwatch(self.selected.mailbox_id, self._listener)
            self.selected = None
            self.state = State.AUTHENTICATED if self.mail is not None else self.state

    async def _select(self, cmd: Select) -> None:
        self._unselect()
        view = await self._mail().open(cmd.mailbox)
        if view is None:
            await self.emit(r.NO_NONEXISTENT.tagged(cmd.tag))
            return
        info = view.mailbox
        sel = Selected(info.id, info.name, cmd.readonly, info.uidvalidity, view.uids,
                       info.highestmodseq)
        last = view.uids[-1] if view.uids else 0
        if not cmd.readonly and info.recent_uid < last and await self._mail().claim_recent(
            info.id, info.recent_uid, last
        ):
            sel.recent.append((info.recent_uid, last))
        self.selected = sel
        self.state = State.SELECTED
        self.watcher.watch(info.id, info.highestmodseq, self._listener)
        keywords = b"".join(b" " + k.encode("ascii", "replace") for k in view.keywords)
        await self.emit(b"* FLAGS (" + r.SYSTEM_FLAGS_TEXT + keywords + b")\r\n")
        if cmd.readonly:
            await self.emit(b"* OK [PERMANENTFLAGS ()] Read-only mailbox\r\n")
        else:
            await self.emit(b"* OK [PERMANENTFLAGS (" + r.SYSTEM_FLAGS_TEXT + keywords
                            + b" \\*)] Flags permitted\r\n")
        await self.emit(b"* %d EXISTS\r\n* %d RECENT\r\n" % (len(sel.uids), sel.recent_count()))
        if view.first_unseen:
            await self.emit(b"* OK [UNSEEN %d] First unseen\r\n" % view.first_unseen)
        await self.emit(b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % info.uidvalidity)
        await self.emit(b"* OK [UIDNEXT %d] Predicted next UID\r\n" % info.uidnext)
        mode = "READ-ONLY" if cmd.readonly else "READ-WRITE"
        await self.emit(f"{cmd.tag} OK [{mode}] {cmd.name} completed\r\n".encode())

    async def _sync(self, *, allow_expunge: bool, force: bool = False) -> None:
        """Report other sessions' changes: EXPUNGE (when allowed), EXISTS, RECENT, FETCH."""
        sel = self.selected
        if sel is None:
            return
        if not force and self.watcher.latest(sel.mailbox_id) <= sel.modseq:
            if allow_expunge and sel.pending_expunge:
                await self._send_expunges(sel, sel.pending_expunge)
                sel.pending_expunge = []
            return
        changes = await self._mail().changes(sel.mailbox_id, sel.modseq)
        if not changes.exists:
            return
        sel.modseq = changes.highestmodseq
        for uid in changes.expunged:
            if sel.seq_of(uid):
                sel.pending_expunge.append(uid)
        if allow_expunge and sel.pending_expunge:
            await self._send_expunges(sel, sorted(set(sel.pending_expunge)))
            sel.pending_expunge = []
        last = sel.uids[-1] if sel.uids else 0
        new = [c.uid for c in changes.changed if c.uid > last]
        if new:
            sel.uids.extend(new)
            await self.emit(b"* %d EXISTS\r\n" % len(sel.uids))
            if not sel.readonly and changes.recent_uid < new[-1] and await self._mail(
            ).claim_recent(sel.mailbox_id, changes.recent_uid, new[-1]):
                sel.recent.append((changes.recent_uid, new[-1]))
            await self.emit(b"* %d RECENT\r\n" % sel.recent_count())
        for change in changes.changed:
            if change.uid > last or change.modseq in sel.own_modseqs:
                continue
            seq = sel.seq_of(change.uid)
            if seq:
                await self.emit(b"* %d FETCH (UID %d FLAGS %s)\r\n" % (
                    seq, change.uid,
                    r.render_flags(change.flags, change.keywords, sel.is_recent(change.uid))))
        sel.own_modseqs = {m for m in sel.own_modseqs if m > sel.modseq}

    async def _send_expunges(self, sel: Selected, uids: Sequence[int]) -> None:
        """``* n EXPUNGE`` for each UID still in the view, ascending (each one shifts the
        following sequence numbers down, RFC 3501 §7.4.1), then drop them from the view."""
        gone = set(uids)
        kept: array[int] = array("L")
        removed = 0
        for index, uid in enumerate(sel.uids):
            if uid in gone:
                await self.emit(b"* %d EXPUNGE\r\n" % (index + 1 - removed))
                removed += 1
            else:
                kept.append(uid)
        sel.uids = kept

    def _own_change(self, sel: Selected, modseq: int) -> None:
        sel.own_modseqs.add(modseq)
        self.watcher.touched(sel.mailbox_id, modseq)

    # --- sequence sets ------------------------------------------------------------------

    def _slices(self, seq_set: SequenceSet, uid: bool) -> list[tuple[int, int]] | None:
        """Index ranges ``[start, end)`` of the view named by a set, ascending; None when a
        sequence number does not exist (BAD, RFC 3501 §9). Unknown UIDs are ignored
        (§2.3.1.1)."""
        uids = self._sel().uids
        if uid:
            if not uids:
                return []
            out = []
            for low, high in seq_set.resolve(uids[-1]).intervals:
                start, end = bisect_left(uids, low), bisect_right(uids, high)
                if start < end:
                    out.append((start, end))
            return out
        if seq_set.highest_number > len(uids):
            return None
        return [(low - 1, high) for low, high in seq_set.resolve(len(uids)).intervals]

    def _targets(self, seq_set: SequenceSet, uid: bool,
                 build: bool = True) -> list[tuple[int, int]] | None:
        """``(sequence number, UID)`` pairs named by a set, ascending; None when a sequence
        number does not exist (BAD, RFC 3501 §9). Unknown UIDs are ignored (§2.3.1.1).
        ``build=False``: only check the set (an empty list when it is valid)."""
        slices = self._slices(seq_set, uid)
        if slices is None or not build:
            return slices if slices is None else []
        uids = self._sel().uids
        return [(index + 1, uids[index]) for start, end in slices for index in range(start, end)]

    # --- mailbox listing, status, append ---------------------------------------------------

    async def _list(self, reference: str, patterns: Sequence[str], selection: Sequence[str],
                    returns: Sequence[str], *, lsub: bool) -> None:
        """LIST/LSUB with wildcards, CHILDREN and SPECIAL-USE attributes (RFC 3501 §6.3.8,
        RFC 3348, RFC 6154 §2)."""
        verb = b"LSUB" if lsub else b"LIST"
        delimiter = b'"' + DELIMITER.encode() + b'"'
        if len(patterns) == 1 and patterns[0] == "":
            await self.emit(b"* " + verb + b" (\\Noselect) " + delimiter + b' ""\r\n')
            return
        if any(len(reference) + len(p) > listing.MAX_PATTERN for p in patterns):
            raise MailStoreError(r.NO_PATTERN_TOO_LONG.text, r.NO_PATTERN_TOO_LONG.code)
        boxes = {b.name: b for b in await self._mail().mailboxes()}
        names = listing.with_parents(boxes)
        # Every implied parent is in ``names``: a name has children iff it is someone's parent.
        parents = {n.rpartition(DELIMITER)[0] for n in names if DELIMITER in n}
        subscribed_only = "SUBSCRIBED" in selection
        special_only = "SPECIAL-USE" in selection
        show_subscribed = subscribed_only or "SUBSCRIBED" in returns
        full = [listing.canonical_pattern(reference, p) for p in patterns]
        for name in sorted(names, key=lambda n: (n != "INBOX", n)):
            if not any(listing.matches(p, name, DELIMITER) for p in full):
                continue
            box = boxes.get(name)
            if subscribed_only and (box is None or not box.subscribed):
                continue
            if special_only and (box is None or box.special_use is None):
                continue
            attrs: list[str] = []
            if box is None:
                attrs.append("\\Noselect")
            if not lsub:
                attrs.append("\\HasChildren" if name in parents else "\\HasNoChildren")
                if box is not None and box.special_use:
                    attrs.append(box.special_use)
                if show_subscribed and box is not None and box.subscribed:
                    attrs.append("\\Subscribed")
            await self.emit(b"* " + verb + b" (" + " ".join(attrs).encode() + b") "
                            + delimiter + b" " + r.quote(name) + b"\r\n")

    async def _status(self, cmd: Status) -> None:
        counts = await self._mail().status(cmd.mailbox)
        values = {
            "MESSAGES": counts.messages, "RECENT": counts.recent, "UIDNEXT": counts.uidnext,
            "UIDVALIDITY": counts.uidvalidity, "UNSEEN": counts.unseen,
            "APPENDLIMIT": r.APPEND_LIMIT,
        }
        items = " ".join(f"{item} {values[item]}" for item in cmd.items)
        await self.emit(b"* STATUS " + r.quote(cmd.mailbox) + f" ({items})\r\n".encode())

    async def _append(self, cmd: Append) -> str | None:
        """APPEND (RFC 3501 §6.3.11) with APPENDUID (RFC 4315 §3); None if answered NO."""
        if not cmd.message:
            await self.emit(r.NO_EMPTY_MESSAGE.tagged(cmd.tag))
            return None
        bits, keywords = _split_flags(cmd.flags)
        mailbox_id, uidvalidity, uid, modseq = await self._mail().append(
            cmd.mailbox, cmd.message, bits, keywords, cmd.date)
        self.watcher.touched(mailbox_id, modseq)
        self._audit("imap.append", {"mailbox": mailbox_id, "uid": uid})
        return f"APPENDUID {uidvalidity} {uid}"

    def _audit(self, action: str, detail: dict[str, object]) -> None:
        self.audit(f"patient {self.address}", action, self.address, detail)

    # --- selected state: EXPUNGE, STORE, FETCH, SEARCH, COPY/MOVE --------------------------

    async def _expunge(self, cmd: Expunge) -> str | None:
        sel = self._sel()
        if sel.readonly:
            raise MailStoreError(r.NO_READ_ONLY.text, r.NO_READ_ONLY.code)
        ranges = None
        if cmd.uid_set is not None:
            ranges = _merge_ranges(part.bounds(sel.uids[-1] if sel.uids else 0)
                                   for part in cmd.uid_set.ranges)
        modseq, uids = await self._mail().expunge(sel.mailbox_id, ranges)
        if uids:
            self._own_change(sel, modseq)
            await self._send_expunges(sel, uids)
            self._audit("imap.expunge", {"mailbox": sel.mailbox_id, "messages": len(uids)})
        return None

    async def _store(self, cmd: Store) -> bool:
        sel = self._sel()
        if sel.readonly:
            raise MailStoreError(r.NO_READ_ONLY.text, r.NO_READ_ONLY.code)
        targets = self._targets(cmd.seq_set, cmd.uid)
        if targets is None:
            await self._bad_reply(cmd.tag, r.BAD_SEQUENCE)
            return False
        bits, keywords = _split_flags(cmd.flags)
        if not targets:
            return True
        modseq, states = await self._mail().store_flags(
            sel.mailbox_id, [uid for _seq, uid in targets], str(cmd.mode), bits, keywords)
        self._own_change(sel, modseq)
        if not cmd.silent:
            for state in states:
                seq = sel.seq_of(state.uid)
                if not seq:
                    continue
                flags = r.render_flags(state.flags, state.keywords, sel.is_recent(state.uid))
                if cmd.uid:
                    await self.emit(b"* %d FETCH (UID %d FLAGS %s)\r\n" % (seq, state.uid, flags))
                else:
                    await self.emit(b"* %d FETCH (FLAGS %s)\r\n" % (seq, flags))
        return True

    async def _fetch(self, cmd: Fetch) -> bool:
        """FETCH (RFC 3501 §6.4.5): rows for flags, dates, sizes, envelope and structure;
        the stored body only for body sections."""
        sel = self._sel()
        targets = self._targets(cmd.seq_set, cmd.uid, build=False)
        if targets is None:
            await self._bad_reply(cmd.tag, r.BAD_SEQUENCE)
            return False
        attrs = list(cmd.attributes)
        if cmd.uid and not any(a.name == "UID" and a.section is None for a in attrs):
            attrs.insert(0, FetchAttr("UID"))
        names = tuple(a.name if a.section is None else "" for a in attrs)
        if names in _FLAG_FETCHES:
            slices = self._slices(cmd.seq_set, cmd.uid)
            if slices:
                await self._fetch_flags(sel, slices, *_FLAG_FETCHES[names])
            return True
        targets = self._targets(cmd.seq_set, cmd.uid)
        if not targets:
            return True
        columns: set[str] = set()
        needs_body = False
        header_only = True
        reads = False
        for attr in attrs:
            if attr.section is not None or attr.name in ("RFC822", "RFC822.HEADER",
                                                         "RFC822.TEXT"):
                needs_body = reads = True
                columns.add("size")
                header_only = header_only and (
                    attr.name == "RFC822.HEADER"
                    or (attr.section is not None and not attr.section.part
                        and attr.section.text in _HEADER_SECTIONS))
            elif attr.name == "FLAGS":
                columns.update(("flags", "keywords"))
            elif attr.name == "INTERNALDATE":
                columns.add("internal_date")
            elif attr.name == "RFC822.SIZE":
                columns.add("size")
            elif attr.name in ("ENVELOPE", "BODY", "BODYSTRUCTURE"):
                columns.add("meta")
                reads = True
        uids = [uid for _seq, uid in targets]
        seen_now: dict[int, Any] = {}
        if not sel.readonly and any(a.sets_seen for a in attrs):
            modseq, states = await self._mail().store_flags(
                sel.mailbox_id, uids, "+FLAGS", t.FLAG_SEEN, ())
            self._own_change(sel, modseq)
            seen_now = {s.uid: s for s in states if s.modseq == modseq}
        rows = await self._mail().fetch_rows(sel.mailbox_id, uids, columns)
        by_uid = {row.uid: row for row in rows}
        bodies: dict[int, bytes] = {}
        batch: list[int] = []
        batch_bytes = 0
        for index, (seq, uid) in enumerate(targets):
            row = by_uid.get(uid)
            if row is None:
                continue  # expunged by another session meanwhile
            raw = b""
            if needs_body:
                if uid not in bodies:
                    # the bodies of the next messages, up to BODY_BATCH_BYTES, in one query
                    bodies.clear()
                    batch.clear()
                    batch_bytes = 0
                    for _next_seq, next_uid in targets[index:]:
                        next_row = by_uid.get(next_uid)
                        if next_row is None:
                            continue
                        if batch and batch_bytes + next_row.size > BODY_BATCH_BYTES:
                            break
                        batch.append(next_uid)
                        batch_bytes += next_row.size
                    bodies = await self._mail().bodies(sel.mailbox_id, batch,
                                                       header_only=header_only)
                body = bodies.get(uid)
                if body is None:
                    continue
                raw = body
            meta = await self._meta(sel, uid, row.meta) if "meta" in columns else None
            await self.emit(_render_fetch(sel, seq, uid, row, attrs, raw, meta,
                                          seen_now.get(uid)))
        if reads:
            self._audit("imap.read", {"mailbox": sel.mailbox_id, "messages": len(by_uid)})
        return True

    async def _fetch_flags(self, sel: Selected, slices: list[tuple[int, int]],
                           line: bytes, form: int) -> None:
        """FETCH of FLAGS and UID only (``FETCH 1:* (FLAGS UID)`` at every resync), for the
        view's index ``slices`` ``[start, end)``: the flags from the index only, each distinct
        flag set rendered once, no per-message object beyond the database row."""
        uids = sel.uids
        count = len(uids)
        rows, keywords = await self._mail().flag_rows(
            sel.mailbox_id, [(uids[start], uids[end - 1]) for start, end in slices])
        recent = sel.recent
        rendered: dict[Any, bytes] = {}
        lines: list[bytes] = []
        lo = 0
        part = 0
        part_start, part_end = slices[0]
        for uid, flags in rows:
            index = bisect_left(uids, uid, lo)
            if index == count or uids[index] != uid:
                continue  # not in this session's view
            lo = index
            while index >= part_end:
                part += 1
                if part == len(slices):
                    break
                part_start, part_end = slices[part]
            if part == len(slices):
                break
            if index < part_start:
                continue
            kw = keywords.get(uid, "") if keywords else ""
            is_recent = bool(recent) and sel.is_recent(uid)
            key: Any = (flags, kw, is_recent) if kw or is_recent else flags
            text = rendered.get(key)
            if text is None:
                text = rendered[key] = r.render_flags(flags, kw, is_recent)
            if form == 0:
                lines.append(line % (index + 1, text, uid))
            elif form == 1:
                lines.append(line % (index + 1, uid, text))
            else:
                lines.append(line % (index + 1, text if form == 2 else uid))
            if len(lines) >= 1000:
                await self.emit(b"".join(lines))
                lines.clear()
        if lines:
            await self.emit(b"".join(lines))

    async def _meta(self, sel: Selected, uid: int, text: str | None) -> dict[str, Any]:
        if text:
            try:
                value = json.loads(text)
                if isinstance(value, dict):
                    return value
            except ValueError:
                pass
        raw = await self._mail().body(sel.mailbox_id, uid) or b""
        return parse_message(raw).to_dict()

    async def _search(self, cmd: Search) -> None:
        """SEARCH (RFC 3501 §6.4.4): what the database can decide exactly (flags, UIDs,
        sequence numbers, sizes, \\Recent) is a WHERE clause; the rest (header substrings,
        dates, keywords, bodies) is checked in Python on the rows it leaves, with the header
        fields extracted from ``meta`` by the database. Bodies are read only for BODY/TEXT."""
        sel = self._sel()
        criteria = cmd.criteria
        conjuncts = criteria.keys if isinstance(criteria, SearchAnd) else (criteria,)
        indexed = bool(_search_fields(criteria) & SEARCH_COLUMNS.keys())
        while True:
            conditions: list[Any] = []
            residual: list[SearchKey] = []
            for key in conjuncts:
                condition = _sql_condition(key, sel, indexed)
                if condition is None:
                    residual.append(key)
                else:
                    conditions.append(condition)
            rest = SearchAnd(tuple(residual)) if residual else None
            columns = _search_columns(rest) if rest is not None else set()
            fields = sorted(_search_fields(rest)) if rest is not None else []
            needs_body = "body" in columns
            if needs_body:
                columns.add("size")
            where = and_(*conditions) if conditions else None
            found_rows = await self._mail().search_rows(sel.mailbox_id, where, columns, fields,
                                                        indexed=indexed)
            if found_rows is not None or not indexed:
                break
            indexed = False  # some messages have no blob_search row: headers in Python
        rows = found_rows or []
        context = _SearchContext(sel)
        if rows:
            names = rows[0]._fields
            context.extracted = "meta" not in names
            context.fields = {name: names.index(f"h{index}") for index, name in enumerate(fields)
                              if context.extracted}
        matches = context.compile(rest) if rest is not None else None
        found: list[int] = []
        bodies: dict[int, bytes] = {}
        view, count, by_uid = sel.uids, len(sel.uids), cmd.uid
        for index, row in enumerate(rows):
            uid = row[0]
            position = bisect_left(view, uid)
            if position == count or view[position] != uid:
                continue  # not (or no longer) in this session's view
            seq = position + 1
            if matches is None:
                found.append(uid if by_uid else seq)
                continue
            context.row, context.seq, context.meta, context.text = row, seq, None, None
            if needs_body:
                if uid not in bodies:
                    batch: list[int] = []
                    batch_bytes = 0
                    for other in rows[index:]:
                        if batch and batch_bytes + other.size > BODY_BATCH_BYTES:
                            break
                        batch.append(other.uid)
                        batch_bytes += other.size
                    bodies = await self._mail().bodies(sel.mailbox_id, batch)
                context.raw = bodies.get(uid, b"")
            if matches():
                found.append(uid if by_uid else seq)
        await self.emit(b"* SEARCH" + b"".join(b" %d" % n for n in found) + b"\r\n")
        if needs_body and found:
            self._audit("imap.search", {"mailbox": sel.mailbox_id, "messages": len(found)})

    async def _copy(self, cmd: Copy | Move) -> str | None:
        """COPY / MOVE with COPYUID (RFC 4315 §3, RFC 6851 §4.3). Returns the response code
        of the tagged OK ("" for none), None if already answered."""
        sel = self._sel()
        move = isinstance(cmd, Move)
        if move and sel.readonly:
            raise MailStoreError(r.NO_READ_ONLY.text, r.NO_READ_ONLY.code)
        targets = self._targets(cmd.seq_set, cmd.uid)
        if targets is None:
            await self._bad_reply(cmd.tag, r.BAD_SEQUENCE)
            return None
        if not targets:
            if await self._mail().mailbox(cmd.mailbox) is None:
                raise TryCreate()
            return ""
        result = await self._mail().copy(sel.mailbox_id, [u for _s, u in targets],
                                          cmd.mailbox, move)
        self.watcher.touched(result.mailbox_id, result.modseq)
        self._audit("imap.move" if move else "imap.copy",
                    {"mailbox": sel.mailbox_id, "messages": len(result.pairs)})
        if not result.pairs:
            return ""
        sources = SequenceSet.from_values(p[0] for p in result.pairs)
        copies = SequenceSet.from_values(p[1] for p in result.pairs)
        code = f"COPYUID {result.uidvalidity} {sources} {copies}"
        if not move:
            return code
        await self.emit(f"* OK [{code}] Moved\r\n".encode())
        self._own_change(sel, result.expunge_modseq)
        await self._send_expunges(sel, [p[0] for p in result.pairs])
        return ""


def _render_fetch(sel: Selected, seq: int, uid: int, row: Any, attrs: list[FetchAttr],
                  raw: bytes, meta: dict[str, Any] | None, seen: Any) -> bytes:
    """One ``* n FETCH (...)`` response from a row (and the body when a section is asked)."""
    parts: list[bytes] = []
    flags_sent = False
    for attr in attrs:
        name = attr.name
        if attr.section is not None:
            section = attr.section
            data = get_section(raw, section.part, section.text, section.fields)
            if attr.partial is not None:
                origin, length = attr.partial
                data = data[origin : origin + length]
            parts.append(attr.response_name().encode("ascii", "replace") + b" "
                         + r.literal(data))
        elif name == "UID":
            parts.append(b"UID %d" % uid)
        elif name == "FLAGS":
            flags, keywords = (seen.flags, seen.keywords) if seen else (row.flags, row.keywords)
            parts.append(b"FLAGS " + r.render_flags(flags, keywords, sel.is_recent(uid)))
            flags_sent = True
        elif name == "INTERNALDATE":
            parts.append(b"INTERNALDATE " + r.render_date(row.internal_date))
        elif name == "RFC822.SIZE":
            parts.append(b"RFC822.SIZE %d" % row.size)
        elif name == "ENVELOPE":
            parts.append(b"ENVELOPE " + render_envelope((meta or {}).get("envelope") or []))
        elif name in ("BODY", "BODYSTRUCTURE"):
            parts.append(name.encode() + b" " + render_bodystructure(
                (meta or {}).get("bodystructure") or {}, name == "BODYSTRUCTURE"))
        elif name == "RFC822":
            parts.append(b"RFC822 " + r.literal(raw))
        elif name == "RFC822.HEADER":
            parts.append(b"RFC822.HEADER " + r.literal(get_section(raw, (), "HEADER")))
        elif name == "RFC822.TEXT":
            parts.append(b"RFC822.TEXT " + r.literal(get_section(raw, (), "TEXT")))
    if seen is not None and not flags_sent:
        parts.append(b"FLAGS " + r.render_flags(seen.flags, seen.keywords, sel.is_recent(uid)))
    return b"* %d FETCH (" % seq + b" ".join(parts) + b")\r\n"


def _split_flags(flags: Sequence[str]) -> tuple[int, list[str]]:
    """System flag bits and keywords of a flag list (``\\Recent`` cannot be set)."""
    bits = 0
    keywords: list[str] = []
    for flag in flags:
        if flag in SYSTEM_FLAG_BITS:
            bits |= SYSTEM_FLAG_BITS[flag]
        elif not flag.startswith("\\"):
            keywords.append(flag)
    return bits, keywords


def _sql_condition(key: SearchKey, sel: Selected, indexed: bool) -> Any:
    """A WHERE clause deciding ``key`` exactly for the messages of ``sel``'s view, or None
    when Python must decide (keywords, dates, bodies, other header fields). ``indexed``: the
    search joins ``blob_search`` (FROM/TO/CC/BCC/SUBJECT, case-folded like the needle)."""
    m = t.message.c
    if isinstance(key, SearchAll):
        return true()
    if isinstance(key, SearchHeader):
        column = SEARCH_COLUMNS.get(key.field.lower())
        if not indexed or column is None:
            return None
        # both sides case-folded: LIKE is a plain substring test (SQLite's LIKE only folds
        # ASCII, which case-folded text no longer has in upper case)
        return and_(column.is_not(None),
                    column.contains(key.value.casefold(), autoescape=True))
    if isinstance(key, SearchFlag):
        if key.flag == "\\Recent":
            condition: Any = or_(false(), *(m.uid.between(low + 1, high)
                                            for low, high in sel.recent))
        elif key.flag in SYSTEM_FLAG_BITS:
            condition = m.flags.op("&")(SYSTEM_FLAG_BITS[key.flag]) != 0
        else:
            return None
        return condition if key.present else not_(condition)
    if isinstance(key, SearchUid | SearchSequence):
        if isinstance(key, SearchUid):
            highest = sel.uids[-1] if sel.uids else 0
            ranges = _merge_ranges(part.bounds(highest) for part in key.seq_set.ranges)
        else:
            count = len(sel.uids)
            ranges = []
            for low, high in _merge_ranges(part.bounds(count) for part in key.seq_set.ranges):
                low, high = max(low, 1), min(high, count)
                if low <= high:
                    ranges.append((sel.uids[low - 1], sel.uids[high - 1]))
        if len(ranges) > _MAX_SQL_RANGES:
            return None
        return or_(false(), *(m.uid.between(low, high) for low, high in ranges))
    if isinstance(key, SearchLarger):
        return m.size > key.size
    if isinstance(key, SearchSmaller):
        return m.size < key.size
    if isinstance(key, SearchNot):
        inner = _sql_condition(key.key, sel, indexed)
        return None if inner is None else not_(inner)
    if isinstance(key, SearchOr | SearchAnd):
        keys = (key.left, key.right) if isinstance(key, SearchOr) else key.keys
        parts = [_sql_condition(k, sel, indexed) for k in keys]
        if any(p is None for p in parts):
            return None
        return or_(*parts) if isinstance(key, SearchOr) else and_(true(), *parts)
    return None


def _search_leaves(key: SearchKey) -> Iterator[SearchKey]:
    """The keys of a SEARCH tree that are not NOT, OR or AND."""
    stack: list[SearchKey] = [key]
    while stack:
        node = stack.pop()
        if isinstance(node, SearchNot):
            stack.append(node.key)
        elif isinstance(node, SearchOr):
            stack.extend((node.left, node.right))
        elif isinstance(node, SearchAnd):
            stack.extend(node.keys)
        else:
            yield node


def _search_fields(key: SearchKey) -> set[str]:
    """Header fields (lower case) a SEARCH tree looks into."""
    return {n.field.lower() for n in _search_leaves(key) if isinstance(n, SearchHeader)}


def _search_columns(key: SearchKey) -> set[str]:
    """Columns (``sent``: the Date header; ``body``) a SEARCH tree needs in Python (header
    fields are extracted from ``meta``: see ``_search_fields``)."""
    out: set[str] = set()
    for node in _search_leaves(key):
        if isinstance(node, SearchFlag):
            out.update(("flags", "keywords"))
        elif isinstance(node, SearchInternalDate):
            out.add("internal_date")
        elif isinstance(node, SearchSentDate):
            out.add("sent")
        elif isinstance(node, SearchLarger | SearchSmaller):
            out.add("size")
        elif isinstance(node, SearchBody):
            out.add("body")
        elif isinstance(node, SearchText):
            out.update(("body", "meta"))
    return out


def _compare(relation: DateRelation, value: date, wanted: date) -> bool:
    if relation is DateRelation.BEFORE:
        return value < wanted
    if relation is DateRelation.ON:
        return value == wanted
    return value >= wanted


class _SearchContext:
    """Evaluates a SEARCH tree against one message row at a time."""

    __slots__ = ("extracted", "fields", "meta", "raw", "row", "sel", "seq", "text")

    def __init__(self, sel: Selected) -> None:
        self.sel = sel
        self.row: Any = None
        self.seq = 0
        self.meta: dict[str, Any] | None = None
        self.raw = b""
        self.text: str | None = None
        self.fields: dict[str, int] = {}  # header field -> index of its column h<index>
        self.extracted = False  # header fields and Date came as columns, not in ``meta``

    def _header(self, name: str) -> Any:
        position = self.fields.get(name)
        if position is not None:
            return self.row[position]
        return self._headers().get(name)

    def compile(self, key: SearchKey) -> Callable[[], bool]:
        """``key`` as a function of the current row (:attr:`row`, :attr:`seq`...): the tree
        is walked once per SEARCH, not once per message, for the frequent keys."""
        if isinstance(key, SearchAnd):
            parts = [self.compile(k) for k in key.keys]
            if len(parts) == 1:
                return parts[0]
            return lambda: all(part() for part in parts)
        if isinstance(key, SearchOr):
            left, right = self.compile(key.left), self.compile(key.right)
            return lambda: left() or right()
        if isinstance(key, SearchNot):
            inner = self.compile(key.key)
            return lambda: not inner()
        if isinstance(key, SearchFlag) and key.flag in SYSTEM_FLAG_BITS:
            bit, present = SYSTEM_FLAG_BITS[key.flag], key.present
            return lambda: bool(self.row.flags & bit) is present
        if isinstance(key, SearchHeader) and key.field.lower() in self.fields:
            position, needle = self.fields[key.field.lower()], key.value.casefold()

            def header() -> bool:
                text = self.row[position]
                return text is not None and needle in text.casefold()

            return header
        return lambda: self.match(key)

    def _sent(self) -> Any:
        if self.extracted:
            return self.row.sent
        return self._meta().get("date")

    def _meta(self) -> dict[str, Any]:
        if self.meta is None:
            try:
                value = json.loads(self.row.meta or "{}")
            except ValueError:
                value = {}
            self.meta = value if isinstance(value, dict) else {}
        return self.meta

    def _body_text(self) -> str:
        if self.text is None:
            self.text = mime_text_for_search(self.raw).casefold()
        return self.text

    def _headers(self) -> dict[str, str]:
        headers = self._meta().get("search_headers") or {}
        return headers if isinstance(headers, dict) else {}

    def match(self, key: SearchKey) -> bool:
        row = self.row
        if isinstance(key, SearchAll):
            return True
        if isinstance(key, SearchAnd):
            return all(self.match(k) for k in key.keys)
        if isinstance(key, SearchOr):
            return self.match(key.left) or self.match(key.right)
        if isinstance(key, SearchNot):
            return not self.match(key.key)
        if isinstance(key, SearchFlag):
            if key.flag == "\\Recent":
                present = self.sel.is_recent(row.uid)
            elif key.flag in SYSTEM_FLAG_BITS:
                present = bool(row.flags & SYSTEM_FLAG_BITS[key.flag])
            else:
                present = key.flag.casefold() in (k.casefold() for k in row.keywords.split())
            return present == key.present
        if isinstance(key, SearchSequence):
            return key.seq_set.contains(self.seq, len(self.sel.uids))
        if isinstance(key, SearchUid):
            return key.seq_set.contains(row.uid, self.sel.uids[-1] if self.sel.uids else 0)
        if isinstance(key, SearchLarger):
            return bool(row.size > key.size)
        if isinstance(key, SearchSmaller):
            return bool(row.size < key.size)
        if isinstance(key, SearchInternalDate):
            value: datetime = row.internal_date
            return _compare(key.relation, value.date(), key.date)
        if isinstance(key, SearchSentDate):
            sent = self._sent()
            if not sent:
                return False
            try:
                day = datetime.fromisoformat(sent).date()
            except ValueError:
                return False
            return _compare(key.relation, day, key.date)
        if isinstance(key, SearchHeader):
            text = self._header(key.field.lower())
            if text is None:
                return False
            return key.value.casefold() in text.casefold()
        if isinstance(key, SearchBody):
            return key.value.casefold() in self._body_text()
        if isinstance(key, SearchText):
            wanted = key.value.casefold()
            if any(wanted in f"{k}: {v}".casefold() for k, v in self._headers().items()):
                return True
            return wanted in self._body_text()
        return False


def _merge_ranges(bounds: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, merged inclusive ranges."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(bounds):
        if merged and low <= merged[-1][1] + 1:
            if high > merged[-1][1]:
                merged[-1] = (merged[-1][0], high)
        else:
            merged.append((low, high))
    return merged
