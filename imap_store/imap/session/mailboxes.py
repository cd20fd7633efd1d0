"""Mailbox commands of the authenticated state (RFC 3501 §6.3): CREATE, DELETE, RENAME,
SUBSCRIBE, UNSUBSCRIBE, LIST (RFC 3348 CHILDREN, RFC 5258 selection, RFC 6154 SPECIAL-USE),
LSUB, STATUS, APPEND (RFC 4315 APPENDUID), NAMESPACE (RFC 2342)."""

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
from imap_store.store.mailboxes import DELIMITER, MailStoreError

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
    await _list(s, cmd.reference, cmd.patterns, cmd.selection_options, cmd.return_options)
    return await s.complete(cmd)


async def lsub(s: Session, cmd: Lsub) -> Action:
    """LSUB (RFC 3501 §6.3.9): the subscribed names the pattern matches; where ``%`` stops
    above a subscribed name, its unsubscribed ancestor at that level, as ``\\Noselect``."""
    delimiter = b'"' + DELIMITER.encode() + b'"'
    if cmd.pattern == "":
        await s.emit(b"* LSUB (\\Noselect) " + delimiter + b' ""\r\n')
        return await s.complete(cmd)
    pattern = listing.canonical_pattern(cmd.reference, cmd.pattern)
    if len(pattern) > listing.MAX_PATTERN:
        raise MailStoreError(r.NO_PATTERN_TOO_LONG.text, r.NO_PATTERN_TOO_LONG.code)
    subscribed = [b.name for b in await s.require_mail().mailboxes() if b.subscribed]
    for name, noselect in listing.lsub_names(subscribed, pattern, DELIMITER):
        attrs = b"(\\Noselect)" if noselect else b"()"
        await s.emit(b"* LSUB " + attrs + b" " + delimiter + b" " + r.quote(name) + b"\r\n")
    return await s.complete(cmd)


async def status(s: Session, cmd: Status) -> Action:
    counts = await s.require_mail().status(cmd.mailbox)
    values = {
        "MESSAGES": counts.messages, "RECENT": counts.recent, "UIDNEXT": counts.uidnext,
        "UIDVALIDITY": counts.uidvalidity, "UNSEEN": counts.unseen,
        "APPENDLIMIT": r.APPEND_LIMIT, "HIGHESTMODSEQ": r.modseq_value(counts.highestmodseq),
    }
    if "HIGHESTMODSEQ" in cmd.items:
        s.condstore = True  # a CONDSTORE-enabling command (RFC 7162 §3.1)
    items = " ".join(f"{item} {values[item]}" for item in cmd.items)
    await s.emit(b"* STATUS " + r.quote(cmd.mailbox) + f" ({items})\r\n".encode())
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


async def _list(s: Session, reference: str, patterns: Sequence[str], selection: Sequence[str],
                returns: Sequence[str]) -> None:
    """LIST with wildcards, CHILDREN and SPECIAL-USE attributes (RFC 3501 §6.3.8,
    RFC 3348, RFC 6154 §2)."""
    verb = b"LIST"
    delimiter = b'"' + DELIMITER.encode() + b'"'
    if len(patterns) == 1 and patterns[0] == "":
        await s.emit(b"* " + verb + b" (\\Noselect) " + delimiter + b' ""\r\n')
        return
    if any(len(reference) + len(p) > listing.MAX_PATTERN for p in patterns):
        raise MailStoreError(r.NO_PATTERN_TOO_LONG.text, r.NO_PATTERN_TOO_LONG.code)
    boxes = {b.name: b for b in await s.require_mail().mailboxes()}
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
        attrs.append("\\HasChildren" if name in parents else "\\HasNoChildren")
        if box is not None and box.special_use:
            attrs.append(box.special_use)
        if show_subscribed and box is not None and box.subscribed:
            attrs.append("\\Subscribed")
        await s.emit(b"* " + verb + b" (" + " ".join(attrs).encode() + b") "
                     + delimiter + b" " + r.quote(name) + b"\r\n")
