"""The entity tree: MIME entities found by scanning byte offsets of the raw message.

``_build_tree`` splits a message into header blocks, multipart bodies (RFC 2046
§5.1.1 delimiters) and encapsulated messages, within the ``MAX_DEPTH`` /
``MAX_PARTS`` caps.  ``_iter_message_parts`` and ``_resolve`` walk it with IMAP
part numbers (RFC 3501 §6.4.5).  The small per-entity accessors (first headers,
Content-Transfer-Encoding, disposition, filename) live here too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from imap_store.mime.headers import (
    _Header,
    _hval,
    _param_bytes,
    _param_text,
    _parse_content_type,
    _parse_disposition,
    _parse_headers,
    _strip_comments,
)

#: Maximum nesting depth of multiparts / encapsulated messages that is analysed.
MAX_DEPTH = 50
#: Maximum number of MIME entities analysed in one message. Each is stored in the body
#: structure and rendered at every FETCH BODYSTRUCTURE: 10,000 took 55 ms of event loop to
#: render (bench/loop_hold.py); real mail has tens.
MAX_PARTS = 1_000

# --------------------------------------------------------------------------
# Entities
# --------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Entity:
    """A MIME entity: header block [start, body_start), body [body_start, end)."""

    start: int
    body_start: int
    end: int
    headers: list[_Header]
    mime: dict[str, _Header]  # first occurrence of each Content-* field
    mtype: str = "text"
    subtype: str = "plain"
    # RFC 2231-merged parameters: (lower-case name, latin-1 value)
    params: list[tuple[str, str]] = field(default_factory=list)
    default_ct: bool = True
    children: list[_Entity] | None = None  # multipart
    message: _Entity | None = None  # message/rfc822


class _Ctx:
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


def _first_headers(ent: _Entity) -> dict[str, _Header]:
    first: dict[str, _Header] = {}
    for h in ent.headers:
        first.setdefault(h.name, h)
    return first


def _cte(raw: bytes, ent: _Entity) -> str:
    h = ent.mime.get("content-transfer-encoding")
    if h is None:
        return "7bit"
    v = _strip_comments(_hval(raw, h)).strip().lower()
    return v or "7bit"


def _disposition(raw: bytes, ent: _Entity) -> tuple[str, list[tuple[str, str]]] | None:
    h = ent.mime.get("content-disposition")
    if h is None:
        return None
    return _parse_disposition(_hval(raw, h))


def _filename(ent: _Entity, dsp: tuple[str, list[tuple[str, str]]] | None) -> str | None:
    name = _param_text(dsp[1], "filename") if dsp is not None else None
    if not name:
        name = _param_text(ent.params, "name")
    if name is not None:
        name = name.strip()
    return name or None


# --------------------------------------------------------------------------
# Structure scanning
# --------------------------------------------------------------------------


def _delimiter_patterns(boundary: bytes) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    # The line terminator after the delimiter is only looked at, not consumed,
    # so that the next delimiter's leading LF can still be matched.
    tail = rb"(--)?[ \t]*(?=\r?\n|\r?\Z)"
    esc = re.escape(boundary)
    return re.compile(rb"--" + esc + tail), re.compile(rb"\n--" + esc + tail)


def _after_eol(raw: bytes, pos: int, end: int) -> int:
    if pos < end and raw[pos] == 0x0D:
        pos += 1
    if pos < end and raw[pos] == 0x0A:
        pos += 1
    return pos


def _split_multipart(
    raw: bytes, bs: int, be: int, boundary: bytes, max_parts: int
) -> list[tuple[int, int]]:
    """Body spans of the parts of a multipart body [bs, be).

    The line break before a delimiter belongs to the delimiter.  Without a
    close delimiter the last part runs to ``be``; so does the last part
    allowed by ``max_parts``.
    """
    at_start, inner = _delimiter_patterns(boundary)
    spans: list[tuple[int, int]] = []
    cur: int | None = None
    pos = bs
    if bs == 0 or raw[bs - 1 : bs] == b"\n":
        m0 = at_start.match(raw, bs, be)
        if m0 is not None:
            if m0.group(1) is not None:
                return spans
            cur = _after_eol(raw, m0.end(), be)
            pos = m0.end()
    for m in inner.finditer(raw, pos, be):
        if cur is not None:
            if len(spans) + 1 >= max_parts:
                spans.append((cur, be))
                return spans
            e = m.start()
            if e > cur and raw[e - 1] == 0x0D:
                e -= 1
            spans.append((cur, max(cur, e)))
        if m.group(1) is not None:
            return spans
        cur = _after_eol(raw, m.end(), be)
    if cur is not None:
        spans.append((cur, be))
    return spans


def _build(raw: bytes, start: int, end: int, depth: int, ctx: _Ctx, digest: bool) -> _Entity:
    headers, body_start = _parse_headers(raw, start, end)
    mime: dict[str, _Header] = {}
    for h in headers:
        if h.name.startswith("content-"):
            mime.setdefault(h.name, h)
    ent = _Entity(start, body_start, end, headers, mime)
    ctx.count += 1
    ct = mime.get("content-type")
    parsed = _parse_content_type(_hval(raw, ct)) if ct is not None else None
    if parsed is not None:
        ent.mtype, ent.subtype, ent.params = parsed
        ent.default_ct = False
    elif ct is None and digest:
        ent.mtype, ent.subtype = "message", "rfc822"
        ent.default_ct = False
    else:
        ent.params = [("charset", "us-ascii")]

    capped = depth >= MAX_DEPTH or ctx.count >= MAX_PARTS
    if ent.mtype == "multipart":
        boundary = _param_bytes(ent.params, "boundary")
        if not boundary:
            ent.mtype, ent.subtype = "text", "plain"
            ent.params = [("charset", "us-ascii")]
            ent.default_ct = True
        elif capped:
            ent.mtype, ent.subtype = "application", "octet-stream"
        else:
            spans = _split_multipart(raw, body_start, end, boundary, MAX_PARTS - ctx.count)
            is_digest = ent.subtype == "digest"
            ent.children = [_build(raw, s, e, depth + 1, ctx, is_digest) for s, e in spans]
    elif ent.mtype == "message" and ent.subtype == "rfc822":
        if capped:
            ent.mtype, ent.subtype = "application", "octet-stream"
        else:
            ent.message = _build(raw, body_start, end, depth + 1, ctx, False)
    return ent


def _build_tree(raw: bytes) -> _Entity:
    return _build(raw, 0, len(raw), 0, _Ctx(), False)


def _iter_message_parts(
    m: _Entity, prefix: tuple[int, ...], stop: Callable[[_Entity], bool]
) -> Iterator[tuple[tuple[int, ...], _Entity]]:
    """Leaf and message/rfc822 parts of message ``m`` with IMAP part numbers.

    Encapsulated messages are entered unless ``stop(part)`` is true.
    """
    if m.children is not None:
        for i, c in enumerate(m.children, 1):
            yield from _iter_part(c, (*prefix, i), stop)
    else:
        yield from _iter_part(m, (*prefix, 1), stop)


def _iter_part(
    ent: _Entity, path: tuple[int, ...], stop: Callable[[_Entity], bool]
) -> Iterator[tuple[tuple[int, ...], _Entity]]:
    if ent.children is not None:
        for i, c in enumerate(ent.children, 1):
            yield from _iter_part(c, (*path, i), stop)
    elif ent.message is not None:
        yield path, ent
        if not stop(ent):
            yield from _iter_message_parts(ent.message, path, stop)
    else:
        yield path, ent


def _resolve(root: _Entity, part: Sequence[int]) -> _Entity | None:
    """Entity addressed by an IMAP part number (RFC 3501 §6.4.5)."""
    ent = root
    as_message = True  # ent is being numbered as a message, not a body part
    for k in part:
        if k < 1:
            return None
        if ent.children is None and not as_message:
            if ent.message is None:
                return None
            ent = ent.message  # number into the encapsulated message
        if ent.children is not None:
            if k > len(ent.children):
                return None
            ent = ent.children[k - 1]
        elif k != 1:
            return None
        # else: part 1 of a non-multipart message is its body (same entity)
        as_message = False
    return ent


def _is_attached_message(raw: bytes, ent: _Entity) -> bool:
    dsp = _disposition(raw, ent)
    return dsp is not None and dsp[0] == "attachment"
