"""COPY and MOVE (RFC 3501 §6.4.7, RFC 6851) with COPYUID (RFC 4315 §3)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from imap_store.imap import responses as r
from imap_store.imap.commands import Copy, Move, SequenceSet
from imap_store.imap.session.selected import own_change, send_expunges
from imap_store.imap.session.state import Action
from imap_store.store.mailboxes import MailStoreError, TryCreate

if TYPE_CHECKING:
    from imap_store.imap.session.core import Session


async def copy(s: Session, cmd: Copy) -> Action:
    return await _copy(s, cmd, move=False)


async def move(s: Session, cmd: Move) -> Action:
    return await _copy(s, cmd, move=True)


async def _copy(s: Session, cmd: Copy | Move, *, move: bool) -> Action:
    sel = s.require_selected()
    if move and sel.readonly:
        raise MailStoreError(r.NO_READ_ONLY.text, r.NO_READ_ONLY.code)
    targets = sel.targets(cmd.seq_set, cmd.uid)
    if targets is None:
        await s.bad_reply(cmd.tag, r.BAD_SEQUENCE)
        return Action.NONE
    mail = s.require_mail()
    if not targets:
        if await mail.mailbox(cmd.mailbox) is None:
            raise TryCreate()
        return await s.complete(cmd)
    result = await mail.copy(sel.mailbox_id, [u for _s, u in targets], cmd.mailbox, move)
    s.watcher.touched(result.mailbox_id, result.modseq)
    s.audit_patient("imap.move" if move else "imap.copy",
                    {"mailbox": sel.mailbox_id, "messages": len(result.pairs)})
    if not result.pairs:
        return await s.complete(cmd)
    sources = SequenceSet.from_values(p[0] for p in result.pairs)
    copies = SequenceSet.from_values(p[1] for p in result.pairs)
    code = f"COPYUID {result.uidvalidity} {sources} {copies}"
    if not move:
        return await s.complete(cmd, code)
    await s.emit(f"* OK [{code}] Moved\r\n".encode())
    own_change(s, sel, result.expunge_modseq)
    await send_expunges(s, sel, [p[0] for p in result.pairs])
    return await s.complete(cmd)
