"""The per-message record computed at delivery: :class:`MessageInfo` and :func:`parse_message`."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from imap_store.mime.addresses import (
    _MSGID_RE,
    _WS_RE,
    Address,
    _addr_specs,
    _envelope_of,
    _first_msgid,
    _parse_date,
)
from imap_store.mime.bodystructure import _bs_node, empty_part
from imap_store.mime.headers import _decoded_size, _hval, _l1, _text, decode_rfc2047
from imap_store.mime.sections import _search_text
from imap_store.mime.structure import (
    _build_tree,
    _cte,
    _disposition,
    _Entity,
    _filename,
    _is_attached_message,
    _iter_message_parts,
)

# The name the single module had: log filters and tests rely on it.
log = logging.getLogger("imap_store.mime")

# --------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------


class Attachment(NamedTuple):
    """One attachment: decoded filename, lower-case media type, decoded size."""

    filename: str | None
    content_type: str
    size: int


@dataclass(frozen=True)
class MessageInfo:
    """Everything derived from a message at delivery time.

    ``envelope`` and ``bodystructure`` are JSON-compatible; use
    :func:`imap_store.imap.wire.render_envelope` /
    :func:`imap_store.imap.wire.render_bodystructure` to produce IMAP syntax.
    :meth:`to_dict` / :meth:`from_dict` convert the whole record to and from a
    JSON-compatible dict.
    """

    size: int
    header_size: int
    envelope: list[Any]
    bodystructure: dict[str, Any]
    subject: str
    from_addr: str | None
    to_addrs: list[str]
    cc_addrs: list[str]
    bcc_addrs: list[str]
    reply_to_addrs: list[str]
    message_id: str | None
    in_reply_to: str | None
    references: list[str]
    date: datetime | None
    search_headers: dict[str, str]
    attachments: list[Attachment]
    attachment_parts: list[tuple[int, ...]]
    attachments_total_size: int
    has_attachments: bool
    # Scanned structure kept for text_for_search() right after parsing; it
    # is not part of the stored JSON.
    _tree: _Entity | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible representation (the ``_tree`` cache is dropped)."""
        return {
            "size": self.size,
            "header_size": self.header_size,
            "envelope": self.envelope,
            "bodystructure": self.bodystructure,
            "subject": self.subject,
            "from_addr": self.from_addr,
            "to_addrs": list(self.to_addrs),
            "cc_addrs": list(self.cc_addrs),
            "bcc_addrs": list(self.bcc_addrs),
            "reply_to_addrs": list(self.reply_to_addrs),
            "message_id": self.message_id,
            "in_reply_to": self.in_reply_to,
            "references": list(self.references),
            "date": self.date.isoformat() if self.date is not None else None,
            "search_headers": dict(self.search_headers),
            "attachments": [list(a) for a in self.attachments],
            "attachment_parts": [list(p) for p in self.attachment_parts],
            "attachments_total_size": self.attachments_total_size,
            "has_attachments": self.has_attachments,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MessageInfo:
        """Inverse of :meth:`to_dict`."""
        date_s = d.get("date")
        return cls(
            size=int(d.get("size", 0)),
            header_size=int(d.get("header_size", 0)),
            envelope=list(d.get("envelope") or [None] * 10),
            bodystructure=dict(d.get("bodystructure") or empty_part()),
            subject=str(d.get("subject", "")),
            from_addr=d.get("from_addr"),
            to_addrs=list(d.get("to_addrs", [])),
            cc_addrs=list(d.get("cc_addrs", [])),
            bcc_addrs=list(d.get("bcc_addrs", [])),
            reply_to_addrs=list(d.get("reply_to_addrs", [])),
            message_id=d.get("message_id"),
            in_reply_to=d.get("in_reply_to"),
            references=list(d.get("references", [])),
            date=datetime.fromisoformat(date_s) if date_s else None,
            search_headers=dict(d.get("search_headers", {})),
            attachments=[Attachment(a[0], a[1], int(a[2])) for a in d.get("attachments", [])],
            attachment_parts=[tuple(int(n) for n in p) for p in d.get("attachment_parts", [])],
            attachments_total_size=int(d.get("attachments_total_size", 0)),
            has_attachments=bool(d.get("has_attachments", False)),
        )


# --------------------------------------------------------------------------
# parse_message
# --------------------------------------------------------------------------


def _is_attachment(ent: _Entity, dsp: tuple[str, list[tuple[str, str]]] | None,
                   fname: str | None) -> bool:
    """Whether a part counts as an attachment: its disposition says so, or (a part that is
    not an attached message) it is not text and has a file name."""
    if dsp is not None and dsp[0] == "attachment":
        return True
    return ent.message is None and ent.mtype != "text" and fname is not None


def _attachments(raw: bytes, root: _Entity) -> tuple[list[Attachment], list[tuple[int, ...]]]:
    """The attachments of a message and the part path of each, in message order; the parts
    inside an attached message are not walked."""
    attachments: list[Attachment] = []
    parts: list[tuple[int, ...]] = []

    def stop(e: _Entity) -> bool:
        return _is_attached_message(raw, e)

    for path, ent in _iter_message_parts(root, (), stop):
        dsp = _disposition(raw, ent)
        fname = _filename(ent, dsp)
        if _is_attachment(ent, dsp, fname):
            size = _decoded_size(raw, ent.body_start, ent.end, _cte(raw, ent))
            attachments.append(Attachment(fname, f"{ent.mtype}/{ent.subtype}", size))
            parts.append(path)
    return attachments, parts


def _parse(raw: bytes) -> MessageInfo:
    root = _build_tree(raw)

    # Each header field is unfolded once; the first field of each name is kept.
    first: dict[str, str] = {}
    search: dict[str, list[str]] = {}
    for h in root.headers:
        v = _hval(raw, h)
        if h.name not in first:
            first[h.name] = v
        search.setdefault(h.name, []).append(decode_rfc2047(_l1(v)))

    # Each address field is parsed once, for the envelope and the specs.
    addr_lists: dict[str, list[Address]] = {}
    envelope = _envelope_of(first, addr_lists)

    def specs(name: str) -> list[str]:
        return _addr_specs(addr_lists.get(name))

    from_list = specs("from")
    refs_value = _l1(first.get("references", ""))
    references = [_WS_RE.sub("", r) for r in _MSGID_RE.findall(refs_value)]
    if not references:
        references = refs_value.split()

    attachments, parts = _attachments(raw, root)
    return MessageInfo(
        size=len(raw),
        header_size=root.body_start,
        envelope=envelope,
        bodystructure=_bs_node(raw, root),
        subject=search["subject"][0] if "subject" in search else "",
        from_addr=from_list[0] if from_list else None,
        to_addrs=specs("to"),
        cc_addrs=specs("cc"),
        bcc_addrs=specs("bcc"),
        reply_to_addrs=specs("reply-to"),
        message_id=_first_msgid(envelope[9]),
        in_reply_to=_first_msgid(envelope[8]),
        references=references,
        date=_parse_date(envelope[0]),
        search_headers=_with_addresses(search, addr_lists),
        attachments=attachments,
        attachment_parts=parts,
        attachments_total_size=sum(a.size for a in attachments),
        has_attachments=bool(attachments),
        _tree=root,
    )


#: Address fields whose SEARCH text also holds each address as ``mailbox@host`` (RFC 3501
#: §6.4.4 FROM/TO/CC/BCC): ``<user (comment)@ (comment) domain.org>`` is user@domain.org.
_SEARCH_ADDRESS_FIELDS = ("from", "to", "cc", "bcc")


def _with_addresses(search: dict[str, list[str]],
                    addr_lists: dict[str, list[Address]]) -> dict[str, str]:
    """Each field's decoded values, one per line; an address field's text is followed by the
    ``mailbox@host`` of each of its addresses that the text does not already spell."""
    out = {k: "\n".join(v) for k, v in search.items()}
    for name in _SEARCH_ADDRESS_FIELDS:
        text = out.get(name)
        if text is None:
            continue
        folded = text.casefold()
        missing = [spec for spec in _addr_specs(addr_lists.get(name))
                   if spec.casefold() not in folded]
        if missing:
            out[name] = text + "\n" + " ".join(missing)
    return out


def _degraded_info(raw: bytes) -> MessageInfo:
    """Last-resort result if the analysis failed unexpectedly."""
    node = empty_part()
    node["type"], node["subtype"], node["params"] = "APPLICATION", "OCTET-STREAM", None
    node["size"] = len(raw)
    del node["lines"]
    return MessageInfo(
        size=len(raw),
        header_size=0,
        envelope=[None] * 10,
        bodystructure=node,
        subject="",
        from_addr=None,
        to_addrs=[],
        cc_addrs=[],
        bcc_addrs=[],
        reply_to_addrs=[],
        message_id=None,
        in_reply_to=None,
        references=[],
        date=None,
        search_headers={},
        attachments=[],
        attachment_parts=[],
        attachments_total_size=0,
        has_attachments=False,
    )


def parse_message(raw: bytes) -> MessageInfo:
    """Analyse a raw RFC 5322 message.  Never raises."""
    if not isinstance(raw, bytes):
        raw = bytes(raw)
    try:
        return _parse(raw)
    except Exception:  # defensive: the analysis must never block a delivery
        log.exception("MIME analysis failed; storing a degraded structure")
        return _degraded_info(raw)


#: Messages larger than this are analysed in a worker thread by :func:`parse_message_async`.
#: The analysis is linear but its worst case is dense: a header of many address groups costs
#: about 17 µs per group, ~1 s per MiB (``bench/loop_hold.py``); 32 KiB keeps any message
#: under ~35 ms of event-loop time, so no client can hold the other sessions for longer.
INLINE_PARSE_MAX = 32 * 1024


async def parse_message_async(raw: bytes) -> MessageInfo:
    """:func:`parse_message` for code on an event loop: small messages inline (a thread hop
    costs more than their analysis), larger ones in a worker thread."""
    if len(raw) > INLINE_PARSE_MAX:
        return await asyncio.to_thread(parse_message, raw)
    return parse_message(raw)


# text_for_search lives here rather than in .sections because it reads the tree
# cached in MessageInfo; .sections (below this module) walks a given tree.
def text_for_search(raw: bytes, info: MessageInfo | None = None) -> str:
    """Decoded text of the text/* parts (and embedded message headers).

    Used for SEARCH BODY/TEXT.  Charsets are honoured; unknown or wrong
    charsets fall back to UTF-8 / Windows-1252 with replacement characters.
    NUL characters are removed.
    """
    try:
        tree = info._tree if info is not None and info.size == len(raw) else None
        return _search_text(raw, tree if tree is not None else _build_tree(raw))
    except Exception:
        log.exception("search text extraction failed")
        return _text(raw)
