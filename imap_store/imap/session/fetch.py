"""FETCH and STORE (RFC 3501 §6.4.5-6.4.6, §7.4.2): message data from the rows of the store,
the stored body only for body sections; FETCH of flags alone from the indexes."""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from imap_store.imap import responses as r
from imap_store.imap.commands import MAX_NUMBER, Fetch, FetchAttr, SequenceSet, Store
from imap_store.imap.session.selected import announce_keywords, own_change
from imap_store.imap.session.state import Action, Selected
from imap_store.imap.wire import render_bodystructure, render_envelope
from imap_store.mime import binary_refused, binary_section, get_section, parse_message_async
from imap_store.store.mailboxes import (
    SYSTEM_FLAG_BITS,
    FlagState,
    MailStore,
    MailStoreError,
    MessageRow,
    merge_ranges,
)

if TYPE_CHECKING:
    from imap_store.imap.session.core import Session

#: Message bodies read in one query by FETCH (at least one message per query).
BODY_BATCH_BYTES = 8 * 1024 * 1024
#: FETCH items answered by :func:`_fetch_flags`: the line format and its arguments (0: seq,
#: flags, UID; 1: seq, UID, flags; 2: seq, flags; 3: seq, UID).
_FLAG_FETCHES: dict[tuple[str, ...], tuple[bytes, int]] = {
    ("FLAGS", "UID"): (b"* %d FETCH (FLAGS %b UID %d)\r\n", 0),
    ("UID", "FLAGS"): (b"* %d FETCH (UID %d FLAGS %b)\r\n", 1),
    ("FLAGS",): (b"* %d FETCH (FLAGS %b)\r\n", 2),
    ("UID",): (b"* %d FETCH (UID %d)\r\n", 3),
}
#: Sections of the top-level header: FETCH reads only the header bytes of the blob.
_HEADER_SECTIONS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT"})
_SEEN = SYSTEM_FLAG_BITS["\\Seen"]


def split_flags(flags: Sequence[str]) -> tuple[int, list[str]]:
    """System flag bits and keywords of a flag list (``\\Recent`` cannot be set)."""
    bits = 0
    keywords: list[str] = []
    for flag in flags:
        if flag in SYSTEM_FLAG_BITS:
            bits |= SYSTEM_FLAG_BITS[flag]
        elif not flag.startswith("\\"):
            keywords.append(flag)
    return bits, keywords


async def store(s: Session, cmd: Store) -> Action:
    sel = s.require_selected()
    if sel.readonly:
        raise MailStoreError(r.NO_READ_ONLY.text, r.NO_READ_ONLY.code)
    targets = sel.targets(cmd.seq_set, cmd.uid)
    if targets is None:
        await s.bad_reply(cmd.tag, r.BAD_SEQUENCE)
        return Action.NONE
    bits, keywords = split_flags(cmd.flags)
    if cmd.unchangedsince is not None:
        s.condstore = True  # a CONDSTORE-enabling command (RFC 7162 §3.1)
    modified: list[int] = []
    if targets:
        modseq, states = await s.require_mail().store_flags(
            sel.mailbox_id, [uid for _seq, uid in targets], str(cmd.mode), bits, keywords,
            cmd.unchangedsince, modified)
        own_change(s, sel, modseq)
        await announce_keywords(s, sel, (state.keywords for state in states))
        for state in states:
            seq = sel.seq_of(state.uid)
            if not seq:
                continue
            uid_item = b"UID %d " % state.uid if cmd.uid else b""
            if not cmd.silent:
                flags = r.render_flags(state.flags, state.keywords, sel.is_recent(state.uid))
                mod = b" MODSEQ (%d)" % state.modseq if s.condstore else b""
                await s.emit(b"* %d FETCH (%sFLAGS %s%s)\r\n" % (seq, uid_item, flags, mod))
            elif s.condstore and state.modseq == modseq:
                # RFC 7162 §3.1.3: the new MODSEQ of a changed message, even with .SILENT
                await s.emit(b"* %d FETCH (%sMODSEQ (%d))\r\n" % (seq, uid_item, modseq))
    code = None
    if modified:
        numbers = modified if cmd.uid else [sel.seq_of(uid) for uid in modified]
        code = f"MODIFIED {SequenceSet.from_values(n for n in numbers if n)}"
    return await s.complete(cmd, code, allow_expunge=cmd.uid)


