"""Header-level decoding: charsets, transfer encodings, RFC 2047, header blocks, parameters.

Everything here works on raw bytes or on latin-1 transparent strings (one
character per header byte) and knows nothing of the entity tree:

* charsets and Content-Transfer-Encoding (``_text``, ``_l1``, ``_decode_charset``,
  ``_b64decode``, ``_decode_body``, ``_decoded_size``);
* RFC 2047 encoded-words (:func:`decode_rfc2047`);
* header blocks (``_Header``, ``_parse_headers``, ``_hval``);
* structured values: comments, quoted strings, parameters with RFC 2231
  continuations, Content-Type and Content-Disposition.
"""

from __future__ import annotations

import binascii
import codecs
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

#: Maximum number of header fields indexed per entity (DoS guard).
MAX_HEADERS = 10_000

# Chunk size used when streaming over big bodies.
_CHUNK = 1 << 20


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


@dataclass(slots=True, eq=False)
class _Header:
    name: str  # lower-case field name
    start: int  # first byte of the field line
    vstart: int  # first byte after the colon
    end: int  # end of the last continuation line, terminator included


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
        v = _unfold(v)
    return v.decode("latin-1")


def _unfold(v: bytes) -> bytes:
    """``_FOLD_RE.sub(b"", v)`` (drop each line break followed by a blank) line by line: a
    regular-expression substitution over a 1 MB header held the GIL for 20 ms in one C call,
    during which the event loop could not run (bench/loop_hold.py); a Python loop gives the
    GIL up between lines."""
    lines = v.split(b"\n")
    out = [lines[0]]
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            if out[-1].endswith(b"\r"):
                out[-1] = out[-1][:-1]
            out.append(line)
        else:
            out.append(b"\n" + line)
    return b"".join(out)


# --------------------------------------------------------------------------
# Structured header values (RFC 2045 / 2183 / 2231)
# --------------------------------------------------------------------------

_QSTR_RE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.S)
_PLAIN_RE = re.compile(r'[^"(]+')
_CMT_CHUNK_RE = re.compile(r"[^\\()]+")
_UNESCAPE_RE = re.compile(r"\\(.)", re.S)
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")
#: Separators before a parameter; skipped on their own so that a failed parameter costs only
#: its own length (a long run of ``; ; ;`` used to be rescanned for every ``;``: issue 16).
_PARAM_SEP_RE = re.compile(r"[\s;]*+")
_PARAM_RE = re.compile(r'([^\s=;"]++)\s*+=\s*+("[^"\\]*+(?:\\.[^"\\]*+)*+"?|[^;]*+)', re.S)
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


#: ``name=value`` pairs kept per header field (RFC 2231 segments counted one by one): they are
#: stored in the body structure and rendered at every FETCH BODYSTRUCTURE (100,000 of them
#: took 180 ms to render); 256 segments hold a 20,000-character file name.
MAX_PARAMETERS = 256


def _parse_params(s: str) -> list[tuple[str, str]]:
    """``; name=value`` pairs (names lower-cased), RFC 2231 continuations merged."""
    raw_params: list[tuple[str, str]] = []
    i, n = 0, len(s)
    while i < n:
        sep = _PARAM_SEP_RE.match(s, i)
        assert sep is not None  # matches the empty string
        i = sep.end()
        if i >= n:
            break
        m = _PARAM_RE.match(s, i)
        if m is None:  # garbage segment: skip to the next ";"
            j = s.find(";", i)
            if j < 0:
                break
            i = j + 1
            continue
        raw_params.append((m.group(1).lower(), _unquote(m.group(2))))
        if len(raw_params) >= MAX_PARAMETERS:
            break
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
