"""Addresses, ENVELOPE (RFC 3501 §7.4.2), message-ids and dates.

RFC 5322 address lists are parsed into IMAP address structures
(``[name, adl, mailbox, host]``, groups included) by a general tokenizer-based
parser, with a regex fast path for the everyday one-address shapes that must
give exactly the same result.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple

from imap_store.mime.headers import _comment, _hval, _l1, _unquote
from imap_store.mime.structure import _Entity, _first_headers

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
#
# Every quantifier is possessive (``*+``, ``++``: nothing taken is given back), so a failed
# match never backtracks and the time is linear in the value. (The phrase, which may end with
# blanks, used to be followed by ``[ \t]*``: a long run of blanks not followed by ``<`` took
# quadratic time, issue 16.) The phrase keeps its leading and trailing blanks out of, or in,
# the group as it happens; the caller strips them, so the result is the same.
_FA = r"[!#$%&'*+\-./0-9=?A-Z^_`a-z{|}~\x80-\xff]++"  # atoms and dots, no blanks
_FAST_ADDR_RE = re.compile(
    r"[ \t]*+(?:"
    rf"(?P<bl>{_FA})@(?P<bd>{_FA})"
    r'|(?:"(?P<q>[\t !#-\[\]-~\x80-\xff]*+)"[ \t]*+'
    r"|(?P<p>[\t !#$%&'*+\-./0-9=?A-Z^_`a-z{|}~\x80-\xff]*+))"
    rf"<(?P<l>{_FA})@(?P<d>{_FA})>"
    r")[ \t]*+"
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


#: Addresses (group markers included) kept per address field in the ENVELOPE and for SEARCH.
#: A header of tens of thousands of addresses would otherwise be stored several times over
#: (1 MB of address groups made 7 MB of envelope) and rendered again at every FETCH; mail with
#: more recipients than this in one field is not a real exchange (Postfix likewise bounds the
#: address tokens of a header it rewrites). Beyond it the list is cut, an open group closed.
MAX_ENVELOPE_ADDRESSES = 1000
#: Characters of one address field that are parsed (the general parser costs about 1 µs per
#: character): the first :data:`MAX_ENVELOPE_ADDRESSES` addresses of any real header fit.
MAX_ADDRESS_FIELD = 64 * 1024


def _capped(parsed: list[Address]) -> list[Address]:
    if len(parsed) <= MAX_ENVELOPE_ADDRESSES:
        return parsed
    kept = parsed[:MAX_ENVELOPE_ADDRESSES]
    depth = 0
    for entry in kept:
        if entry[2] is not None and entry[3] is None:  # group start
            depth = 1
        elif entry[2] is None and entry[3] is None:  # group end
            depth = 0
    if depth:  # close the group the cut left open (an empty one is dropped)
        last = kept[-1]
        if last[2] is not None and last[3] is None:
            kept.pop()
        else:
            kept[-1] = [None, None, None, None]
    return kept


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
        if len(v) > MAX_ADDRESS_FIELD:  # cut after the last whole address that fits
            cut = v.rfind(",", 0, MAX_ADDRESS_FIELD)
            v = v[:cut if cut > 0 else MAX_ADDRESS_FIELD]
        parsed = lists[name] = _capped(_parse_address_list(v))
        return parsed or None

    return _envelope_in_order(text, addrs)


def _envelope_in_order(text: Callable[[str], str | None],
                       addrs: Callable[[str], list[Address] | None]) -> list[Any]:
    """The ENVELOPE fields in RFC 3501's order from a reader of text fields and one of
    address fields; sender and reply-to default to from (RFC 3501 §7.4.2)."""
    from_ = addrs("from")
    return [text("date"), text("subject"), from_, addrs("sender") or from_,
            addrs("reply-to") or from_, addrs("to"), addrs("cc"), addrs("bcc"),
            text("in-reply-to"), text("message-id")]


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
