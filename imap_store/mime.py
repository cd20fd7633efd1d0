"""Compute-once MIME analysis of stored messages.

Everything the IMAP server (FETCH ENVELOPE/BODY/BODYSTRUCTURE, SEARCH) and the
gateway rules need from a message is derived here once, at delivery, from the
raw bytes.  The results are plain JSON-serialisable structures that are stored
beside the message, so the message never has to be parsed again with the
``email`` package.

Design notes
------------

* The structure is found by our own scanner working on byte offsets into the
  original message: header blocks, boundary delimiter lines (RFC 2046 §5.1.1)
  and encapsulated messages.  ``get_section`` therefore returns exact slices of
  the stored bytes, as RFC 3501 §6.4.5 requires, and never a re-serialisation.
* Line terminators are LF with an optional preceding CR.  The line break that
  precedes a boundary delimiter belongs to the delimiter, not to the part.
* A multipart whose closing delimiter is missing has its last part extending to
  the end of the enclosing entity.  A multipart without a ``boundary``
  parameter, or with an unparsable Content-Type, is treated as
  ``text/plain; charset=us-ascii`` (RFC 2045 §5.2).
* Nesting is capped at ``MAX_DEPTH`` and the total number of entities at
  ``MAX_PARTS``; a composite entity beyond a cap is reported as an opaque
  ``application/octet-stream`` leaf (its bytes stay reachable).
* Header strings in the stored structures are ``str``: header bytes are decoded
  as UTF-8 (RFC 6532) and, when that fails, as Windows-1252.  NUL characters are
  removed from every stored string because neither IMAP nor PostgreSQL text
  accept them.
* Every public function is total: any input bytes give a result.
"""

from __future__ import annotations

import binascii
import codecs
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple
from urllib.parse import quote, unquote_to_bytes

__all__ = [
    "MAX_DEPTH",
    "MAX_PARTS",
    "Attachment",
    "MessageInfo",
    "decode_rfc2047",
    "decode_section",
    "get_section",
    "parse_message",
    "render_bodystructure",
    "render_envelope",
    "text_for_search",
]

log = logging.getLogger(__name__)

#: Maximum nesting depth of multiparts / encapsulated messages that is analysed.
MAX_DEPTH = 50
#: Maximum number of MIME entities analysed in one message.
MAX_PARTS = 10_000
#: Maximum number of header fields indexed per entity (DoS guard).
MAX_HEADERS = 10_000

# Strings longer than this are sent as IMAP literals rather than quoted.
_MAX_QUOTED = 1024
# Chunk size used when streaming over big bodies.
_CHUNK = 1 << 20

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
    :func:`render_envelope` / :func:`render_bodystructure` to produce IMAP
    syntax.  :meth:`to_dict` / :meth:`from_dict` convert the whole record to
    and from a JSON-compatible dict.
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
            bodystructure=dict(d.get("bodystructure") or _empty_part()),
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
# Internal structure
# --------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Header:
    name: str  # lower-case field name
    start: int  # first byte of the field line
    vstart: int  # first byte after the colon
    end: int  # end of the last continuation line, terminator included


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


# --------------------------------------------------------------------------
# Low-level helpers: decoding
# --------------------------------------------------------------------------

# Codecs that are not charsets or are pathologically slow on large inputs.
_REFUSED_CODECS = frozenset(
    {"punycode", "idna", "undefined", "unicode_escape", "raw_unicode_escape"}
)
_ASCII_ALIASES = frozenset({"us-ascii", "ascii", "646", "us", "ansi_x3.4-1968"})


def _text(data: bytes) -> str:
    """Decode bytes of unknown charset: UTF-8, else Windows-1252; drop NULs."""
    try:
        s = data.decode("utf-8")
    except UnicodeDecodeError:
        s = data.decode("cp1252", errors="replace")
    return s.replace("\x00", "") if "\x00" in s else s


def _l1(s: str) -> str:
    """Turn a latin-1 transparent string (raw header bytes) into display text."""
    if s.isascii():
        return s.replace("\x00", "") if "\x00" in s else s
    return _text(s.encode("latin-1"))


def _decode_charset(data: bytes, charset: str | None) -> str:
    """Decode ``data`` in ``charset``; unknown/absent charsets fall back."""
    cs = (charset or "").strip().strip('"').split("*", 1)[0].strip().lower()
    if cs and cs not in _ASCII_ALIASES:
        try:
            name = codecs.lookup(cs).name
        except (LookupError, ValueError, TypeError):
            name = ""
        if name and name not in _REFUSED_CODECS:
            try:
                s = data.decode(name, errors="replace")
            except (LookupError, UnicodeError, ValueError, TypeError):
                pass  # not a text codec: use the fallback below
            else:
                return s.replace("\x00", "") if "\x00" in s else s
    return _text(data)


