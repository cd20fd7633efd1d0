"""SEARCH (RFC 3501 §6.4.4): the parsed keys become a store query (:data:`Match`), with what
only this session knows resolved against its view (sequence numbers, ``*``, \\Recent become
UID ranges); the store decides it (in SQL, the rest in Python) and returns UIDs, which are
answered as UIDs or as sequence numbers of the view."""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

from imap_store.imap import commands as c
from imap_store.imap.session.state import Action, Selected
from imap_store.store.mailboxes import Match, MatchUids, merge_ranges

if TYPE_CHECKING:
    from imap_store.imap.session.core import Session


async def search(s: Session, cmd: c.Search) -> Action:
    """SEARCH, answered by ``* SEARCH``, or ``* ESEARCH`` with RETURN (RFC 4731) and always
    under IMAP4rev2 (RFC 9051 §6.4.4: no RETURN is RETURN (ALL)); RETURN (SAVE) keeps the
    result for ``$`` (RFC 5182 §2.1) and alone answers nothing but the tagged OK."""
    sel = s.require_selected()
    returns = cmd.returns if cmd.returns is not None or not s.rev2 else ("ALL",)
    if returns is not None and "SAVE" in returns:
        sel.saved = []  # RFC 5182 §2.1: a SEARCH that fails leaves an empty result
    result = await s.require_mail().search(sel.mailbox_id, query(cmd.criteria, sel))
    view, count, by_uid = sel.uids, len(sel.uids), cmd.uid
    found: list[int] = []
    for uid in result.uids:
        position = bisect_left(view, uid)
        if position == count or view[position] != uid:
            continue  # not (or no longer) in this session's view
        found.append(uid if by_uid else position + 1)
    highest = 0
    if _uses_modseq(cmd.criteria):
        s.condstore = True  # a CONDSTORE-enabling command (RFC 7162 §3.1)
        if found:  # RFC 7162 §3.1.5: the highest MODSEQ of the messages found
            uids = found if by_uid else [view[n - 1] for n in found]
            rows = await s.require_mail().fetch_rows(sel.mailbox_id, uids, ("modseq",))
            highest = max((row.modseq for row in rows), default=0)
    if returns is not None and "SAVE" in returns:
        uids = found if by_uid else [view[n - 1] for n in found]
        if uids and not {"ALL", "COUNT"} & set(returns) and {"MIN", "MAX"} & set(returns):
            # RFC 5182 §2.1: with MIN and/or MAX only, those messages are what is saved
            ends = {uids[0]} if "MIN" in returns else set()
            uids = sorted(ends | ({uids[-1]} if "MAX" in returns else set()))
        sel.saved = uids
    if returns is not None:
        if returns != ("SAVE",):
            await s.emit(_esearch(cmd, returns, found, highest))
    else:
        modseq = b" (MODSEQ %d)" % highest if highest else b""
        await s.emit(b"* SEARCH" + b"".join(b" %d" % n for n in found) + modseq + b"\r\n")
    if result.bodies and found:
        s.audit_patient("imap.search", {"mailbox": sel.mailbox_id, "messages": len(found)})
    return await s.complete(cmd, allow_expunge=cmd.uid)


def _esearch(cmd: c.Search, returns: tuple[str, ...], found: list[int], highest: int) -> bytes:
    """``* ESEARCH (TAG "t") [UID] ...`` (RFC 4731 §3.1): only the data asked for, none of
    MIN, MAX, ALL when nothing matched; MODSEQ too when the criteria used it (RFC 7162
    §3.1.5)."""
    out = b'* ESEARCH (TAG "%s")' % cmd.tag.encode()
    if cmd.uid:
        out += b" UID"
    if found:
        if "MIN" in returns:
            out += b" MIN %d" % found[0]
        if "MAX" in returns:
            out += b" MAX %d" % found[-1]
    if "COUNT" in returns:
        out += b" COUNT %d" % len(found)
    if found and "ALL" in returns:
        out += b" ALL " + str(c.SequenceSet.from_values(found)).encode()
    if highest:
        out += b" MODSEQ %d" % highest
    return out + b"\r\n"


def _uses_modseq(key: c.SearchKey) -> bool:
    match key:
        case c.SearchModseq():
            return True
        case c.SearchAnd(keys):
            return any(_uses_modseq(k) for k in keys)
        case c.SearchOr(left, right):
            return _uses_modseq(left) or _uses_modseq(right)
        case c.SearchNot(inner):
            return _uses_modseq(inner)
    return False


def query(key: c.SearchKey, sel: Selected) -> Match:
    """``key`` as a store query on the messages of ``sel``'s view."""
    match key:
        case c.SearchAnd(keys):
            return c.SearchAnd(tuple(query(k, sel) for k in keys))
        case c.SearchOr(left, right):
            return c.SearchOr(query(left, sel), query(right, sel))
        case c.SearchNot(inner):
            return c.SearchNot(query(inner, sel))
        case c.SearchFlag("\\Recent", present):
            recent = MatchUids(tuple(merge_ranges((low + 1, high) for low, high in sel.recent)))
            return recent if present else c.SearchNot(recent)
        case c.SearchSet(seq_set) if seq_set.saved:
            return MatchUids(tuple(sel.saved_uid_ranges()))  # ``$`` (RFC 5182 §2.1)
        case c.SearchSet(seq_set, uid=True):
            highest = sel.uids[-1] if sel.uids else 0
            return MatchUids(tuple(merge_ranges(part.bounds(highest) for part in seq_set.ranges)))
        case c.SearchSet(seq_set):
            uids, count = sel.uids, len(sel.uids)
            ranges = []
            for low, high in merge_ranges(part.bounds(count) for part in seq_set.ranges):
                low, high = max(low, 1), min(high, count)
                if low <= high:
                    ranges.append((uids[low - 1], uids[high - 1]))
            return MatchUids(tuple(ranges))
        case _:
            return key  # about the message alone: the store decides it as parsed
