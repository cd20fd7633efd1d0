"""Mailbox commands of the authenticated state (RFC 3501 §6.3): CREATE, DELETE, RENAME,
SUBSCRIBE, UNSUBSCRIBE, LIST (RFC 3348 CHILDREN, RFC 5258 LIST-EXTENDED, RFC 5819 LIST-STATUS,
RFC 6154 SPECIAL-USE), LSUB, STATUS (RFC 8438 SIZE, RFC 9051 DELETED), APPEND (RFC 4315
APPENDUID), NAMESPACE (RFC 2342)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from imap_store.imap import listing
from imap_store.imap import responses as r
from imap_store.imap.commands import (
    Append,
    Create,
    Delete,
    List,
    Lsub,
    Namespace,
    Rename,
    Status,
    Subscribe,
    Unsubscribe,
)
from imap_store.imap.session.fetch import split_flags
from imap_store.imap.session.state import Action
from imap_store.store.mailboxes import DELIMITER, MailStoreError, StatusCounts

if TYPE_CHECKING:
    from imap_store.imap.session.core import Session


async def create(s: Session, cmd: Create) -> Action:
    if cmd.special_use:
        raise MailStoreError("Special-use attributes cannot be set", "USEATTR")
    await s.require_mail().create(cmd.mailbox)
    return await s.complete(cmd)


async def delete(s: Session, cmd: Delete) -> Action:
    await s.require_mail().delete(cmd.mailbox)
    if s.selected is not None and s.selected.name == cmd.mailbox:
        s.unselect()
    return await s.complete(cmd)


async def rename(s: Session, cmd: Rename) -> Action:
    await s.require_mail().rename(cmd.mailbox, cmd.new_name)
    return await s.complete(cmd)


async def subscribe(s: Session, cmd: Subscribe) -> Action:
    await s.require_mail().subscribe(cmd.mailbox, True)
    return await s.complete(cmd)


async def unsubscribe(s: Session, cmd: Unsubscribe) -> Action:
    await s.require_mail().subscribe(cmd.mailbox, False)
    return await s.complete(cmd)


async def list_(s: Session, cmd: List) -> Action:
    await _list(s, cmd)
    return await s.complete(cmd)


async def lsub(s: Session, cmd: Lsub) -> Action:
    """LSUB (RFC 3501 §6.3.9): the subscribed names the pattern matches; where ``%`` stops
    above a subscribed name, its unsubscribed ancestor at that level, as ``\\Noselect``. A
    subscribed name whose mailbox is gone is listed too (the server keeps it, §6.3.6), as
    ``\\Noselect``: it cannot be selected (§7.2.2; Dovecot 2.3 answers ``()`` there)."""
    delimiter = b'"' + DELIMITER.encode() + b'"'
    if cmd.pattern == "":
        await s.emit(b"* LSUB (\\Noselect) " + delimiter + b' ""\r\n')
        return await s.complete(cmd)
    pattern = listing.canonical_pattern(cmd.reference, cmd.pattern)
    if len(pattern) > listing.MAX_PATTERN:
        raise MailStoreError(r.NO_PATTERN_TOO_LONG.text, r.NO_PATTERN_TOO_LONG.code)
    mail = s.require_mail()
    existing = {b.name for b in await mail.mailboxes()}
    for name, noselect in listing.lsub_names(await mail.subscriptions(), pattern, DELIMITER):
        attrs = b"(\\Noselect)" if noselect or name not in existing else b"()"
        await s.emit(b"* LSUB " + attrs + b" " + delimiter + b" " + s.quote(name) + b"\r\n")
    return await s.complete(cmd)


def _status_line(name: bytes, counts: StatusCounts, items: Sequence[str]) -> bytes:
    """``* STATUS name (item value ...)`` (RFC 3501 §7.2.4), ``name`` quoted, items in the
    client's order."""
    values = {
        "MESSAGES": counts.messages, "RECENT": counts.recent, "UIDNEXT": counts.uidnext,
        "UIDVALIDITY": counts.uidvalidity, "UNSEEN": counts.unseen,
        "APPENDLIMIT": r.APPEND_LIMIT, "HIGHESTMODSEQ": r.modseq_value(counts.highestmodseq),
        "SIZE": counts.size, "DELETED": counts.deleted,
    }
    text = " ".join(f"{item} {values[item]}" for item in items)
    return b"* STATUS " + name + f" ({text})\r\n".encode()


async def status(s: Session, cmd: Status) -> Action:
    counts = await s.require_mail().status(cmd.mailbox, "SIZE" in cmd.items)
    if "HIGHESTMODSEQ" in cmd.items:
        s.condstore = True  # a CONDSTORE-enabling command (RFC 7162 §3.1)
    await s.emit(_status_line(s.quote(cmd.mailbox), counts, cmd.items))
    return await s.complete(cmd)


