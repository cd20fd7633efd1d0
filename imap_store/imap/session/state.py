"""What every part of the session shares: the connection states and what is allowed where
(:data:`ALLOWED`, checked in one function, :func:`check_state`), the edge's interfaces and the
selected mailbox (:class:`Selected`: an ``array('L')`` of UIDs in sequence order, the MODSEQ
last seen, the UID ranges this session announced as \\Recent)."""

from __future__ import annotations

import enum
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from imap_store.imap import commands as c
from imap_store.imap import responses as r
from policy.authn import LoginResult


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
    REPLAY = "replay"  # call parser.unread(session.take_replay()): a raw line is a command


_ANY = frozenset(State) - {State.LOGOUT}
_NOT_AUTH = frozenset({State.NOT_AUTHENTICATED})
#: The states of a logged-in session.
AUTH_STATES = frozenset({State.AUTHENTICATED, State.SELECTED})
_SELECTED = frozenset({State.SELECTED})
#: RFC 5161 §3.1: ENABLE is valid only in the authenticated state, before any SELECT.
_AUTH_ONLY = frozenset({State.AUTHENTICATED})

#: RFC 3501 §6.1-6.4: in which states each command is valid.
ALLOWED: dict[type, frozenset[State]] = {
    c.Capability: _ANY, c.Noop: _ANY, c.Logout: _ANY, c.Id: _ANY,
    c.StartTls: _NOT_AUTH, c.Authenticate: _NOT_AUTH, c.Login: _NOT_AUTH,
    c.Select: AUTH_STATES, c.Create: AUTH_STATES, c.Delete: AUTH_STATES, c.Rename: AUTH_STATES,
    c.Subscribe: AUTH_STATES, c.Unsubscribe: AUTH_STATES, c.List: AUTH_STATES, c.Lsub: AUTH_STATES,
    c.Status: AUTH_STATES, c.Append: AUTH_STATES, c.Namespace: AUTH_STATES, c.Enable: _AUTH_ONLY,
    c.Idle: AUTH_STATES,
    c.Check: _SELECTED, c.Close: _SELECTED, c.Unselect: _SELECTED, c.Expunge: _SELECTED,
    c.Search: _SELECTED, c.Sort: _SELECTED, c.Thread: _SELECTED, c.Fetch: _SELECTED,
    c.Store: _SELECTED,
    c.Copy: _SELECTED,
    c.Move: _SELECTED,
}


def check_state(state: State, command: c.Command) -> r.Reply | None:
    """The one place where the state table is consulted: None if allowed, else the BAD."""
    allowed = ALLOWED.get(type(command), frozenset())
    if state in allowed:
        return None
    if allowed is _SELECTED:
        return r.BAD_STATE_SELECTED
    if allowed is _NOT_AUTH:
        return r.BAD_STATE_NOT_AUTH
    if allowed is _AUTH_ONLY and state is State.SELECTED:
        return r.BAD_STATE_SELECTED_ALREADY
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
    keywords: set[str] = field(default_factory=set)  # announced in FLAGS (RFC 3501 §7.2.6)
    #: UIDs saved by ``SEARCH RETURN (SAVE)``, what ``$`` names (RFC 5182 §2.1); a new
    #: SELECT starts empty, an expunged UID drops out as it leaves the view.
    saved: list[int] = field(default_factory=list)

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

    def slices(self, seq_set: c.SequenceSet, uid: bool) -> list[tuple[int, int]] | None:
        """Index ranges ``[start, end)`` of the view named by a set, ascending; None when a
        sequence number does not exist (BAD, RFC 3501 §9). Unknown UIDs are ignored
        (§2.3.1.1). ``$`` names the saved result's messages still in the view."""
        uids = self.uids
        if seq_set.saved:
            return self._saved_slices()
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

    def _saved_slices(self) -> list[tuple[int, int]]:
        uids, count = self.uids, len(self.uids)
        out: list[tuple[int, int]] = []
        for uid in sorted(self.saved):
            index = bisect_left(uids, uid)
            if index == count or uids[index] != uid:
                continue
            if out and out[-1][1] == index:
                out[-1] = (out[-1][0], index + 1)
            else:
                out.append((index, index + 1))
        return out

    def saved_uid_ranges(self) -> list[tuple[int, int]]:
        """``$`` as inclusive UID ranges of the view (for SEARCH and UID EXPUNGE)."""
        uids = self.uids
        return [(uids[start], uids[end - 1]) for start, end in self._saved_slices()]

    def targets(self, seq_set: c.SequenceSet, uid: bool,
                build: bool = True) -> list[tuple[int, int]] | None:
        """``(sequence number, UID)`` pairs named by a set, ascending; None when a sequence
        number does not exist (BAD, RFC 3501 §9). Unknown UIDs are ignored (§2.3.1.1).
        ``build=False``: only check the set (an empty list when it is valid)."""
        slices = self.slices(seq_set, uid)
        if slices is None or not build:
            return slices if slices is None else []
        uids = self.uids
        return [(index + 1, uids[index]) for start, end in slices for index in range(start, end)]
