"""Selecting a mailbox and following it (RFC 3501 §6.3.1-6.3.2, §6.4.2-6.4.3, §7.3-7.4,
RFC 3691 UNSELECT, RFC 4315 UID EXPUNGE, RFC 2177 IDLE): SELECT/EXAMINE, CLOSE, UNSELECT,
EXPUNGE, IDLE, and the report of other sessions' changes (:func:`sync`)."""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from imap_store.imap import responses as r
from imap_store.imap.commands import (
    MAX_NUMBER,
    Close,
    Expunge,
    Idle,
    Select,
    SequenceSet,
    Unselect,
)
from imap_store.imap.session.state import Action, Selected, State
from imap_store.store.mailboxes import DELIMITER, MailStoreError, merge_ranges

if TYPE_CHECKING:
    from imap_store.imap.session.core import Session


async def select(s: Session, cmd: Select) -> Action:
    """SELECT and EXAMINE (``cmd.readonly``), with the CONDSTORE and QRESYNC parameters
    (RFC 7162 §3.1.8, §3.2.5). With QRESYNC enabled or under IMAP4rev2: ``OK [CLOSED]`` when
    a mailbox was selected (RFC 7162 §3.2.11, RFC 9051 §6.3.2). Under IMAP4rev2: the mailbox's
    ``LIST``, no ``RECENT``, no ``UNSEEN`` code, and no
    message claimed as \\Recent (rev2 has no \\Recent: the messages stay new for rev1)."""
    if cmd.qresync is not None and not s.qresync:
        return await s.bad_reply(cmd.tag, r.BAD_QRESYNC_NOT_ENABLED)
    if cmd.condstore:
        s.condstore = True
    if (s.rev2 or s.qresync) and s.selected is not None:  # RFC 9051 §6.3.2, RFC 7162 §3.2.11
        await s.emit(b"* OK [CLOSED] Previous mailbox closed\r\n")
    s.unselect()
    mail = s.require_mail()
    view = await mail.open(cmd.mailbox)
    if view is None:
        await s.emit(r.NO_NONEXISTENT.tagged(cmd.tag))
        return Action.NONE
    info = view.mailbox
    sel = Selected(info.id, info.name, cmd.readonly, info.uidvalidity, view.uids,
                   info.highestmodseq, keywords=set(view.keywords))
    last = view.uids[-1] if view.uids else 0
    if not s.rev2 and info.recent_uid < last and (cmd.readonly or await mail.claim_recent(
        info.id, info.recent_uid, last
    )):
        # EXAMINE shows the messages no session has claimed as \Recent without claiming
        # them: the next SELECT still gets them (RFC 3501 §6.3.2 changes no state).
        sel.recent.append((info.recent_uid, last))
    s.selected = sel
    s.state = State.SELECTED
    s.watcher.watch(info.id, info.highestmodseq, s.listener)
    await emit_flags(s, sel)
    if s.rev2:  # the LIST of the mailbox, its special use as its attribute (RFC 6154 §2)
        await s.emit(b"* %d EXISTS\r\n* LIST (%s) \"%s\" %s\r\n" % (
            len(sel.uids), (info.special_use or "").encode(), DELIMITER.encode(),
            s.quote(info.name)))
    else:
        await s.emit(b"* %d EXISTS\r\n* %d RECENT\r\n" % (len(sel.uids), sel.recent_count()))
        if view.first_unseen:
            await s.emit(b"* OK [UNSEEN %d] First unseen\r\n" % view.first_unseen)
    await s.emit(b"* OK [UIDVALIDITY %d] UIDs valid\r\n" % info.uidvalidity)
    await s.emit(b"* OK [UIDNEXT %d] Predicted next UID\r\n" % info.uidnext)
    await s.emit(b"* OK [HIGHESTMODSEQ %d] Highest\r\n" % r.modseq_value(info.highestmodseq))
    if cmd.qresync is not None and cmd.qresync.uidvalidity == info.uidvalidity:
        await _resync(s, sel, cmd.qresync.modseq, cmd.qresync.known_uids)
    mode = "READ-ONLY" if cmd.readonly else "READ-WRITE"
    await s.emit(f"{cmd.tag} OK [{mode}] {cmd.name} completed\r\n".encode())
    return Action.NONE


