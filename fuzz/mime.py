"""The MIME analysis (imap_store/mime), seeded with the sample messages of tests/samples/.

The analysis is total by design (``parse_message`` and friends catch everything and log it),
so an exception would be hidden: the harness listens to the ``imap_store.mime`` logger and an
error logged there is a finding. Checks, for every message:

* nothing escapes and nothing is logged as an error;
* the stored record is JSON, holds no NUL, and survives ``to_dict``/``from_dict``;
* the IMAP renderings of the envelope and body structure work;
* sections (``BODY[...]``) are slices of the message, decoding and the search text work;
* ``parse_message`` + ``text_for_search`` stay within the linear time budget (fuzz.common).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from hypothesis import strategies as st

from fuzz.common import ROOT, Finding, Harness, usual_payloads
from imap_store.imap.wire import render_bodystructure, render_envelope
from imap_store.mime import MessageInfo, decode_section, get_section, parse_message
from imap_store.mime import text_for_search as search_text


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


_ERRORS = _Errors()
_LOG = logging.getLogger("imap_store.mime")
_LOG.addHandler(_ERRORS)
_LOG.propagate = False  # the fuzzer's output stays readable; errors are findings


def _walk_strings(value: Any, where: str) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise Finding("nul", f"NUL in the stored record at {where}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk_strings(key, where)
            _walk_strings(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _walk_strings(item, f"{where}[{index}]")


def _target(payload: bytes, control: int) -> object:
    info = parse_message(payload)
    return search_text(payload, info)


_SLICE_KINDS = (None, "HEADER", "TEXT", "MIME")


def _run(payload: bytes, control: int) -> None:
    _ERRORS.records.clear()
    info = parse_message(payload)
    record = info.to_dict()
    json.dumps(record)
    _walk_strings(record, "info")
    if MessageInfo.from_dict(record).to_dict() != record:
        raise Finding("roundtrip", "MessageInfo.from_dict(to_dict()) differs")
    if info.size != len(payload) or not 0 <= info.header_size <= len(payload):
        raise Finding("sizes", f"size {info.size}, header_size {info.header_size}")
    render_envelope(info.envelope)
    render_bodystructure(info.bodystructure, True)
    render_bodystructure(info.bodystructure, False)
    if "\x00" in search_text(payload, info):
        raise Finding("nul", "NUL in the search text")
    # Each section parses the message again: fewer of them for big inputs.
    parts: list[tuple[int, ...]] = [(), (1,), *info.attachment_parts[:1]]
    if len(payload) < 16 * 1024:
        parts += [(2,), (1, 1), *info.attachment_parts[1:3]]
    for part in parts:
        for kind in _SLICE_KINDS:
            section = get_section(payload, part, kind)
            if section and payload.find(section) < 0:
                raise Finding("section", f"BODY[{part} {kind}] is not a slice of the message")
        get_section(payload, part, "HEADER.FIELDS", ("From", "Subject"))
        get_section(payload, part, "HEADER.FIELDS.NOT", ("To",))
        if part:
            decode_section(payload, part)
    if _ERRORS.records:
        record0 = _ERRORS.records[0]
        text = logging.Formatter().format(record0)
        _ERRORS.records.clear()
        raise Finding("crash", f"the analysis logged an error (and degraded): {text}")


# -- inputs

_HEADER_NAMES = [
    b"From", b"To", b"Cc", b"Bcc", b"Reply-To", b"Sender", b"Subject", b"Date", b"Message-ID",
    b"In-Reply-To", b"References", b"Content-Type", b"Content-Disposition",
    b"Content-Transfer-Encoding", b"MIME-Version", b"X-MSS-MES", b"content-type", b"X",
]
_VALUE_TOKENS = [
    b"a@b.fr", b"<a@b.fr>", b'"Dr, X" <a@b.fr>', b"Name", b" ", b"\t", b",", b";", b":", b"@",
    b"<", b">", b"(", b")", b"(c (n) \\) )", b'"', b'"q\\"s"', b"[1.2.3.4]", b"g: a@b, c@d;",
    b"@route,@x:a@b", b"=?utf-8?q?=C3=A9t=C3=A9?=", b"=?iso-8859-1?b?6Q==?=", b"=?x?q?a?=", b"=?",
    b"text/plain", b"multipart/mixed", b"message/rfc822", b"multipart/digest", b"; charset=utf-8",
    b"; charset=utf-7", b"; charset=x-unknown", b'; boundary="b"', b"; boundary=b",
    b"; name*0=a; name*1=b", b"; filename*=utf-8''%C3%A9.pdf", b"; name*0*=x'y'%41",
    b"attachment", b"inline", b"base64", b"quoted-printable", b"7bit", b"\r\n ", b"\n\t", b"\xe9",
    b"\xc3\xa9", b"\x00", b"\x01", b"Sun, 15 Feb 2026 09:30:00 +0200", b"99 Foo 10000 99:99:99",
]


@st.composite
def _header(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(_HEADER_NAMES))
    value = b"".join(draw(st.lists(st.sampled_from(_VALUE_TOKENS), max_size=8)))
    return name + draw(st.sampled_from([b": ", b":", b" : "])) + value + b"\r\n"


@st.composite
def _entity(draw: st.DrawFn, depth: int = 0) -> bytes:
    headers = draw(st.lists(_header(), max_size=6))
    kind = draw(st.integers(0, 3 if depth < 3 else 1))
    if kind == 0:
        body = draw(st.sampled_from([b"", b"hello\r\n", b"=C3=A9=\r\nx\r\n", b"aGVsbG8=\r\n",
                                     b"\xff\xfe\r\n", b"--b\r\n", b".\r\n"]))
    elif kind == 1:
        body = draw(st.binary(max_size=64))
    elif kind == 2:
        boundary = draw(st.sampled_from([b"b", b"==x==", b"a b", b""]))
        headers.append(b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n')
        children = draw(st.lists(_entity(depth + 1), max_size=3))
        body = b"".join(b"--" + boundary + b"\r\n" + child + b"\r\n" for child in children)
        if draw(st.booleans()):
            body += b"--" + boundary + b"--\r\n"
    else:
        headers.append(b"Content-Type: message/rfc822\r\n")
        body = draw(_entity(depth + 1))
    return b"".join(headers) + draw(st.sampled_from([b"\r\n", b"\n", b""])) + body


def _samples() -> list[bytes]:
    folder = ROOT / "tests" / "samples"
    return [p.read_bytes() for p in sorted(folder.glob("*.eml"))]


_fragments = st.one_of(
    _header(),
    st.sampled_from(_VALUE_TOKENS),
    st.sampled_from([b"From: a", b" " * 900 + b"\r\n", b"; ", b"--b\r\n", b"(", b"=?a?q?",
                     b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n", b"<", b"\r\n"]),
)

HARNESS = Harness(
    "mime", "MIME analysis: no swallowed error, JSON record, sections, linear time",
    _run, _target,
    payloads=usual_payloads(_entity()),
    fragments=_fragments,
    extra_seeds=_samples,
    max_amplified=128 * 1024,
    openers=(b"From: a", b"To: ", b"Content-Type: text/plain", b"Subject: ", b"Cc: \"",
             b"Content-Type: multipart/mixed; boundary=b\r\n\r\n", b"References: <"),
    middles=(b" ", b"\r\n ", b" " * 60 + b"\r\n", b"; ", b";", b"a,", b"<a@b>, ", b"(", b"((",
             b"=?a?q?", b"=?utf-8?q?x?= ", b"\"", b"--b\r\n", b"--b\r\n\r\n", b"<", b":",
             b"a@", b"\\"),
)