_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_DELETE = bytes(c for c in range(256) if c not in _B64_ALPHABET)


def _b64decode(data: bytes) -> bytes:
    """Lenient base64: ignore junk and padding, drop a dangling sextet."""
    clean = data.translate(None, _B64_DELETE)
    rem = len(clean) % 4
    if rem == 1:
        clean = clean[:-1]
    elif rem:
        clean += b"=" * (4 - rem)
    try:
        return binascii.a2b_base64(clean)
    except (binascii.Error, ValueError):
        return b""


def _qp_chunks(raw: bytes, start: int, end: int) -> Iterator[bytes]:
    """Quoted-printable decode of raw[start:end] in line-aligned chunks."""
    i = start
    while i < end:
        j = i + _CHUNK
        if j >= end:
            j = end
        else:
            nl = raw.find(b"\n", j, end)
            j = end if nl < 0 else nl + 1
        yield binascii.a2b_qp(raw[i:j])
        i = j


def _decode_body(raw: bytes, start: int, end: int, cte: str) -> bytes:
    if cte == "base64":
        return _b64decode(raw[start:end])
    if cte == "quoted-printable":
        return b"".join(_qp_chunks(raw, start, end))
    return raw[start:end]


def _decoded_size(raw: bytes, start: int, end: int, cte: str) -> int:
    """Size of the decoded body without materialising it in full."""
    if cte == "base64":
        n = 0
        for i in range(start, end, _CHUNK):
            n += len(raw[i : min(i + _CHUNK, end)].translate(None, _B64_DELETE))
        return n * 3 // 4
    if cte == "quoted-printable":
        return sum(len(c) for c in _qp_chunks(raw, start, end))
    return max(0, end - start)


_EW_RE = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")


def decode_rfc2047(s: str) -> str:
    """Decode RFC 2047 encoded-words in ``s`` (lenient, never raises).

    Whitespace between adjacent encoded-words is dropped (RFC 2047 §6.2) and
    the bytes of adjacent words in the same charset are joined before
    decoding, so characters split across words survive.
    """
    if "=?" not in s:
        return s
    out: list[str] = []
    pending = bytearray()
    pending_cs = ""
    pos = 0
    after_word = False

    def flush() -> None:
        nonlocal pending
        if pending:
            out.append(_decode_charset(bytes(pending), pending_cs))
            pending = bytearray()

    for m in _EW_RE.finditer(s):
        between = s[pos : m.start()]
        if not (after_word and not between.strip(" \t\r\n")):
            flush()
            out.append(between)
        cs = m.group(1).split("*", 1)[0].lower()
        enc = m.group(3).encode("utf-8", errors="replace")
        if m.group(2) in "bB":
            data = _b64decode(enc)
        else:
            data = binascii.a2b_qp(enc, header=True)
        if pending and cs != pending_cs:
            flush()
        pending_cs = cs
        pending += data
        pos = m.end()
        after_word = True
    flush()
    out.append(s[pos:])
    res = "".join(out)
    return res.replace("\x00", "") if "\x00" in res else res


# --------------------------------------------------------------------------
# Header scanning
# --------------------------------------------------------------------------

# A run of header lines: field lines and continuation lines.
_HDR_BLOCK = re.compile(rb"(?:[!-9;-~]++[ \t]*:[^\n]*(?:\n|\Z)|[ \t][^\n]*(?:\n|\Z))*+")
# One field with its continuation lines.
_HDR_FIELD = re.compile(
    rb"^([!-9;-~]++)[ \t]*:()[^\n]*(?:\n|\Z)(?:[ \t][^\n]*(?:\n|\Z))*+", re.MULTILINE
)
_FOLD_RE = re.compile(rb"\r\n(?=[ \t])|\n(?=[ \t])")  # = \r?\n(?=[ \t]), scans faster


def _parse_headers(raw: bytes, start: int, end: int) -> tuple[list[_Header], int]:
    """Header fields of the entity at ``start`` and the offset of its body.

    The header block ends at the first empty line (which belongs to the
    header) or at the first line that is neither a field nor a continuation.
    """
    m = _HDR_BLOCK.match(raw, start, end)
    hb = m.end() if m is not None else start
    headers: list[_Header] = []
    if hb > start:
        for fm in _HDR_FIELD.finditer(raw, start, hb):
            headers.append(
                _Header(fm.group(1).decode("ascii").lower(), fm.start(), fm.start(2), fm.end())
            )
            if len(headers) >= MAX_HEADERS:
                break
    if raw.startswith(b"\r\n", hb, end):
        return headers, hb + 2
    if raw.startswith(b"\n", hb, end):
        return headers, hb + 1
    return headers, hb