async def fetch(s: Session, cmd: Fetch) -> Action:
    """FETCH (RFC 3501 §6.4.5): rows for flags, dates, sizes, envelope and structure;
    the stored body only for body sections."""
    sel = s.require_selected()
    if sel.targets(cmd.seq_set, cmd.uid, build=False) is None:
        await s.bad_reply(cmd.tag, r.BAD_SEQUENCE)
        return Action.NONE
    attrs = list(cmd.attributes)
    if cmd.uid and not any(a.name == "UID" and a.section is None for a in attrs):
        attrs.insert(0, FetchAttr("UID"))
    if cmd.changedsince is not None or any(a.name == "MODSEQ" for a in attrs):
        s.condstore = True  # CONDSTORE-enabling (RFC 7162 §3.1)
    if s.condstore and not any(a.name == "MODSEQ" for a in attrs) and (
            cmd.changedsince is not None or any(a.name == "FLAGS" for a in attrs)):
        attrs.append(FetchAttr("MODSEQ"))  # RFC 7162 §3.1.4.1, §3.2 (FLAGS with MODSEQ)
    if cmd.vanished and cmd.changedsince is not None:
        if not s.qresync:
            return await s.bad_reply(cmd.tag, r.BAD_QRESYNC_NOT_ENABLED)
        # ``*`` reaches every UID ever given (an expunged last message is above the view's)
        gone = await s.require_mail().vanished(
            sel.mailbox_id, cmd.changedsince,
            merge_ranges(part.bounds(MAX_NUMBER) for part in cmd.seq_set.ranges))
        if gone:
            await s.emit(b"* VANISHED (EARLIER) %s\r\n"
                         % str(SequenceSet.from_values(gone)).encode())
    names = tuple(a.name if a.section is None else "" for a in attrs)
    if names in _FLAG_FETCHES:
        slices = sel.slices(cmd.seq_set, cmd.uid)
        if slices:
            await _fetch_flags(s, sel, slices, *_FLAG_FETCHES[names])
    else:
        await _fetch_rows(s, sel, cmd, attrs)
    return await s.complete(cmd, allow_expunge=cmd.uid)


async def _fetch_rows(s: Session, sel: Selected, cmd: Fetch, attrs: list[FetchAttr]) -> None:
    targets = sel.targets(cmd.seq_set, cmd.uid)
    if not targets:
        return
    mail = s.require_mail()
    await _check_binary(mail, sel, [uid for _seq, uid in targets], attrs)
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
        elif attr.name == "MODSEQ":
            columns.add("modseq")
        elif attr.name in ("ENVELOPE", "BODY", "BODYSTRUCTURE"):
            columns.add("meta")
            reads = True
    uids = [uid for _seq, uid in targets]
    seen_now: dict[int, FlagState] = {}
    if not sel.readonly and any(a.sets_seen for a in attrs):
        modseq, states = await mail.store_flags(sel.mailbox_id, uids, "+FLAGS", _SEEN, ())
        own_change(s, sel, modseq)
        seen_now = {state.uid: state for state in states if state.modseq == modseq}
        await announce_keywords(s, sel, (state.keywords for state in seen_now.values()))
    if cmd.changedsince is not None:
        columns.add("modseq")
    rows = await mail.fetch_rows(sel.mailbox_id, uids, columns)
    if cmd.changedsince is not None:
        since = cmd.changedsince
        rows = [row for row in rows if (seen_now.get(row.uid) or row).modseq > since]
    by_uid = {row.uid: row for row in rows}
    if "keywords" in columns:
        await announce_keywords(s, sel, (row.keywords for row in rows))
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
                bodies = await mail.bodies(sel.mailbox_id, batch, header_only=header_only)
            body = bodies.get(uid)
            if body is None:
                continue
            raw = body
        meta = await _meta(mail, sel, uid, row.meta) if "meta" in columns else None
        await s.emit(_render_fetch(sel, seq, uid, row, attrs, raw, meta, seen_now.get(uid)))
    if reads:
        s.audit_patient("imap.read", {"mailbox": sel.mailbox_id, "messages": len(by_uid)})