async def _resync(s: Session, sel: Selected, since: int, known: SequenceSet | None) -> None:
    """QRESYNC (RFC 7162 §3.2.5.1): the known UIDs expunged since ``since`` as one
    ``VANISHED (EARLIER)``, then a FETCH of UID, FLAGS and MODSEQ for every message changed
    since. Exact unless ``since`` predates expunges the housekeeping forgot: then a superset
    (``PatientMailStore.vanished``)."""
    mail = s.require_mail()
    ranges = None
    if known is not None:  # ``*``: every UID ever given (the last ones may be expunged)
        ranges = merge_ranges(part.bounds(MAX_NUMBER) for part in known.ranges)
    gone = await mail.vanished(sel.mailbox_id, since, ranges)
    if gone:
        await s.emit(b"* VANISHED (EARLIER) %s\r\n" % str(SequenceSet.from_values(gone)).encode())
    if not sel.uids:
        return
    rows = await mail.fetch_rows(sel.mailbox_id, sel.uids, ("flags", "keywords", "modseq"))
    changed = [row for row in rows if row.modseq > since]
    await announce_keywords(s, sel, (row.keywords for row in changed))
    for row in changed:
        seq = sel.seq_of(row.uid)
        if seq:
            await s.emit(b"* %d FETCH (UID %d FLAGS %s MODSEQ (%d))\r\n" % (
                seq, row.uid, r.render_flags(row.flags, row.keywords, sel.is_recent(row.uid)),
                row.modseq))


async def emit_flags(s: Session, sel: Selected) -> None:
    """``FLAGS`` and ``OK [PERMANENTFLAGS]`` with the keywords announced to this session."""
    keywords = b"".join(b" " + k.encode("ascii", "replace") for k in sorted(sel.keywords))
    await s.emit(b"* FLAGS (" + r.SYSTEM_FLAGS_TEXT + keywords + b")\r\n")
    if sel.readonly:
        await s.emit(b"* OK [PERMANENTFLAGS ()] Read-only mailbox\r\n")
    else:
        await s.emit(b"* OK [PERMANENTFLAGS (" + r.SYSTEM_FLAGS_TEXT + keywords
                     + b" \\*)] Flags permitted\r\n")


async def announce_keywords(s: Session, sel: Selected, texts: Iterable[str]) -> None:
    """Before any FETCH shows a keyword this session was not told of, a new ``FLAGS`` (and
    ``PERMANENTFLAGS``): a client's flag list must hold every flag it is shown (RFC 3501
    §7.2.6). ``texts``: space-separated keyword lists, as stored."""
    known = sel.keywords
    new = {k for text in texts if text for k in text.split() if k not in known}
    if new:
        known.update(new)
        await emit_flags(s, sel)


async def close(s: Session, cmd: Close) -> Action:
    """CLOSE: expunge silently (unless read-only), then leave the selected state."""
    sel = s.require_selected()
    if not sel.readonly:
        modseq, _uids = await s.require_mail().expunge(sel.mailbox_id)
        if modseq:
            s.watcher.touched(sel.mailbox_id, modseq)
    s.unselect()
    return await s.complete(cmd)


async def unselect(s: Session, cmd: Unselect) -> Action:
    s.unselect()
    return await s.complete(cmd)


async def expunge(s: Session, cmd: Expunge) -> Action:
    """EXPUNGE, or UID EXPUNGE of the messages of ``cmd.uid_set`` only."""
    sel = s.require_selected()
    if sel.readonly:
        raise MailStoreError(r.NO_READ_ONLY.text, r.NO_READ_ONLY.code)
    ranges = None
    if cmd.uid_set is not None and cmd.uid_set.saved:
        ranges = sel.saved_uid_ranges()  # ``$`` (RFC 5182 §2.1)
    elif cmd.uid_set is not None:
        ranges = merge_ranges(part.bounds(sel.uids[-1] if sel.uids else 0)
                              for part in cmd.uid_set.ranges)
    modseq, uids = await s.require_mail().expunge(sel.mailbox_id, ranges)
    if uids:
        own_change(s, sel, modseq)
        await send_expunges(s, sel, uids)
        s.audit_patient("imap.expunge", {"mailbox": sel.mailbox_id, "messages": len(uids)})
    return await s.complete(cmd)


async def idle(s: Session, cmd: Idle) -> Action:
    await s.emit(b"+ idling\r\n")
    s.idle_tag = cmd.tag
    await sync(s, allow_expunge=True)
    return Action.EXPECT_LINE


