"""SEARCH (RFC 3501 §6.4.4): the parsed keys become a store query (:data:`Match`), with what
only this session knows resolved against its view (sequence numbers, ``*``, \\Recent become
UID ranges); the store decides it (in SQL, the rest in Python) and returns UIDs, which are
answered as UIDs or as sequence numbers of the view."""

from __future__ import annotations

from bisect import bisect_left
from typing import TYPE_CHECKING

from imap_store.imap.commands import (
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
)
from imap_store.imap.session.state import Action, Selected
from imap_store.store.mailboxes import (
    Match,
    MatchAll,
    MatchAnd,
    MatchBody,
    MatchFlag,
    MatchHeader,
    MatchInternalDate,
    MatchLarger,
    MatchNot,
    MatchOr,
    MatchSentDate,
    MatchSmaller,
    MatchText,
    MatchUids,
    merge_ranges,
)

if TYPE_CHECKING:
    from imap_store.imap.session.core import Session


async def search(s: Session, cmd: Search) -> Action:
    sel = s.require_selected()
    result = await s.require_mail().search(sel.mailbox_id, query(cmd.criteria, sel))
    view, count, by_uid = sel.uids, len(sel.uids), cmd.uid
    found: list[int] = []
    for uid in result.uids:
        position = bisect_left(view, uid)
        if position == count or view[position] != uid:
            continue  # not (or no longer) in this session's view
        found.append(uid if by_uid else position + 1)
    await s.emit(b"* SEARCH" + b"".join(b" %d" % n for n in found) + b"\r\n")
    if result.bodies and found:
        s.audit_patient("imap.search", {"mailbox": sel.mailbox_id, "messages": len(found)})
    return await s.complete(cmd, allow_expunge=cmd.uid)


def query(key: SearchKey, sel: Selected) -> Match:
    """``key`` as a store query on the messages of ``sel``'s view."""
    match key:
        case SearchAnd(keys):
            return MatchAnd(tuple(query(k, sel) for k in keys))
        case SearchOr(left, right):
            return MatchOr(query(left, sel), query(right, sel))
        case SearchNot(inner):
            return MatchNot(query(inner, sel))
        case SearchAll():
            return MatchAll()
        case SearchFlag("\\Recent", present):
            recent = MatchUids(tuple(merge_ranges((low + 1, high) for low, high in sel.recent)))
            return recent if present else MatchNot(recent)
        case SearchFlag(flag, present):
            return MatchFlag(flag, present)
        case SearchUid(seq_set):
            highest = sel.uids[-1] if sel.uids else 0
            return MatchUids(tuple(merge_ranges(part.bounds(highest) for part in seq_set.ranges)))
        case SearchSequence(seq_set):
            uids, count = sel.uids, len(sel.uids)
            ranges = []
            for low, high in merge_ranges(part.bounds(count) for part in seq_set.ranges):
                low, high = max(low, 1), min(high, count)
                if low <= high:
                    ranges.append((uids[low - 1], uids[high - 1]))
            return MatchUids(tuple(ranges))
        case SearchHeader(field, value):
            return MatchHeader(field.lower(), value)
        case SearchBody(value):
            return MatchBody(value)
        case SearchText(value):
            return MatchText(value)
        case SearchInternalDate(relation, day):
            return MatchInternalDate(relation.value, day)
        case SearchSentDate(relation, day):
            return MatchSentDate(relation.value, day)
        case SearchLarger(size):
            return MatchLarger(size)
        case SearchSmaller(size):
            return MatchSmaller(size)