async def _check_binary(mail: MailStore, sel: Selected, uids: list[int],
                        attrs: list[FetchAttr]) -> None:
    """RFC 3516 §4.2: a BINARY section whose Content-Transfer-Encoding the server does not
    know answers the command with NO [UNKNOWN-CTE]. Checked for every message of the set
    before anything is sent or any \\Seen set, from the stored body structures (no body is
    read), so that the NO answers the whole command rather than following the FETCH lines of
    the messages before the refused one. Every message of the set is checked, also one that
    CHANGEDSINCE would leave out. (The render keeps its own check: a multipart part with
    an encoding header, which the body structure does not record, is refused there.)"""
    parts = {a.section.part for a in attrs
             if a.name in ("BINARY", "BINARY.SIZE") and a.section is not None and a.section.part}
    if not parts:
        return
    for row in await mail.fetch_rows(sel.mailbox_id, uids, ("meta",)):
        structure = (await _meta(mail, sel, row.uid, row.meta)).get("bodystructure") or {}
        if any(binary_refused(structure, part) for part in parts):
            raise MailStoreError(r.NO_UNKNOWN_CTE.text, r.NO_UNKNOWN_CTE.code)


async def _fetch_flags(s: Session, sel: Selected, slices: list[tuple[int, int]],
                       line: bytes, form: int) -> None:
    """FETCH of FLAGS and UID only (``FETCH 1:* (FLAGS UID)`` at every resync), for the
    view's index ``slices`` ``[start, end)``: the flags from the index only, each distinct
    flag set rendered once, no per-message object beyond the database row."""
    uids = sel.uids
    count = len(uids)
    rows, keywords = await s.require_mail().flag_rows(
        sel.mailbox_id, [(uids[start], uids[end - 1]) for start, end in slices])
    if keywords:
        await announce_keywords(s, sel, keywords.values())
    recent = sel.recent
    rendered: dict[int | tuple[int, str, bool], bytes] = {}
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
        key = (flags, kw, is_recent) if kw or is_recent else flags
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
            await s.emit(b"".join(lines))
            lines.clear()
    if lines:
        await s.emit(b"".join(lines))


def stored_meta(text: str | None) -> dict[str, Any] | None:
    """The stored ``meta`` (JSON) of a message; None when there is none or it is invalid."""
    if text:
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if isinstance(value, dict):
            return value
    return None


async def _meta(mail: MailStore, sel: Selected, uid: int, text: str | None) -> dict[str, Any]:
    """The stored ``meta`` of a message, or its parse when there is none (or it is invalid)."""
    meta = stored_meta(text)
    if meta is not None:
        return meta
    raw = await mail.body(sel.mailbox_id, uid) or b""
    return (await parse_message_async(raw)).to_dict()


def _render_fetch(sel: Selected, seq: int, uid: int, row: MessageRow, attrs: list[FetchAttr],
                  raw: bytes, meta: dict[str, Any] | None, seen: FlagState | None) -> bytes:
    """One ``* n FETCH (...)`` response from a row (and the body when a section is asked)."""
    parts: list[bytes] = []
    flags_sent = False
    for attr in attrs:
        name = attr.name
        if attr.section is not None:
            section = attr.section
            literal = r.literal
            if name == "BODY":
                data = get_section(raw, section.part, section.text, section.fields)
            else:  # BINARY[...] and BINARY.SIZE[...] (RFC 3516 §4.2)
                decoded = binary_section(raw, section.part)
                if decoded is None:
                    raise MailStoreError(r.NO_UNKNOWN_CTE.text, r.NO_UNKNOWN_CTE.code)
                if name == "BINARY.SIZE":
                    parts.append(b"%s %d" % (attr.response_name().encode(), len(decoded)))
                    continue
                data, literal = decoded, r.literal8
            if attr.partial is not None:
                origin, length = attr.partial
                data = data[origin : origin + length]
            parts.append(attr.response_name().encode("ascii", "replace") + b" "
                         + literal(data))
        elif name == "UID":
            parts.append(b"UID %d" % uid)
        elif name == "FLAGS":
            flags, keywords = (seen.flags, seen.keywords) if seen else (row.flags, row.keywords)
            parts.append(b"FLAGS " + r.render_flags(flags, keywords, sel.is_recent(uid)))
            flags_sent = True
        elif name == "INTERNALDATE":
            assert row.internal_date is not None  # read: INTERNALDATE was asked for
            parts.append(b"INTERNALDATE " + r.render_date(row.internal_date))
        elif name == "RFC822.SIZE":
            parts.append(b"RFC822.SIZE %d" % row.size)
        elif name == "MODSEQ":
            parts.append(b"MODSEQ (%d)" % (seen.modseq if seen else row.modseq))
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