async def idle_done(s: Session, tag: str, line: bytes) -> Action:
    """The line that ends IDLE: ``DONE``, anything else is BAD."""
    if line.strip().upper() != b"DONE":
        return await s.bad_reply(tag, r.BAD_EXPECTED_DONE)
    if s.selected is not None:
        await sync(s, allow_expunge=True)
    await s.emit(r.Reply("OK", "IDLE terminated").tagged(tag))
    return Action.NONE


# --------------------------------------------------------------------------- changes


async def sync(s: Session, *, allow_expunge: bool, force: bool = False) -> None:
    """Report other sessions' changes: EXPUNGE (when allowed), EXISTS, RECENT, FETCH."""
    sel = s.selected
    if sel is None:
        return
    if not force and s.watcher.latest(sel.mailbox_id) <= sel.modseq:
        if allow_expunge and sel.pending_expunge:
            await send_expunges(s, sel, sel.pending_expunge)
            sel.pending_expunge = []
        return
    mail = s.require_mail()
    changes = await mail.changes(sel.mailbox_id, sel.modseq)
    if not changes.exists:
        return
    sel.modseq = changes.highestmodseq
    for uid in changes.expunged:
        if sel.seq_of(uid):
            sel.pending_expunge.append(uid)
    if allow_expunge and sel.pending_expunge:
        await send_expunges(s, sel, sorted(set(sel.pending_expunge)))
        sel.pending_expunge = []
    await announce_keywords(s, sel, (c.keywords for c in changes.changed))
    last = sel.uids[-1] if sel.uids else 0
    new = [c.uid for c in changes.changed if c.uid > last]
    if new:
        sel.uids.extend(new)
        await s.emit(b"* %d EXISTS\r\n" % len(sel.uids))
        if not s.rev2:  # RFC 9051 has no \Recent and no RECENT response
            await _new_recent(s, sel, changes.recent_uid, last, new[-1])
    for change in changes.changed:
        if change.uid > last or change.modseq in sel.own_modseqs:
            continue
        seq = sel.seq_of(change.uid)
        if seq:
            modseq = b" MODSEQ (%d)" % change.modseq if s.condstore else b""
            await s.emit(b"* %d FETCH (UID %d FLAGS %s%s)\r\n" % (
                seq, change.uid,
                r.render_flags(change.flags, change.keywords, sel.is_recent(change.uid)),
                modseq))
    sel.own_modseqs = {m for m in sel.own_modseqs if m > sel.modseq}


async def _new_recent(s: Session, sel: Selected, recent_uid: int, last: int,
                      newest: int) -> None:
    """New messages up to ``newest`` arrived (above ``last``): \\Recent for this session if it
    claims them first, and the ``RECENT`` count (RFC 3501 §7.3.2)."""
    if sel.readonly:  # shown as \Recent, left to a SELECT to claim (see select)
        low = max(recent_uid, last)
        if low < newest:
            sel.recent.append((low, newest))
    elif recent_uid < newest and await s.require_mail().claim_recent(
            sel.mailbox_id, recent_uid, newest):
        sel.recent.append((recent_uid, newest))
    await s.emit(b"* %d RECENT\r\n" % sel.recent_count())


async def send_expunges(s: Session, sel: Selected, uids: Sequence[int]) -> None:
    """``* n EXPUNGE`` for each UID still in the view, ascending (each one shifts the
    following sequence numbers down, RFC 3501 §7.4.1), or one ``* VANISHED uids`` once QRESYNC
    is enabled (RFC 7162 §3.2.10); then drop them from the view."""
    view = sel.uids  # sorted: each UID found by bisection, the rest copied in slices
    found = [i for uid in sorted(set(uids))
             if (i := bisect_left(view, uid)) < len(view) and view[i] == uid]
    kept: array[int] = array("L")
    start = 0
    for n, index in enumerate(found):
        if not s.qresync:
            await s.emit(b"* %d EXPUNGE\r\n" % (index + 1 - n))
        kept.extend(view[start:index])
        start = index + 1
    kept.extend(view[start:])
    removed = [view[i] for i in found]
    if s.qresync and removed:
        await s.emit(b"* VANISHED %s\r\n" % str(SequenceSet.from_values(removed)).encode())
    sel.uids = kept


def own_change(s: Session, sel: Selected, modseq: int) -> None:
    """This session made the change of ``modseq``: not reported back to it, told to others."""
    sel.own_modseqs.add(modseq)
    s.watcher.touched(sel.mailbox_id, modseq)