def _hval(raw: bytes, h: _Header) -> str:
    """Unfolded, stripped header value as a latin-1 transparent string."""
    # Stripping before unfolding gives the same result: both only remove CR,
    # LF, space and tab, and a fold cannot straddle the stripped ends.  It
    # spares the regex for the usual one-line field, whose slice still ends
    # with its line terminator.
    v = raw[h.vstart : h.end].strip(b" \t\r\n")
    if b"\n" in v:
        v = _FOLD_RE.sub(b"", v)
    return v.decode("latin-1")


def _first_headers(ent: _Entity) -> dict[str, _Header]:
    first: dict[str, _Header] = {}
    for h in ent.headers:
        first.setdefault(h.name, h)
    return first


# --------------------------------------------------------------------------
# Structured header values (RFC 2045 / 2183 / 2231)
# --------------------------------------------------------------------------

_QSTR_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_PLAIN_RE = re.compile(r'[^"(]+')
_CMT_CHUNK_RE = re.compile(r"[^\\()]+")
_UNESCAPE_RE = re.compile(r"\\(.)", re.S)
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
_PARAM_RE = re.compile(r'[\s;]*([^\s=;"]+)\s*=\s*("[^"\\]*(?:\\.[^"\\]*)*"?|[^;]*)', re.S)
_CONT_RE = re.compile(r"(.+?)\*([0-9]{1,6})(\*?)")
_ATTR_SAFE = "!#$&+-.^_`|~"


def _comment(s: str, i: int) -> tuple[str, int]:
    """Parse a (possibly nested) comment starting at s[i] == '('."""
    depth = 0
    buf: list[str] = []
    n = len(s)
    j = i
    while j < n:
        m = _CMT_CHUNK_RE.match(s, j)
        if m is not None:
            buf.append(m.group())
            j = m.end()
            continue
        ch = s[j]
        if ch == "\\":
            buf.append(s[j + 1 : j + 2])
            j += 2
            continue
        if ch == "(":
            depth += 1
            if depth > 1:
                buf.append(ch)
        else:  # ")"
            depth -= 1
            if depth <= 0:
                return "".join(buf), j + 1
            buf.append(ch)
        j += 1
    return "".join(buf), n


def _strip_comments(s: str) -> str:
    if "(" not in s:
        return s
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        m = _PLAIN_RE.match(s, i)
        if m is not None:
            out.append(m.group())
            i = m.end()
        elif s[i] == '"':
            q = _QSTR_RE.match(s, i)
            assert q is not None  # always matches at a quote
            out.append(q.group())
            i = q.end()
        else:
            i = _comment(s, i)[1]
            out.append(" ")
    return "".join(out)


def _unquote(v: str) -> str:
    v = v.strip()
    if v.startswith('"'):
        inner = v[1:-1] if len(v) >= 2 and v.endswith('"') else v[1:]
        return _UNESCAPE_RE.sub(r"\1", inner)
    return v


def _parse_params(s: str) -> list[tuple[str, str]]:
    """``; name=value`` pairs (names lower-cased), RFC 2231 continuations merged."""
    raw_params: list[tuple[str, str]] = []
    i, n = 0, len(s)
    while i < n:
        m = _PARAM_RE.match(s, i)
        if m is None:  # garbage segment: skip to the next ";"
            j = s.find(";", i)
            if j < 0:
                break
            i = j + 1
            continue
        raw_params.append((m.group(1).lower(), _unquote(m.group(2))))
        i = m.end()
    return _merge_rfc2231(raw_params)