async def append(s: Session, cmd: Append) -> Action:
    """APPEND (RFC 3501 §6.3.11) with APPENDUID (RFC 4315 §3)."""
    if not cmd.message:
        await s.emit(r.NO_EMPTY_MESSAGE.tagged(cmd.tag))
        return Action.NONE
    if b"\x00" in cmd.message and not cmd.binary:  # RFC 3501 §4.3: CHAR8, NUL excluded
        # (a literal8, ``~{n}``, may carry NUL: RFC 3516 §4.4)
        await s.emit(r.NO_NUL_IN_MESSAGE.tagged(cmd.tag))
        return Action.NONE
    bits, keywords = split_flags(cmd.flags)
    mailbox_id, uidvalidity, uid, modseq = await s.require_mail().append(
        cmd.mailbox, cmd.message, bits, keywords, cmd.date)
    s.watcher.touched(mailbox_id, modseq)
    s.audit_patient("imap.append", {"mailbox": mailbox_id, "uid": uid})
    return await s.complete(cmd, f"APPENDUID {uidvalidity} {uid}")


async def namespace(s: Session, cmd: Namespace) -> Action:
    await s.emit(b'* NAMESPACE (("" "' + DELIMITER.encode() + b'")) NIL NIL\r\n')
    return await s.complete(cmd)


async def _list(s: Session, cmd: List) -> None:
    """LIST (RFC 3501 §6.3.8) with RFC 5258's selection and return options: SUBSCRIBED,
    REMOTE (no remote mailboxes here), RECURSIVEMATCH with CHILDINFO, CHILDREN; RFC 6154
    SPECIAL-USE; RFC 5819 STATUS, an untagged STATUS after each selectable mailbox's LIST
    line, all counted in one query.

    A name that is no mailbox (a parent implied by a mailbox below it, or a name listed only
    for its CHILDINFO) is ``\\Noselect`` to a basic LIST and ``\\NonExistent`` (which implies
    ``\\Noselect``) to an extended one, as RFC 3501 clients do not know the latter. Under
    the SUBSCRIBED selection, a subscribed name whose mailbox is gone is listed as
    ``\\NonExistent \\Subscribed`` (RFC 5258 §3.1 and §5 example 2)."""
    delimiter = b'"' + DELIMITER.encode() + b'"'
    patterns = tuple(dict.fromkeys(cmd.patterns))  # a pattern given twice lists the same
    if patterns == ("",):
        await s.emit(b"* LIST (\\Noselect) " + delimiter + b' ""\r\n')
        return
    if len(patterns) > listing.MAX_PATTERNS:
        raise MailStoreError(r.NO_TOO_MANY_PATTERNS.text, r.NO_TOO_MANY_PATTERNS.code)
    if any(len(cmd.reference) + len(p) > listing.MAX_PATTERN for p in patterns):
        raise MailStoreError(r.NO_PATTERN_TOO_LONG.text, r.NO_PATTERN_TOO_LONG.code)
    mail = s.require_mail()
    boxes = {b.name: b for b in await mail.mailboxes()}
    selection = cmd.selection_options
    subscribed_only = "SUBSCRIBED" in selection
    special_only = "SPECIAL-USE" in selection
    show_subscribed = subscribed_only or "SUBSCRIBED" in cmd.return_options
    subscribed = set(await mail.subscriptions()) if show_subscribed else set()
    names = listing.with_parents(boxes)
    # \HasChildren counts mailboxes only, not the subscribed names of deleted ones
    children = listing.parents(names)
    if subscribed_only:
        for name in listing.with_parents(subscribed - boxes.keys()):
            names.setdefault(name, False)  # a gone mailbox, or a parent implied by one
    # RFC 5258 §3.5: CHILDINFO names the selection criteria a descendant meets
    childinfo = b" (\"CHILDINFO\" (" + b" ".join(
        b'"' + option.encode() + b'"' for option in selection
        if option in ("SUBSCRIBED", "SPECIAL-USE")) + b"))"

    def meets(name: str) -> bool:
        box = boxes.get(name)
        if subscribed_only and name not in subscribed:
            return False
        return not special_only or (box is not None and box.special_use is not None)

    listed = listing.list_names(
        names, [listing.canonical_pattern(cmd.reference, p) for p in patterns],
        meets, "RECURSIVEMATCH" in selection, DELIMITER, children)
    counts: dict[int, StatusCounts] = {}
    if cmd.status_items:
        if "HIGHESTMODSEQ" in cmd.status_items:
            s.condstore = True  # as STATUS HIGHESTMODSEQ (RFC 7162 §3.1)
        counts = await mail.statuses([boxes[item.name].id for item in listed if item.exists],
                                     "SIZE" in cmd.status_items)
    for item in listed:
        box = boxes.get(item.name)
        attrs: list[str] = []
        if box is None:
            attrs.append("\\NonExistent" if cmd.extended else "\\Noselect")
        attrs.append("\\HasChildren" if item.has_children else "\\HasNoChildren")
        if box is not None and box.special_use:
            attrs.append(box.special_use)
        if item.name in subscribed:
            attrs.append("\\Subscribed")
        quoted = s.quote(item.name)
        await s.emit(b"* LIST (" + " ".join(attrs).encode() + b") " + delimiter + b" "
                     + quoted + (childinfo if item.childinfo else b"") + b"\r\n")
        found = None if box is None else counts.get(box.id)
        if found is not None:  # RFC 5819 §2: not for \Noselect or \NonExistent names
            await s.emit(_status_line(quoted, found, cmd.status_items))