def _merge_rfc2231(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if not any("*" in name for name, _ in params):
        return params
    out: list[tuple[str, str] | str] = []
    segments: dict[str, dict[int, tuple[bool, str]]] = {}
    for name, value in params:
        m = _CONT_RE.fullmatch(name)
        if m is None:
            out.append((name, value))
            continue
        base = m.group(1)
        if base not in segments:
            segments[base] = {}
            out.append(base)  # placeholder keeping the original order
        segments[base].setdefault(int(m.group(2)), (bool(m.group(3)), value))
    merged: list[tuple[str, str]] = []
    for item in out:
        if isinstance(item, tuple):
            merged.append(item)
            continue
        segs = [segments[item][k] for k in sorted(segments[item])]
        if any(ext for ext, _ in segs):
            pieces: list[str] = []
            for idx, (ext, value) in enumerate(segs):
                if ext:
                    pieces.append(value)
                else:
                    enc = quote(value.encode("latin-1"), safe=_ATTR_SAFE)
                    pieces.append("''" + enc if idx == 0 else enc)
            merged.append((item + "*", "".join(pieces)))
        else:
            merged.append((item, "".join(v for _, v in segs)))
    return merged


def _decode_rfc2231(value: str) -> str:
    parts = value.split("'", 2)
    if len(parts) == 3:
        charset, encoded = parts[0], parts[2]
    else:
        charset, encoded = "", value
    return _decode_charset(unquote_to_bytes(encoded.encode("latin-1")), charset)


def _param_text(params: Sequence[tuple[str, str]], name: str) -> str | None:
    """Decoded value of a parameter (RFC 2231 form preferred, RFC 2047 tolerated)."""
    ext = name + "*"
    for n, v in params:
        if n == ext:
            return _decode_rfc2231(v)
    for n, v in params:
        if n == name:
            return decode_rfc2047(_l1(v))
    return None


def _param_bytes(params: Sequence[tuple[str, str]], name: str) -> bytes | None:
    for n, v in params:
        if n == name:
            return v.encode("latin-1")
    for n, v in params:
        if n == name + "*":
            parts = v.split("'", 2)
            return unquote_to_bytes(parts[-1].encode("latin-1"))
    return None


def _parse_content_type(value: str) -> tuple[str, str, list[tuple[str, str]]] | None:
    s = _strip_comments(value)
    head, _, rest = s.partition(";")
    mtype, slash, subtype = head.partition("/")
    mtype, subtype = mtype.strip().lower(), subtype.strip().lower()
    if not slash or not _TOKEN_RE.fullmatch(mtype) or not _TOKEN_RE.fullmatch(subtype):
        return None
    return mtype, subtype, _parse_params(rest)


def _parse_disposition(value: str) -> tuple[str, list[tuple[str, str]]]:
    s = _strip_comments(value)
    head, _, rest = s.partition(";")
    return head.strip().lower(), _parse_params(rest)


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


# --------------------------------------------------------------------------
# Envelope (RFC 3501 §7.4.2) and addresses
# --------------------------------------------------------------------------

_ADDR_TOKEN_RE = re.compile(
    r"(?P<ws>[ \t\r\n]+)"
    r'|(?P<q>"[^"\\]*(?:\\.[^"\\]*)*"?)'
    r"|(?P<d>\[[^\]]*\]?)"
    r"|(?P<c>\()"
    r"|(?P<s>[<>@,;:.])"
    r'|(?P<a>[^ \t\r\n()<>@,;:."\[\]]+)'
    r"|(?P<o>.)",
    re.S,
)


class _Tok(NamedTuple):
    kind: str  # "a" atom, "q" quoted string, "d" domain literal, "s" special, "c" comment
    text: str
    space: bool  # whitespace (or a comment) precedes the token


def _addr_tokens(s: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(s)
    space = False
    while i < n:
        m = _ADDR_TOKEN_RE.match(s, i)
        if m is None:  # pragma: no cover - the last alternative matches anything
            break
        kind = m.lastgroup or "o"
        if kind == "ws":
            space = True
            i = m.end()
            continue
        if kind == "c":
            text, i = _comment(s, i)
            toks.append(_Tok("c", text, space))
            space = True
            continue
        text = m.group()
        if kind == "q":
            text = _unquote(text)
        elif kind == "o":
            kind = "a"
        toks.append(_Tok(kind, text, space))
        space = False
        i = m.end()
    return toks


def _phrase(toks: Sequence[_Tok]) -> str:
    out: list[str] = []
    for t in toks:
        if t.kind == "c":
            continue
        if t.space and out:
            out.append(" ")
        out.append(t.text)
    return "".join(out).strip()


def _quote_local(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _concat(toks: Sequence[_Tok], quote_strings: bool) -> str:
    return "".join(
        _quote_local(t.text) if quote_strings and t.kind == "q" else t.text
        for t in toks
        if t.kind != "c"
    )


Address = list[str | None]


def _make_address(toks: list[_Tok]) -> Address | None:
    words = [t for t in toks if t.kind != "c"]
    if not words:
        return None
    lt = next((i for i, t in enumerate(words) if t.kind == "s" and t.text == "<"), None)
    if lt is not None:
        gt = next(
            (i for i in range(lt + 1, len(words)) if words[i].kind == "s" and words[i].text == ">"),
            len(words),
        )
        name = _phrase(words[:lt]) or None
        addr = words[lt + 1 : gt]
    else:
        comments = [t.text.strip() for t in toks if t.kind == "c" and t.text.strip()]
        name = comments[0] if comments else None
        addr = words
    adl: str | None = None
    colon = max((i for i, t in enumerate(addr) if t.kind == "s" and t.text == ":"), default=-1)
    if colon >= 0:
        adl = _concat(addr[:colon], False) or None
        addr = addr[colon + 1 :]
    at = max((i for i, t in enumerate(addr) if t.kind == "s" and t.text == "@"), default=-1)
    if at >= 0:
        mailbox, host = _concat(addr[:at], True), _concat(addr[at + 1 :], False)
    else:
        mailbox, host = _concat(addr, True), ""
    if not mailbox and not host and name is None:
        return None
    # Empty strings (never NIL) so that the address cannot look like a group marker.
    return [
        _l1(name) if name is not None else None,
        _l1(adl) if adl is not None else None,
        _l1(mailbox),
        _l1(host),
    ]


def _parse_address_list_general(value: str) -> list[Address]:
    """RFC 5322 address-list into IMAP address structures (groups included).

    The general tokenizer-based parser; :func:`_parse_address_list` tries a
    fast path first and must give exactly the same result.
    """
    out: list[Address] = []
    cur: list[_Tok] = []
    in_angle = False
    in_group = False
    seen_at = False  # "@" among the tokens of the current address

    def flush() -> None:
        nonlocal seen_at
        a = _make_address(cur)
        if a is not None:
            out.append(a)
        cur.clear()
        seen_at = False

    for t in _addr_tokens(value):
        if t.kind == "s":
            c = t.text
            if in_angle:
                if c == ">":
                    in_angle = False
            elif c == "<":
                in_angle = True
            elif c == ",":
                flush()
                continue
            elif c == ";":
                flush()
                if in_group:
                    out.append([None, None, None, None])
                    in_group = False
                continue
            elif c == ":" and not seen_at:
                if in_group:
                    flush()
                    out.append([None, None, None, None])
                out.append([None, None, _l1(_phrase(cur)), None])
                cur.clear()
                in_group = True
                continue
            elif c == "@":
                seen_at = True
        cur.append(t)
    flush()
    if in_group:
        out.append([None, None, None, None])
    return out


# Fast path for the everyday shapes of one address: ``local@domain``,
# ``<local@domain>``, ``Phrase words <local@domain>`` and ``"Quoted" <local@domain>``.
# The character classes are deliberately narrow (no comments, groups, commas,
# backslashes, domain literals, route addresses, CR/LF or control characters);
# anything else goes through the general parser.  For these shapes the general
# parser's result is: the phrase with runs of blanks collapsed to one space and
# then str.strip()ped (unquoted) or the quoted text str.strip()ped, ``None`` when
# empty; no adl; the local part and domain verbatim; all through _l1.
_FA = r"[!#$%&'*+\-./0-9=?A-Z^_`a-z{|}~\x80-\xff]+"  # atoms and dots, no blanks
_FAST_ADDR_RE = re.compile(
    r"[ \t]*(?:"
    rf"(?P<bl>{_FA})@(?P<bd>{_FA})"
    r'|(?:"(?P<q>[\t !#-\[\]-~\x80-\xff]*)"'
    r"|(?P<p>[\t !#$%&'*+\-./0-9=?A-Z^_`a-z{|}~\x80-\xff]*))"
    rf"[ \t]*<(?P<l>{_FA})@(?P<d>{_FA})>"
    r")[ \t]*"
)
_BLANKS_RE = re.compile(r"[ \t]+")


def _fast_address(value: str) -> Address | None:
    """The address of a simple one-address ``value``, or None if not simple."""
    m = _FAST_ADDR_RE.fullmatch(value)
    if m is None:
        return None
    local = m.group("bl")
    if local is not None:
        return [None, None, _l1(local), _l1(m.group("bd"))]
    q = m.group("q")
    if q is not None:
        name = q.strip()
    else:
        name = m.group("p")
        if " " in name or "\t" in name:
            name = _BLANKS_RE.sub(" ", name)
        name = name.strip()
    return [_l1(name) if name else None, None, _l1(m.group("l")), _l1(m.group("d"))]


def _parse_address_list(value: str) -> list[Address]:
    """RFC 5322 address-list into IMAP address structures (groups included).

    Simple values (one or more plain addresses) are handled by a single regex
    per address; everything else by :func:`_parse_address_list_general`.
    """
    if "," in value:
        # Splitting at every comma is right when each piece is simple: a
        # simple piece holds no quote or exactly one closed quoted string, so
        # no comma can be inside quotes.
        out: list[Address] = []
        for piece in value.split(","):
            a = _fast_address(piece)
            if a is None:
                break
            out.append(a)
        else:
            return out
        if '"' not in value:  # the whole value cannot be simple either
            return _parse_address_list_general(value)
    # A comma inside a quoted name: "Chanteau, Marie" <a@b>.
    a = _fast_address(value)
    return [a] if a is not None else _parse_address_list_general(value)


def _addr_specs(addrs: Sequence[Address] | None) -> list[str]:
    out: list[str] = []
    for a in addrs or ():
        mailbox, host = a[2], a[3]
        if mailbox is None or host is None or not mailbox:
            continue  # group markers / empty
        out.append((f"{mailbox}@{host}" if host else mailbox).lower())
    return out


_ENVELOPE_FIELDS = (
    "date",
    "subject",
    "from",
    "sender",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "in-reply-to",
    "message-id",
)


def _envelope(raw: bytes, m: _Entity) -> list[Any]:
    first = _first_headers(m)
    vals = {n: _hval(raw, first[n]) for n in _ENVELOPE_FIELDS if n in first}
    return _envelope_of(vals, {})


def _envelope_of(vals: dict[str, str], lists: dict[str, list[Address]]) -> list[Any]:
    """Envelope from the unfolded values of the first field of each name.

    The parsed address list of every address field present is also stored in
    ``lists`` (by field name, possibly empty) so that callers need not parse
    it again.
    """

    def text(name: str) -> str | None:
        v = vals.get(name)
        return _l1(v) if v is not None else None

    def addrs(name: str) -> list[Address] | None:
        v = vals.get(name)
        if v is None:
            return None
        parsed = lists[name] = _parse_address_list(v)
        return parsed or None

    from_ = addrs("from")
    return [
        text("date"),
        text("subject"),
        from_,
        addrs("sender") or from_,
        addrs("reply-to") or from_,
        addrs("to"),
        addrs("cc"),
        addrs("bcc"),
        text("in-reply-to"),
        text("message-id"),
    ]


_MSGID_RE = re.compile(r"<[^<>]*>")
_WS_RE = re.compile(r"\s+")


def _first_msgid(value: str | None) -> str | None:
    if value is None:
        return None
    m = _MSGID_RE.search(value)
    if m is not None:
        return _WS_RE.sub("", m.group())
    return value.strip() or None


def _parse_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        dt = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


# --------------------------------------------------------------------------
# BODYSTRUCTURE tree
# --------------------------------------------------------------------------


def _empty_part() -> dict[str, Any]:
    return {
        "type": "TEXT",
        "subtype": "PLAIN",
        "params": [["CHARSET", "US-ASCII"]],
        "id": None,
        "desc": None,
        "enc": "7BIT",
        "size": 0,
        "lines": 0,
        "md5": None,
        "dsp": None,
        "lang": None,
        "loc": None,
    }


def _params_json(params: Sequence[tuple[str, str]]) -> list[list[str]] | None:
    if not params:
        return None
    return [[_l1(n).upper(), _l1(v)] for n, v in params]


def _count_lines(raw: bytes, start: int, end: int) -> int:
    """body-fld-lines: text lines in raw[start:end].

    An unterminated last line counts as a line (the CRLF before a boundary
    belongs to the delimiter, so a part's last line is normally unterminated).
    """
    if end <= start:
        return 0
    n = raw.count(b"\n", start, end)
    return n if raw[end - 1] == 0x0A else n + 1


def _bs_node(raw: bytes, ent: _Entity) -> dict[str, Any]:
    dsp = _disposition(raw, ent)
    mime = ent.mime

    def opt(name: str) -> str | None:
        h = mime.get(name)
        return _l1(_hval(raw, h)) if h is not None else None

    lang_h = mime.get("content-language")
    lang: list[str] | None = None
    if lang_h is not None:
        lang = [x.strip() for x in _strip_comments(_l1(_hval(raw, lang_h))).split(",")]
        lang = [x for x in lang if x] or None
    ext: dict[str, Any] = {
        "dsp": [_l1(dsp[0]).upper(), _params_json(dsp[1])] if dsp is not None and dsp[0] else None,
        "lang": lang,
        "loc": opt("content-location"),
    }
    if ent.children is not None:
        return {
            "type": "MULTIPART",
            "subtype": ent.subtype.upper(),
            "parts": [_bs_node(raw, c) for c in ent.children] or [_empty_part()],
            "params": _params_json(ent.params),
            **ext,
        }
    node: dict[str, Any] = {
        "type": ent.mtype.upper(),
        "subtype": ent.subtype.upper(),
        "params": [["CHARSET", "US-ASCII"]] if ent.default_ct else _params_json(ent.params),
        "id": opt("content-id"),
        "desc": opt("content-description"),
        "enc": _l1(_cte(raw, ent)).upper(),
        "size": ent.end - ent.body_start,
    }
    if ent.message is not None:
        node["envelope"] = _envelope(raw, ent.message)
        node["body"] = _bs_node(raw, ent.message)
        node["lines"] = _count_lines(raw, ent.body_start, ent.end)
    elif ent.mtype == "text":
        node["lines"] = _count_lines(raw, ent.body_start, ent.end)
    node["md5"] = opt("content-md5")
    node.update(ext)
    return node


# --------------------------------------------------------------------------
# IMAP rendering
# --------------------------------------------------------------------------

_LITERAL_NEEDED_RE = re.compile(rb"[\r\n\x80-\xff]")


def _imap_string(value: object) -> bytes:
    """nstring: NIL, quoted string, or literal when quoting is impossible."""
    if value is None:
        return b"NIL"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value).encode("ascii")
    data = str(value).encode("utf-8", errors="replace")
    if b"\x00" in data:
        data = data.replace(b"\x00", b"")
    if len(data) > _MAX_QUOTED or _LITERAL_NEEDED_RE.search(data):
        return b"{%d}\r\n" % len(data) + data
    return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _imap_number(value: object) -> bytes:
    n = value if isinstance(value, int) else 0
    return b"%d" % max(0, n)


def _imap_address_list(value: object) -> bytes:
    if not isinstance(value, list) or not value:
        return b"NIL"
    out = [b"("]
    for a in value:
        fields = list(a)[:4] if isinstance(a, list | tuple) else []
        fields += [None] * (4 - len(fields))
        out.append(b"(" + b" ".join(_imap_string(f) for f in fields) + b")")
    out.append(b")")
    return b"".join(out)


def render_envelope(envelope: Sequence[Any]) -> bytes:
    """RFC 3501 ``envelope`` syntax for a stored envelope."""
    f = list(envelope)[:10]
    f += [None] * (10 - len(f))
    items = [_imap_string(f[0]), _imap_string(f[1])]
    items += [_imap_address_list(x) for x in f[2:8]]
    items += [_imap_string(f[8]), _imap_string(f[9])]
    return b"(" + b" ".join(items) + b")"


def _imap_params(value: object) -> bytes:
    if not isinstance(value, list) or not value:
        return b"NIL"
    items: list[bytes] = []
    for p in value:
        if isinstance(p, list | tuple) and len(p) >= 2:
            items.append(_imap_string(str(p[0]).upper()))
            items.append(_imap_string("" if p[1] is None else p[1]))
    return b"(" + b" ".join(items) + b")" if items else b"NIL"


def _imap_disposition(value: object) -> bytes:
    if not isinstance(value, list | tuple) or not value or not value[0]:
        return b"NIL"
    params = value[1] if len(value) > 1 else None
    return b"(" + _imap_string(str(value[0]).upper()) + b" " + _imap_params(params) + b")"


def _imap_language(value: object) -> bytes:
    if isinstance(value, str):
        return _imap_string(value)
    if not isinstance(value, list) or not value:
        return b"NIL"
    if len(value) == 1:
        return _imap_string(value[0])
    return b"(" + b" ".join(_imap_string(x) for x in value) + b")"


def _render_body(node: dict[str, Any], extended: bool) -> bytes:
    if str(node.get("type", "")).upper() == "MULTIPART" or "parts" in node:
        parts = [p for p in node.get("parts") or () if isinstance(p, dict)] or [_empty_part()]
        out = [b"".join(_render_body(p, extended) for p in parts)]
        out.append(_imap_string(str(node.get("subtype") or "MIXED").upper()))
        if extended:
            out.append(_imap_params(node.get("params")))
            out.append(_imap_disposition(node.get("dsp")))
            out.append(_imap_language(node.get("lang")))
            out.append(_imap_string(node.get("loc")))
        return b"(" + b" ".join(out) + b")"
    mtype = str(node.get("type") or "TEXT").upper()
    items = [
        _imap_string(mtype),
        _imap_string(str(node.get("subtype") or "PLAIN").upper()),
        _imap_params(node.get("params")),
        _imap_string(node.get("id")),
        _imap_string(node.get("desc")),
        _imap_string(str(node.get("enc") or "7BIT").upper()),
        _imap_number(node.get("size", 0)),
    ]
    body = node.get("body")
    if isinstance(body, dict):
        items.append(render_envelope(node.get("envelope") or []))
        items.append(_render_body(body, extended))
        items.append(_imap_number(node.get("lines", 0)))
    elif mtype == "TEXT":
        items.append(_imap_number(node.get("lines", 0)))
    if extended:
        items.append(_imap_string(node.get("md5")))
        items.append(_imap_disposition(node.get("dsp")))
        items.append(_imap_language(node.get("lang")))
        items.append(_imap_string(node.get("loc")))
    return b"(" + b" ".join(items) + b")"


def render_bodystructure(bs: dict[str, Any], extended: bool) -> bytes:
    """RFC 3501 ``body`` syntax: BODYSTRUCTURE if ``extended`` else BODY."""
    return _render_body(bs, extended)


# --------------------------------------------------------------------------
# parse_message
# --------------------------------------------------------------------------


def _is_attached_message(raw: bytes, ent: _Entity) -> bool:
    dsp = _disposition(raw, ent)
    return dsp is not None and dsp[0] == "attachment"


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

    attachments: list[Attachment] = []
    parts: list[tuple[int, ...]] = []

    def stop(e: _Entity) -> bool:
        return _is_attached_message(raw, e)

    for path, ent in _iter_message_parts(root, (), stop):
        dsp = _disposition(raw, ent)
        fname = _filename(ent, dsp)
        if ent.message is not None:
            is_att = dsp is not None and dsp[0] == "attachment"
        else:
            is_att = (dsp is not None and dsp[0] == "attachment") or (
                ent.mtype != "text" and fname is not None
            )
        if is_att:
            size = _decoded_size(raw, ent.body_start, ent.end, _cte(raw, ent))
            attachments.append(Attachment(fname, f"{ent.mtype}/{ent.subtype}", size))
            parts.append(path)

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
        search_headers={k: "\n".join(v) for k, v in search.items()},
        attachments=attachments,
        attachment_parts=parts,
        attachments_total_size=sum(a.size for a in attachments),
        has_attachments=bool(attachments),
        _tree=root,
    )


def _degraded_info(raw: bytes) -> MessageInfo:
    """Last-resort result if the analysis failed unexpectedly."""
    node = _empty_part()
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


# --------------------------------------------------------------------------
# Sections and search text
# --------------------------------------------------------------------------


def _header_fields(raw: bytes, m: _Entity, names: Sequence[str], negate: bool) -> bytes:
    wanted = {n.strip().lower() for n in names}
    out: list[bytes] = []
    for h in m.headers:
        if (h.name in wanted) != negate:
            chunk = raw[h.start : h.end]
            out.append(chunk if chunk.endswith(b"\n") else chunk + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def _message_section(raw: bytes, m: _Entity, kind: str, fields: Sequence[str]) -> bytes:
    if kind == "HEADER":
        return raw[m.start : m.body_start]
    if kind == "TEXT":
        return raw[m.body_start : m.end]
    if kind == "HEADER.FIELDS":
        return _header_fields(raw, m, fields, False)
    if kind == "HEADER.FIELDS.NOT":
        return _header_fields(raw, m, fields, True)
    return b""


def _get_section(raw: bytes, part: Sequence[int], kind: str | None, fields: Sequence[str]) -> bytes:
    k = kind.strip().upper() if kind else None
    if not part and k is None:
        return raw
    if not part:
        if k == "MIME":
            return b""
        headers, body_start = _parse_headers(raw, 0, len(raw))  # no need for the tree
        root = _Entity(0, body_start, len(raw), headers, {})
        return _message_section(raw, root, k or "", fields)
    ent = _resolve(_build_tree(raw), part)
    if ent is None:
        return b""
    if k is None:
        return raw[ent.body_start : ent.end]
    if k == "MIME":
        return raw[ent.start : ent.body_start]
    if ent.message is None:
        return b""
    return _message_section(raw, ent.message, k, fields)


def get_section(
    raw: bytes, part: tuple[int, ...], kind: str | None, fields: tuple[str, ...] = ()
) -> bytes:
    """Bytes of ``BODY[<part>.<kind> (<fields>)]`` per RFC 3501 §6.4.5.

    ``part`` is the numeric part path (``()`` for the message itself); ``kind``
    is ``None`` (the part's body / the whole message), ``"HEADER"``,
    ``"TEXT"``, ``"MIME"``, ``"HEADER.FIELDS"`` or ``"HEADER.FIELDS.NOT"``
    (with ``fields``).  The result is an exact slice of ``raw`` (the
    HEADER.FIELDS forms are the matching field lines verbatim plus an empty
    line).  Missing parts and meaningless combinations give ``b""``.
    """
    try:
        return _get_section(raw, part, kind, fields)
    except Exception:
        log.exception("section extraction failed")
        return b""


def decode_section(raw: bytes, part: tuple[int, ...]) -> bytes:
    """Body of a part with its Content-Transfer-Encoding removed (b"" if missing)."""
    try:
        ent = _resolve(_build_tree(raw), part)
        if ent is None:
            return b""
        return _decode_body(raw, ent.body_start, ent.end, _cte(raw, ent))
    except Exception:
        log.exception("section decoding failed")
        return b""


def _search_text(raw: bytes, root: _Entity) -> str:
    chunks: list[str] = []
    for _path, ent in _iter_message_parts(root, (), lambda _e: False):
        if ent.message is not None:
            for h in ent.message.headers:
                name = raw[h.start : h.vstart - 1].rstrip(b" \t").decode("ascii")
                chunks.append(f"{name}: {decode_rfc2047(_l1(_hval(raw, h)))}")
        elif ent.mtype == "text":
            data = _decode_body(raw, ent.body_start, ent.end, _cte(raw, ent))
            chunks.append(_decode_charset(data, _param_text(ent.params, "charset")))
    return "\n".join(chunks)


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
