"""Tests for imap_store.mime (compute-once MIME analysis).

Expected ENVELOPE / BODY / BODYSTRUCTURE strings below were written by hand
from RFC 3501 (§7.4.2 and the §8 sample session), not produced by the code.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import logging
import random
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from imap_store.imap.wire import render_bodystructure, render_envelope
from imap_store.mime import (
    Attachment,
    MessageInfo,
    addresses,
    bodystructure,
    decode_rfc2047,
    decode_section,
    get_section,
    headers,
    message,
    parse_message,
    sections,
    structure,
    text_for_search,
)

SAMPLES_DIR = Path(__file__).parent / "samples"
SAMPLES = sorted(SAMPLES_DIR.glob("*.eml"))

# Every module of the package, in import order.
MIME_MODULES = (headers, structure, addresses, bodystructure, sections, message)


def patch_everywhere(mp: pytest.MonkeyPatch, name: str, replacement: Any) -> None:
    """Replace the helper ``name`` in every MIME module that binds it.

    A caller looks a helper up in its own module, which imported it from the
    module defining it: patching the defining module alone would not reach the
    callers in the other modules.
    """
    real = None
    for mod in MIME_MODULES:
        if name in vars(mod):
            assert real is None or vars(mod)[name] is real, (name, mod.__name__)
            real = vars(mod)[name]
            mp.setattr(mod, name, replacement)
    assert real is not None, name


def sample(prefix: str) -> bytes:
    (path,) = [p for p in SAMPLES if p.name.startswith(prefix)]
    return path.read_bytes()


@pytest.fixture(autouse=True)
def _no_degraded_fallback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """The defensive fallbacks must never be needed: make them fail loudly."""

    def boom(raw: bytes) -> MessageInfo:
        raise AssertionError("parse_message fell back to the degraded structure")

    patch_everywhere(monkeypatch, "_degraded_info", boom)
    with caplog.at_level(logging.ERROR, logger="imap_store.mime"):
        yield
    errors = [r for r in caplog.records if r.name == "imap_store.mime"]
    assert not errors, [r.getMessage() for r in errors]


def leaf_paths(node: dict[str, Any], prefix: tuple[int, ...] = ()) -> list[tuple[Any, ...]]:
    """(part path, node) of every non-multipart node, in IMAP numbering."""
    out: list[tuple[Any, ...]] = []
    if "parts" in node:
        for i, child in enumerate(node["parts"], 1):
            out += leaf_paths(child, (*prefix, i))
        return out
    path = prefix or (1,)
    out.append((path, node))
    body = node.get("body")
    if isinstance(body, dict):  # message/rfc822: number into the embedded message
        out += leaf_paths(body, path if "parts" in body else (*path, 1))
    return out


# --------------------------------------------------------------------------
# Hand-built messages
# --------------------------------------------------------------------------

# The message of the RFC 3501 §8 sample session (headers only; our own body).
SIMPLE = (
    b"Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\r\n"
    b"From: Terry Gray <gray@cac.washington.edu>\r\n"
    b"Subject: IMAP4rev1 WG mtg summary and minutes\r\n"
    b"To: imap@cac.washington.edu\r\n"
    b"cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>\r\n"
    b"Message-Id: <B27397-0100000@cac.washington.edu>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n"
    b"\r\n"
    b"Hello Joe, do you think we can meet at 3:30 tomorrow?\r\n"
    b"Bye\r\n"
)
SIMPLE_HEADER_LEN = SIMPLE.index(b"\r\n\r\n") + 4

MULTI = (
    b"From: =?utf-8?q?Dr_Andr=C3=A9?= <andre@ch.example>\r\n"
    b'To: Equipe: a@x.example, "B. Martin" <b@y.example>;, c@z.example\r\n'
    b"Subject: =?utf-8?q?R=C3=A9sultats?=\r\n"
    b"Reply-To: secretariat@ch.example\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="outer"\r\n'
    b"\r\n"
    b"preamble\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/alternative; boundary=inner\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Hi\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"<p>Hi</p>\r\n"
    b"--inner--\r\n"
    b"\r\n"
    b"--outer\r\n"
    b'Content-Type: application/pdf; name="doc.pdf"\r\n'
    b"Content-Transfer-Encoding: base64\r\n"
    b'Content-Disposition: attachment; filename="doc.pdf"\r\n'
    b"Content-ID: <pdf1@x>\r\n"
    b"Content-Description: Compte rendu\r\n"
    b"\r\n"
    b"JVBERi0xLjQK\r\n"
    b"--outer--\r\n"
    b"epilogue\r\n"
)

FORWARD = (
    b"From: a@x.example\r\n"
    b"Subject: Fwd\r\n"
    b"Content-Type: multipart/mixed; boundary=b1\r\n"
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"see below\r\n"
    b"--b1\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"From: Old <old@y.example>\r\n"
    b"Subject: inner\r\n"
    b"\r\n"
    b"inner body\r\n"
    b"--b1--\r\n"
)
FORWARD_INNER = b"From: Old <old@y.example>\r\nSubject: inner\r\n\r\ninner body"


# --------------------------------------------------------------------------
# Simple text message
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "envelope"),
    [
        pytest.param(
            SIMPLE,
            b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" '
            b'"IMAP4rev1 WG mtg summary and minutes" '
            b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
            b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
            b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
            b'((NIL NIL "imap" "cac.washington.edu")) '
            b'((NIL NIL "minutes" "CNRI.Reston.VA.US")'
            b'("John Klensin" NIL "KLENSIN" "MIT.EDU")) '
            b"NIL NIL "
            b'"<B27397-0100000@cac.washington.edu>")',
            id="simple-rfc3501-sample",
        ),
        pytest.param(
            MULTI,
            b'(NIL "=?utf-8?q?R=C3=A9sultats?=" '
            b'(("=?utf-8?q?Dr_Andr=C3=A9?=" NIL "andre" "ch.example")) '
            b'(("=?utf-8?q?Dr_Andr=C3=A9?=" NIL "andre" "ch.example")) '
            b'((NIL NIL "secretariat" "ch.example")) '
            b'((NIL NIL "Equipe" NIL)(NIL NIL "a" "x.example")'
            b'("B. Martin" NIL "b" "y.example")(NIL NIL NIL NIL)'
            b'(NIL NIL "c" "z.example")) '
            b"NIL NIL NIL NIL)",
            id="multipart-with-group",
        ),
    ],
)
def test_envelope(raw: bytes, envelope: bytes) -> None:
    assert render_envelope(parse_message(raw).envelope) == envelope


def test_simple_body_and_bodystructure() -> None:
    info = parse_message(SIMPLE)
    # body: 55 + 5 octets, two lines
    assert render_bodystructure(info.bodystructure, extended=False) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 60 2)'
    )
    assert render_bodystructure(info.bodystructure, extended=True) == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 60 2 NIL NIL NIL NIL)'
    )


def test_simple_fields() -> None:
    info = parse_message(SIMPLE)
    assert info.size == len(SIMPLE)
    assert info.header_size == SIMPLE_HEADER_LEN
    assert info.subject == "IMAP4rev1 WG mtg summary and minutes"
    assert info.from_addr == "gray@cac.washington.edu"
    assert info.to_addrs == ["imap@cac.washington.edu"]
    assert info.cc_addrs == ["minutes@cnri.reston.va.us", "klensin@mit.edu"]
    assert info.reply_to_addrs == []
    assert info.message_id == "<B27397-0100000@cac.washington.edu>"
    assert info.in_reply_to is None
    assert info.references == []
    assert info.date == datetime(1996, 7, 17, 2, 23, 25, tzinfo=timezone(timedelta(hours=-7)))
    assert info.search_headers["cc"] == (
        "minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>"
    )
    assert info.attachments == []
    assert info.attachments_total_size == 0
    assert not info.has_attachments


def test_simple_sections() -> None:
    header = SIMPLE[:SIMPLE_HEADER_LEN]
    body = SIMPLE[SIMPLE_HEADER_LEN:]
    assert body.startswith(b"Hello Joe")
    assert get_section(SIMPLE, (), None) == SIMPLE
    assert get_section(SIMPLE, (), "HEADER") == header
    assert get_section(SIMPLE, (), "TEXT") == body
    # a non-multipart message has only a part 1: its body
    assert get_section(SIMPLE, (1,), None) == body
    assert get_section(SIMPLE, (1,), "MIME") == header
    assert get_section(SIMPLE, (2,), None) == b""
    assert get_section(SIMPLE, (1, 1), None) == b""
    assert get_section(SIMPLE, (1,), "HEADER") == b""  # not a message/rfc822
    assert get_section(SIMPLE, (), "MIME") == b""
    assert get_section(SIMPLE, (), "HEADER.FIELDS", ("subject", "CC", "x-none")) == (
        b"Subject: IMAP4rev1 WG mtg summary and minutes\r\n"
        b"cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>\r\n"
        b"\r\n"
    )
    not_fields = get_section(
        SIMPLE,
        (),
        "header.fields.not",
        ("Date", "From", "Subject", "To", "Cc", "Message-ID", "MIME-Version"),
    )
    assert not_fields == b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n\r\n"


# --------------------------------------------------------------------------
# multipart/mixed > (multipart/alternative, attachment)
# --------------------------------------------------------------------------

MULTI_BODY = (
    b"("
    b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 2 1)'
    b'("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 9 1)'
    b' "ALTERNATIVE")'
    b'("APPLICATION" "PDF" ("NAME" "doc.pdf") "<pdf1@x>" "Compte rendu" "BASE64" 12)'
    b' "MIXED")'
)
MULTI_BODYSTRUCTURE = (
    b"("
    b'(("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 2 1 NIL NIL NIL NIL)'
    b'("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 9 1 NIL NIL NIL NIL)'
    b' "ALTERNATIVE" ("BOUNDARY" "inner") NIL NIL NIL)'
    b'("APPLICATION" "PDF" ("NAME" "doc.pdf") "<pdf1@x>" "Compte rendu" "BASE64" 12'
    b' NIL ("ATTACHMENT" ("FILENAME" "doc.pdf")) NIL NIL)'
    b' "MIXED" ("BOUNDARY" "outer") NIL NIL NIL)'
)


def test_multipart_body_and_bodystructure() -> None:
    info = parse_message(MULTI)
    assert render_bodystructure(info.bodystructure, extended=False) == MULTI_BODY
    assert render_bodystructure(info.bodystructure, extended=True) == MULTI_BODYSTRUCTURE


def test_multipart_fields_with_group() -> None:
    # the envelope: test_envelope[multipart-with-group]
    info = parse_message(MULTI)
    assert info.to_addrs == ["a@x.example", "b@y.example", "c@z.example"]
    assert info.reply_to_addrs == ["secretariat@ch.example"]
    assert info.subject == "Résultats"
    assert info.search_headers["from"] == "Dr André <andre@ch.example>"
    assert info.search_headers["subject"] == "Résultats"


def test_multipart_sections() -> None:
    alt_start = MULTI.index(b"--inner\r\n")
    alt_end = MULTI.index(b"--inner--\r\n") + len(b"--inner--\r\n")
    assert get_section(MULTI, (1,), None) == MULTI[alt_start:alt_end]
    assert get_section(MULTI, (1,), "MIME") == (
        b"Content-Type: multipart/alternative; boundary=inner\r\n\r\n"
    )
    assert get_section(MULTI, (1, 1), None) == b"Hi"
    assert get_section(MULTI, (1, 2), None) == b"<p>Hi</p>"
    assert get_section(MULTI, (1, 2), "MIME") == (
        b"Content-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    )
    assert get_section(MULTI, (2,), None) == b"JVBERi0xLjQK"
    assert get_section(MULTI, (3,), None) == b""
    assert get_section(MULTI, (2, 1), None) == b""
    assert get_section(MULTI, (0,), None) == b""
    assert get_section(MULTI, (1, 3), "MIME") == b""
    assert get_section(MULTI, (), "TEXT").startswith(b"preamble\r\n--outer\r\n")
    assert get_section(MULTI, (), "TEXT").endswith(b"--outer--\r\nepilogue\r\n")
    assert get_section(MULTI, (), "HEADER.FIELDS", ("TO",)) == (
        b'To: Equipe: a@x.example, "B. Martin" <b@y.example>;, c@z.example\r\n\r\n'
    )
    assert decode_section(MULTI, (2,)) == b"%PDF-1.4\n"
    assert decode_section(MULTI, (1, 2)) == b"<p>Hi</p>"
    assert decode_section(MULTI, (9,)) == b""


def test_multipart_attachments_and_search_text() -> None:
    info = parse_message(MULTI)
    assert info.attachments == [Attachment("doc.pdf", "application/pdf", 9)]
    assert info.attachment_parts == [(2,)]
    assert info.attachments_total_size == 9
    assert info.has_attachments
    text = text_for_search(MULTI, info)
    assert "Hi" in text and "<p>Hi</p>" in text
    assert "JVBERi" not in text and "preamble" not in text


# --------------------------------------------------------------------------
# message/rfc822
# --------------------------------------------------------------------------


def test_message_rfc822_structure() -> None:
    info = parse_message(FORWARD)
    inner_env = (
        b'(NIL "inner" (("Old" NIL "old" "y.example")) (("Old" NIL "old" "y.example")) '
        b'(("Old" NIL "old" "y.example")) NIL NIL NIL NIL NIL)'
    )
    # FORWARD_INNER: 27 + 16 + 2 + 10 = 55 octets, 4 lines (last unterminated)
    assert render_bodystructure(info.bodystructure, extended=False) == (
        b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 9 1)'
        b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 55 ' + inner_env + b" "
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 10 1) 4)'
        b' "MIXED")'
    )
    assert render_bodystructure(info.bodystructure, extended=True) == (
        b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 9 1 NIL NIL NIL NIL)'
        b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 55 ' + inner_env + b" "
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 10 1 NIL NIL NIL NIL) 4'
        b" NIL NIL NIL NIL)"
        b' "MIXED" ("BOUNDARY" "b1") NIL NIL NIL)'
    )


def test_message_rfc822_sections() -> None:
    assert len(FORWARD_INNER) == 55
    assert get_section(FORWARD, (2,), None) == FORWARD_INNER
    assert get_section(FORWARD, (2,), "MIME") == b"Content-Type: message/rfc822\r\n\r\n"
    assert get_section(FORWARD, (2,), "HEADER") == (
        b"From: Old <old@y.example>\r\nSubject: inner\r\n\r\n"
    )
    assert get_section(FORWARD, (2,), "TEXT") == b"inner body"
    assert get_section(FORWARD, (2, 1), None) == b"inner body"
    assert get_section(FORWARD, (2,), "HEADER.FIELDS", ("Subject",)) == (b"Subject: inner\r\n\r\n")
    assert get_section(FORWARD, (2, 2), None) == b""
    text = text_for_search(FORWARD)
    assert "see below" in text and "inner body" in text and "Subject: inner" in text


def test_attached_message_counts_once() -> None:
    raw = FORWARD.replace(
        b"Content-Type: message/rfc822\r\n",
        b"Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n",
    )
    info = parse_message(raw)
    assert info.attachments == [Attachment(None, "message/rfc822", 55)]
    assert info.attachment_parts == [(2,)]


def test_nested_multipart_inside_message() -> None:
    raw = (
        b"Content-Type: message/rfc822\r\n\r\n"
        b"Subject: in\r\nContent-Type: multipart/mixed; boundary=q\r\n\r\n"
        b"--q\r\nContent-Type: image/png; name=a.png\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\niVBORw==\r\n--q--\r\n"
    )
    info = parse_message(raw)
    # top-level message/rfc822: part 1 is the encapsulated message
    assert get_section(raw, (1,), "HEADER").startswith(b"Subject: in\r\n")
    assert get_section(raw, (1, 1), None) == b"iVBORw=="
    assert get_section(raw, (1, 1), "MIME") == (
        b"Content-Type: image/png; name=a.png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    )
    assert info.attachments == [Attachment("a.png", "image/png", 4)]
    assert info.attachment_parts == [(1, 1)]
    assert decode_section(raw, (1, 1)) == b"\x89PNG"


# --------------------------------------------------------------------------
# IMAP string rendering
# --------------------------------------------------------------------------


def test_render_quoting_and_literals() -> None:
    env: list[Any] = [None] * 10
    env[1] = 'a "quoted" \\ subject'
    assert render_envelope(env) == (
        b'(NIL "a \\"quoted\\" \\\\ subject" NIL NIL NIL NIL NIL NIL NIL NIL)'
    )
    env[1] = "été"
    assert render_envelope(env) == b"(NIL {5}\r\n\xc3\xa9t\xc3\xa9 NIL NIL NIL NIL NIL NIL NIL NIL)"
    env[1] = "two\r\nlines"
    assert render_envelope(env) == b"(NIL {10}\r\ntwo\r\nlines NIL NIL NIL NIL NIL NIL NIL NIL)"
    env[1] = "x" * 5000
    assert render_envelope(env).startswith(b"(NIL {5000}\r\nxxx")
    env[1] = "nul\x00here"
    assert render_envelope(env) == b'(NIL "nulhere" NIL NIL NIL NIL NIL NIL NIL NIL)'


def test_render_language_and_disposition() -> None:
    raw = (
        b"Content-Type: text/plain\r\n"
        b"Content-Language: fr, en (english)\r\n"
        b"Content-Location: http://example.org/x\r\n"
        b"Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\n"
        b"Content-Disposition: INLINE\r\n"
        b"\r\n"
        b"x"
    )
    info = parse_message(raw)
    assert render_bodystructure(info.bodystructure, extended=True) == (
        b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 1 1 "Q2hlY2sgSW50ZWdyaXR5IQ==" ("INLINE" NIL)'
        b' ("fr" "en") "http://example.org/x")'
    )


def test_group_only_and_defaults() -> None:
    raw = b"To: undisclosed-recipients:;\r\nFrom: x@y.example (Mr X)\r\n\r\n"
    info = parse_message(raw)
    assert render_envelope(info.envelope) == (
        b'(NIL NIL (("Mr X" NIL "x" "y.example")) (("Mr X" NIL "x" "y.example")) '
        b'(("Mr X" NIL "x" "y.example")) '
        b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) NIL NIL NIL NIL)'
    )
    assert info.to_addrs == []
    assert info.from_addr == "x@y.example"


def test_json_round_trip() -> None:
    for raw in (SIMPLE, MULTI, FORWARD, *[p.read_bytes() for p in SAMPLES]):
        info = parse_message(raw)
        data = json.loads(json.dumps(info.to_dict()))
        again = MessageInfo.from_dict(data)
        assert again == info
        assert render_bodystructure(data["bodystructure"], True) == render_bodystructure(
            info.bodystructure, True
        )
        assert render_envelope(data["envelope"]) == render_envelope(info.envelope)
        # the cache is not needed by text_for_search
        assert text_for_search(raw, again) == text_for_search(raw, info)


# --------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_every_sample(path: Path) -> None:
    raw = path.read_bytes()
    info = parse_message(raw)
    json.dumps(info.to_dict())
    assert info.size == len(raw)
    assert get_section(raw, (), "HEADER") + get_section(raw, (), "TEXT") == raw
    assert len(get_section(raw, (), "HEADER")) == info.header_size
    assert info.from_addr is not None and "@" in info.from_addr
    assert info.to_addrs and all("@" in a for a in info.to_addrs)
    assert info.subject
    render_envelope(info.envelope)
    body = render_bodystructure(info.bodystructure, False)
    extended = render_bodystructure(info.bodystructure, True)
    assert body.startswith(b"(") and extended.startswith(b"(")
    # sizes in the structure are those of the stored (encoded) part bodies
    for part, node in leaf_paths(info.bodystructure):
        section = get_section(raw, part, None)
        assert node["size"] == len(section), part
        assert section in raw
        mime_header = get_section(raw, part, "MIME")
        assert raw.find(mime_header + section) >= 0, part
    text = text_for_search(raw, info)
    assert "\x00" not in text
    assert info.has_attachments == bool(info.attachments)
    assert info.attachments_total_size == sum(a.size for a in info.attachments)


def _oracle_attachments(raw: bytes) -> list[tuple[str | None, str, int]]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    out = []
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        if part.get_content_disposition() == "attachment":
            assert isinstance(payload, bytes)
            out.append((part.get_filename(), part.get_content_type(), len(payload)))
    return out


def test_sample_02_three_pdfs() -> None:
    raw = sample("02")
    info = parse_message(raw)
    assert [a.filename for a in info.attachments] == [
        "Compte_rendu_du_rendez-vous_01567809000.pdf",
        "Résultats_d'analyses_MLeguellec.pdf",
        "Ordonnance_MLeguellec.pdf",
    ]
    assert all(a.content_type == "application/pdf" for a in info.attachments)
    assert [a.size for a in info.attachments] == [1043, 1030, 1035]
    assert info.attachments == [Attachment(*a) for a in _oracle_attachments(raw)]
    assert info.attachments_total_size == 1043 + 1030 + 1035
    assert info.attachment_parts == [(2,), (3,), (4,)]
    for part in info.attachment_parts:
        assert decode_section(raw, part).startswith(b"%PDF-1.3")
    assert info.subject == (
        "Vos résultats d'analyses du Dr Paul André, chef de service département de "
        "gynécologie des hôpitaux universitaires Paris Île de France"
    )
    assert "Suite à notre rendez-vous du 15 mars" in text_for_search(raw, info)
    # RFC 2231 parameter kept in its wire form in BODYSTRUCTURE
    assert b'("FILENAME*" "utf-8\'\'R%C3%A9sultats_d%27analyses_MLeguellec.pdf")' in (
        render_bodystructure(info.bodystructure, True)
    )


def test_sample_03_jpeg_and_xls() -> None:
    raw = sample("03")
    info = parse_message(raw)
    assert info.attachments == [
        Attachment("resultats_scan.jpg", "image/jpeg", 2013),
        Attachment("Compte_rendu_du rendez-vous_090321.xls", "application/vnd.ms-excel", 4008),
    ]
    assert info.attachments == [Attachment(*a) for a in _oracle_attachments(raw)]
    assert decode_section(raw, (2,)).startswith(b"\xff\xd8\xff")
    assert info.subject == "12234567890_PCR_résultats"
    assert info.message_id == (
        "<179530649178.16049.7942541838772192990@labo-biopcr-orly.mssante.fr>"
    )
    assert "Veuillez trouver ci-joint vos résultats." in text_for_search(raw, info)


def test_sample_06_threading_fields() -> None:
    info = parse_message(sample("06"))
    parent = "<179530649177.16049.17724126056944860785@medecin.mssante.fr>"
    assert info.in_reply_to == parent
    assert info.references == [parent]
    assert info.subject == "Re: Préparation de votre rendez-vous"
    assert info.attachments == [Attachment("prise_de_sang_juin.pdf", "application/pdf", 1026)]


def test_sample_11_broken_mime() -> None:
    raw = sample("11")
    info = parse_message(raw)
    assert info.bodystructure["type"] == "MULTIPART"
    assert len(info.bodystructure["parts"]) == 2
    # unclosed boundary: the last part runs to the end of the message
    assert get_section(raw, (1,), None) == b"\xe9t\xe9 \x00 nul"
    assert get_section(raw, (2,), None) == b"!!!not base64!!!\r\n"
    assert info.attachments == [Attachment("x.pdf", "application/pdf", 6)]
    assert len(decode_section(raw, (2,))) == 6
    text = text_for_search(raw, info)
    assert text == "été  nul"  # unknown-8bit falls back; NUL removed
    # the structure can still be rendered
    assert b'("BOUNDARY" "never-closed")' in render_bodystructure(info.bodystructure, True)


def test_sample_12_long_header_line() -> None:
    raw = sample("12")
    info = parse_message(raw)
    assert info.subject == "A" * 5000
    env = render_envelope(info.envelope)
    assert b"{5000}\r\n" + b"A" * 5000 in env
    assert get_section(raw, (), "TEXT") == b"body\r\n"


def test_sample_10_bare_lf_is_body() -> None:
    raw = sample("10")
    info = parse_message(raw)
    assert info.search_headers["subject"] == "test"
    assert info.from_addr == "paul.dupond@ch-exemple.mssante.fr"
    assert get_section(raw, (), "TEXT").startswith(b"hello\n.\r\nMAIL FROM:")


# --------------------------------------------------------------------------
# Header decoding and parameters
# --------------------------------------------------------------------------


def test_decode_rfc2047() -> None:
    assert decode_rfc2047("=?utf-8?q?caf=C3?= =?utf-8?q?=A9?= !") == "café !"
    assert decode_rfc2047("=?UTF-8?B?w6l0w6k=?=") == "été"
    assert decode_rfc2047("a =?iso-8859-1?q?=E9?= b") == "a é b"
    assert decode_rfc2047("=?x-inconnu?q?caf=E9?=") == "café"  # unknown charset
    assert decode_rfc2047("=?utf-8*fr?q?ok?=") == "ok"  # RFC 2231 language tag
    assert decode_rfc2047("plain") == "plain"
    assert decode_rfc2047("=?punycode?q?abc?=") == "abc"  # refused codec
    assert "\x00" not in decode_rfc2047("=?utf-8?q?a=00b?=")


def test_rfc2231_continuations_and_encoded_filenames() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=z\r\n\r\n"
        b"--z\r\n"
        b"Content-Type: application/pdf\r\n"
        b"Content-Disposition: attachment;\r\n"
        b" filename*0*=utf-8''R%C3%A9;\r\n"
        b" filename*1*=sultat%20final;\r\n"
        b" filename*2=.pdf\r\n"
        b"\r\n"
        b"x\r\n"
        b"--z\r\n"
        b"Content-Type: application/octet-stream;\r\n"
        b' name="=?utf-8?q?ordonnance_=C3=A9t=C3=A9?=.txt"\r\n'
        b"\r\n"
        b"y\r\n"
        b"--z\r\n"
        b"Content-Type: image/png\r\n"
        b"Content-Disposition: inline\r\n"
        b"\r\n"
        b"no name, inline: not an attachment\r\n"
        b"--z\r\n"
        b"Content-Type: text/csv; name=data.csv\r\n"
        b"\r\n"
        b"text with a name but no attachment disposition\r\n"
        b"--z\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Disposition: attachment\r\n"
        b"\r\n"
        b"text attachment\r\n"
        b"--z--\r\n"
    )
    info = parse_message(raw)
    assert info.attachments == [
        Attachment("Résultat final.pdf", "application/pdf", 1),
        Attachment("ordonnance été.txt", "application/octet-stream", 1),
        Attachment(None, "text/plain", 15),
    ]
    assert info.attachment_parts == [(1,), (2,), (5,)]
    bs = render_bodystructure(info.bodystructure, True)
    assert b'("ATTACHMENT" ("FILENAME*" "utf-8\'\'R%C3%A9sultat%20final.pdf"))' in bs


def test_content_type_quirks() -> None:
    raw = (
        b'Content-Type: Text/HTML (comment); CharSet = "ISO-8859-1" ; junk ; format=flowed\r\n'
        b"Content-Transfer-Encoding: Quoted-Printable (qp)\r\n"
        b"\r\n"
        b"caf=E9\r\n"
    )
    info = parse_message(raw)
    assert render_bodystructure(info.bodystructure, False) == (
        b'("TEXT" "HTML" ("CHARSET" "ISO-8859-1" "FORMAT" "flowed") NIL NIL "QUOTED-PRINTABLE" 8 1)'
    )
    assert text_for_search(raw, info) == "café\r\n"


def test_invalid_content_type_defaults_to_text_plain() -> None:
    for ct in (b"pdf", b"multipart/mixed", b"/plain", b"text/"):
        raw = b"Content-Type: " + ct + b"\r\n\r\nhello"
        info = parse_message(raw)
        assert render_bodystructure(info.bodystructure, False) == (
            b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 5 1)'
        ), ct


def test_multipart_without_any_part_renders_valid_structure() -> None:
    raw = b"Content-Type: multipart/mixed; boundary=never\r\n\r\njust text\r\n"
    info = parse_message(raw)
    assert render_bodystructure(info.bodystructure, False) == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0) "MIXED")'
    )
    assert get_section(raw, (1,), None) == b""


_DIGEST = (b"Content-Type: multipart/digest; boundary=d\r\n\r\n"
           b"--d\r\n\r\nSubject: one\r\n\r\nfirst\r\n--d--\r\n")


def test_digest_default_is_message_rfc822() -> None:
    (part,) = parse_message(_DIGEST).bodystructure["parts"]
    assert (part["type"], part["subtype"]) == ("MESSAGE", "RFC822")


def test_dates() -> None:
    base = b"Subject: x\r\nDate: %s\r\n\r\n"
    assert parse_message(base % b"Mon, 7 Jun 2021 10:00:00 -0000").date == datetime(
        2021, 6, 7, 10, 0, tzinfo=UTC
    )
    assert parse_message(base % b"not a date").date is None
    assert parse_message(base % b"Mon, 99 Foo 99999999 99:99:99 +9999").date is None


def test_bare_lf_message() -> None:
    raw = (
        b"From: a@b.example\nSubject: lf\nContent-Type: multipart/mixed; boundary=z\n\n"
        b"--z\nContent-Type: text/plain\n\nhello\n--z\nContent-Type: image/gif; name=g.gif\n\n"
        b"GIF\n--z--\n"
    )
    info = parse_message(raw)
    assert info.header_size == raw.index(b"\n\n") + 2
    assert get_section(raw, (1,), None) == b"hello"
    assert get_section(raw, (2,), None) == b"GIF"
    assert get_section(raw, (2,), "MIME") == b"Content-Type: image/gif; name=g.gif\n\n"
    assert info.attachments == [Attachment("g.gif", "image/gif", 3)]


@pytest.mark.parametrize(("raw", "parts", "sections"), [
    pytest.param(_DIGEST, 1, [((1,), "HEADER", b"Subject: one\r\n\r\n"),
                              ((1, 1), None, b"first")], id="digest-parts-are-messages"),
    pytest.param(b"Content-Type: multipart/mixed; boundary=z\r\n\r\n"
                 b"--z\r\n--z\r\n\r\nx\r\n--z--\r\n", 2,
                 [((1,), None, b""), ((2,), None, b"x")],
                 id="consecutive-delimiters-give-empty-parts"),
    pytest.param(b"Content-Type: multipart/mixed; boundary=ab\r\n\r\n"
                 b"--ab\r\nContent-Type: multipart/mixed; boundary=abc\r\n\r\n"
                 b"--abc\r\n\r\none\r\n--abc--\r\n--ab  \r\n\r\ntwo\r\n--ab--\r\n",
                 2, [((1, 1), None, b"one"), ((2,), None, b"two")],
                 id="boundary-prefix-is-not-a-delimiter"),
])
def test_multipart_parts_and_sections(raw: bytes, parts: int,
                                      sections: list[tuple[tuple[int, ...], str | None, bytes]]
                                      ) -> None:
    assert len(parse_message(raw).bodystructure["parts"]) == parts
    for path, spec, expected in sections:
        assert get_section(raw, path, spec) == expected


# --------------------------------------------------------------------------
# Totality and limits
# --------------------------------------------------------------------------

NASTY = [
    b"",
    b"\x00",
    b"\x00" * 1000,
    b"\r\n",
    b"\n\n\n",
    b"no headers at all",
    b"no headers at all\r\nsecond line\r\n",
    b"Subject: only a header without newline",
    b"Subject: header then EOF\r\n",
    b" leading continuation\r\nSubject: x\r\n\r\nbody",
    b"Subject: \xff\xfe\x00bad\r\nFrom: \xe9l\xe8ve <\xe9@\xe8.fr>\r\n\r\n",
    b'From: <>\r\nTo: ,,;:@@<<>>"\r\nCc: (unclosed comment\r\nBcc: "unclosed\r\n\r\n',
    b"To: a@b, g: c@d, h: e@f; x@y\r\n\r\n",
    b"Content-Type: text/plain; charset=x-inconnu\r\n\r\ncaf\xe9\r\n",
    b"Content-Type: text/plain; charset=zlib\r\n\r\ncaf\xe9\r\n",
    b'Content-Type: text/plain; charset=""\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!\r\n',
    b'Content-Type: multipart/mixed; boundary=""\r\n\r\n--\r\nx\r\n',
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b--\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: message/rfc822\r\n",
    b"Content-Type: message/rfc822\r\n\r\n",
    b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"U3ViamVjdDogeA==\r\n",
    b"Content-Type: application/pdf; name*0*=x-bad''%ZZ%; name*1=\"a\r\n\r\n",
    b"Content-Type: text/plain; name*99999999999999999999=x\r\n\r\n",
    b"Content-Disposition: attachment; filename*=utf-8''%E2%82\r\n\r\nx",
    b"Content-Type: text/plain; charset=utf-16\r\n\r\n\xff\xfeh\x00i\x00\x00",
    b"Subject: =?utf-8?B?broken?= =?utf-8?Q?=ZZ?= =?bad?x?y?=\r\n\r\n",
    b"Date: Mon, 32 Foo 2021 25:61:61 +2400\r\n\r\n",
    b"Message-ID: <a@b> <c@d>\r\nReferences: x y\r\nIn-Reply-To: (c) <z@z>\r\n\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n" * 50 + b"--b--",
    b"X-Long: " + b"a" * 100_000 + b"\r\n\r\n",
    b"\r\n\r\n--b\r\n",
]


def _deep_multipart(depth: int) -> bytes:
    head = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
        for i in range(depth)
    )
    tail = b"".join(b"\r\n--b%d--" % i for i in reversed(range(depth)))
    return head + b"Content-Type: text/plain\r\n\r\nleaf" + tail + b"\r\n"


def _exercise(raw: bytes) -> MessageInfo:
    info = parse_message(raw)
    json.dumps(info.to_dict())
    render_envelope(info.envelope)
    render_bodystructure(info.bodystructure, True)
    render_bodystructure(info.bodystructure, False)
    assert get_section(raw, (), "HEADER") + get_section(raw, (), "TEXT") == raw
    for kind in (None, "MIME", "HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        for part in ((), (1,), (1, 1), (2,), (2, 1, 1), (7,)):
            get_section(raw, part, kind, ("subject", "from"))
        decode_section(raw, (1,))
    for part, node in leaf_paths(info.bodystructure):
        if node["size"]:
            assert len(get_section(raw, part, None)) == node["size"]
    text = text_for_search(raw, info)
    assert "\x00" not in text
    assert "\x00" not in json.dumps(info.to_dict(), ensure_ascii=False)
    return info


@pytest.mark.parametrize("raw", NASTY)
def test_total_on_nasty_input(raw: bytes) -> None:
    _exercise(raw)


def test_total_on_random_bytes() -> None:
    rng = random.Random(1234)
    alphabet = b'ab:-\r\n\t =?"<>@;,()\x00\xe9Content-Type: multipart/mixed; boundary=b\r\n--b'
    for _ in range(300):
        n = rng.randrange(0, 400)
        if rng.random() < 0.5:
            raw = bytes(rng.randrange(256) for _ in range(n))
        else:
            raw = bytes(rng.choice(alphabet) for _ in range(n))
        _exercise(raw)
    # mutate real samples
    for path in SAMPLES:
        base = bytearray(path.read_bytes())
        for _ in range(10):
            mutated = bytearray(base)
            for _ in range(20):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            cut = rng.randrange(len(mutated) + 1)
            _exercise(bytes(mutated[:cut]))


def test_depth_cap() -> None:
    raw = _deep_multipart(200)
    info = _exercise(raw)
    node = info.bodystructure
    depth = 0
    while "parts" in node:
        node = node["parts"][0]
        depth += 1
    assert depth == structure.MAX_DEPTH
    assert (node["type"], node["subtype"]) == ("APPLICATION", "OCTET-STREAM")
    shallow = _deep_multipart(10)
    assert get_section(shallow, (1,) * 10, None) == b"leaf"
    assert get_section(shallow, (1,) * 11, None) == b""
    nested_messages = b"Content-Type: message/rfc822\r\n\r\n" * 500 + b"x"
    _exercise(nested_messages)


def test_part_count_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(structure, "MAX_PARTS", 20)  # read by structure._build
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + b"--b\r\n\r\nx\r\n" * 100
    info = parse_message(raw)
    parts = info.bodystructure["parts"]
    assert len(parts) == 19
    # the last analysed part runs to the end of the message
    assert get_section(raw, (19,), None).startswith(b"x\r\n--b\r\n")
    assert get_section(raw, (20,), None) == b""


def test_large_attachment_decoded_size() -> None:
    payload = random.Random(5).randbytes(1_500_001)
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    raw = (
        b"From: a@b.example\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\n"
        b"--z\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        b"--z\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=big.pdf\r\n\r\n" + encoded + b"--z--\r\n"
    )
    info = parse_message(raw)
    assert info.attachments == [Attachment("big.pdf", "application/pdf", len(payload))]
    assert info.attachments_total_size == len(payload)
    assert decode_section(raw, (2,)) == payload
    assert text_for_search(raw, info) == "see attached"


# --------------------------------------------------------------------------
# Fast paths must not change any result
# --------------------------------------------------------------------------

# Values that must take the fast path of _parse_address_list (one regex per address).
FAST_ADDRESS_VALUES = [
    "a@b",
    "marie.chanteau@medecin.mssante.fr",
    "289057512345621@patient.mssante.fr",
    "<a@b>",
    "<marie.chanteau@medecin.mssante.fr>",
    "Dr Marie Chanteau <marie.chanteau@medecin.mssante.fr>",
    '"Chanteau, Marie" <marie.chanteau@medecin.mssante.fr>',
    '"Quoted Name" <a@b>',
    '"" <a@b>',
    '"  padded  " <a@b>',
    '"a@b" <a@b>',
    '"<x> (y) [z]: w;" <a@b>',
    "=?utf-8?q?Dr_Marie?= <a@b>",
    "=?UTF-8?B?w4lsb2RpZQ==?= Martin <e.martin@x.example>",
    "=?utf-8?Q?Dr._Andr=C3=A9?= <andre@ch.example>",
    "Dr. X <a@b>",
    "Dr .X <a@b>",
    "Dr Marie\tChanteau <a@b>",
    "Dr   Marie \t Chanteau\t<a@b>",
    "  Dr Marie  <a@b>  ",
    "\ta@b\t",
    " <a@b> ",
    "Name<a@b>",
    "a.b.@c.",
    ".a@b",
    "a+tag@sub.b.example",
    "!#$%&'*+-/=?^_`{|}~@b",
    "Ã\x89lodie Martin <e@x>",  # UTF-8 name, latin-1 transparent
    "VoilÃ\xa0 <a@b>",  # ends with U+00A0: str.strip() removes it
    "Ã\xa0 B\x85 <a@b>",
    "\xa0 <a@b>",
    "é@à.fr",
    "<Ã\xa0@b>",
    "a@b, c@d",
    "a@b,c@d",
    "Dr A <a@b>, B <b@c>, c@d",
    "a@b ,\t<c@d> , Name Here <e@f>",
    '"Dupont Jean" <j@x>,"Martin Marie" <m@y>, c@d',
]

TRICKY_ADDRESS_VALUES = [
    "",
    " ",
    "\t",
    ",",
    "a@b,",
    ",a@b",
    "a@b,,c@d",
    "a@b;",
    "a",
    "@b",
    "a@",
    "<>",
    "<a@b",
    "Name <a@b",
    "a@b>",
    "<a@b> trailing",
    "<a@b>.",
    "<a@b> (comment)",
    "a@b (Comment Name)",
    "(lead) a@b",
    "a(inner)@b",
    "Name (c) <a@b>",
    "(c1) (c2) a@b",
    "a@b (unclosed",
    "((nested) comment) a@b",
    "(\\) escaped) a@b",
    '"Quote \\" inside" <a@b>',
    '"back\\\\slash" <a@b>',
    '"unclosed <a@b>',
    '"a" "b" <a@b>',
    'Dr "Marie" X <a@b>',
    '"Chanteau, Marie" <a@b>, c@d',
    '"q l"@b',
    '<"q"@b>',
    '"a"@b, c@d',
    '"a, b" <a@b>, c@d',
    '"Dupont Jean" <j@x>, "Martin, Marie" <m@y>',
    '"a" <a@b>, "b, c@d',
    '"a" <a@b>, b" <c@d>',
    '"a" <a@b>, <c@d> "',
    "undisclosed-recipients:;",
    "undisclosed-recipients: ;",
    'Equipe: a@x.example, "B. Martin" <b@y.example>;, c@z.example',
    "g: c@d, h: e@f; x@y",
    "g:",
    "g: a@b",
    ":;",
    "a@b:c",
    "a@b@c",
    "<a@b@c>",
    "a @ b",
    "a. b@c",
    "Name a@b",
    "<a b@c>",
    "< a@b >",
    "<@route:a@b>",
    "Name <@r1,@r2:a@b>",
    "a@[192.0.2.1]",
    "<a@[IPv6:2001:db8::1]>",
    "[1.2.3.4]",
    "a@[unclosed",
    "Dr. X, Y <a@b>",
    "back\\slash <a@b>",
    "a\\b@c",
    "Name\r\n <a@b>",
    "a@b\r\n",
    "\r\na@b",
    "a@b\n",
    "Name\x0b<a@b>",
    "Name\x0c <a@b>",
    "a\x00b@c",
    "\x00 <a@b>",
    "Name\x1f <a@b>",
    "é\x85@b",
    "a@b\xa0",
    "\xa0a@b",
    "Ã\xa0 ,a@b",
    "a@b; c@d",
    "Name <a@b>; x",
    "<a@b>>",
    "<<a@b>",
    "a@b <c@d>",
    "=?utf-8?q?a,b?= <a@b>",
    "=?utf-8?q?a:b?= <a@b>",
    "=?utf-8?q?a@b?= <a@b>",
]


class _CountingGeneralParser:
    """Stands in for addresses._parse_address_list_general and counts its calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = addresses._parse_address_list_general
        self.calls = 0
        patch_everywhere(monkeypatch, "_parse_address_list_general", self)

    def __call__(self, value: str) -> list[Any]:
        self.calls += 1
        return self.real(value)


def test_fast_address_path_matches_general_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    general = _CountingGeneralParser(monkeypatch)
    for value in FAST_ADDRESS_VALUES:
        expected = general.real(value)
        assert addresses._parse_address_list(value) == expected, value
        assert general.calls == 0, f"general parser used for {value!r}"
    for value in TRICKY_ADDRESS_VALUES:
        assert addresses._parse_address_list(value) == general.real(value), value
    assert general.calls > 0  # the stand-in really intercepts the general parser
    # a few results spelled out, so that the general parser is pinned too
    assert addresses._parse_address_list("Dr. X <a@b>") == [["Dr. X", None, "a", "b"]]
    assert addresses._parse_address_list("VoilÃ\xa0 <a@b>") == [["VoilÃ", None, "a", "b"]]
    assert addresses._parse_address_list('"  padded  " <a@b>') == [["padded", None, "a", "b"]]
    assert addresses._parse_address_list(" <a@b> ") == [[None, None, "a", "b"]]
    assert addresses._parse_address_list("Ã\x89lodie <e@x>") == [["Élodie", None, "e", "x"]]
    assert addresses._parse_address_list("") == []


_SIMPLE_NAMES = ["", "Dr", "Marie", "Dr.", "X", ".", "=?utf-8?q?Dr_Marie?=", "Ã\xa0", "\xa0", "Ã©"]
_SIMPLE_LOCALS = ["a", "marie.chanteau", "289057512345621", "a.b.", ".a", "é", "\xa0"]
_SIMPLE_DOMAINS = ["b", "medecin.mssante.fr", "b.", "à.fr"]
_SIMPLE_BLANKS = ["", " ", " ", "  ", "\t", " \t "]
_TRICKY_NAMES = [
    *_SIMPLE_NAMES,
    "=?UTF-8?B?w4lsb2RpZQ==?=",
    "\x85",
    '"Quoted Name"',
    '"a\\"b"',
    '"',
    '""',
    '" spaced "',
    '"x,y"',
    '"a@b"',
    '"<x>"',
    "(comment)",
    "(a(b)c)",
    "\\",
    "\x00",
    "\x0b",
    "\x1f",
    "g:",
    ";",
    "!#$%&'*+-/=?^_`{|}~",
]
_TRICKY_LOCALS = [*_SIMPLE_LOCALS, "", '"q l"', "a b", "a\\b"]
_TRICKY_DOMAINS = [*_SIMPLE_DOMAINS, "[192.0.2.1]", "", "b@c", "b c", "[x"]
_TRICKY_BLANKS = [*_SIMPLE_BLANKS, "\r\n ", "\xa0", "\n", "\r"]


def _random_address_value(rng: random.Random) -> str:
    """A value made of simple pieces, or of simple and tricky pieces mixed."""
    simple = rng.random() < 0.5
    names = _SIMPLE_NAMES if simple else _TRICKY_NAMES
    locals_ = _SIMPLE_LOCALS if simple else _TRICKY_LOCALS
    domains = _SIMPLE_DOMAINS if simple else _TRICKY_DOMAINS
    blanks = _SIMPLE_BLANKS if simple else _TRICKY_BLANKS
    out: list[str] = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if out:
            out.append(rng.choice([",", ", ", " ,", " , "] if simple else [",,", ";", "\r\n,"]))
        out.append(rng.choice(blanks))
        if rng.random() < 0.5:  # phrase and angle address
            if rng.random() < 0.2:
                out.append('"' + rng.choice(names).replace('"', "") + '"')
            out += [rng.choice(names) + rng.choice(blanks) for _ in range(rng.randrange(4))]
            lt, gt = "<", ">"
            if not simple:
                lt, gt = rng.choice(["<", "< ", "<@r:"]), rng.choice([">", ""])
        else:
            lt = gt = ""
        at = "@" if simple else rng.choice(["@", "", "@@"])
        out.append(lt + rng.choice(locals_) + at + rng.choice(domains) + gt)
        out.append(rng.choice(blanks if simple else [*blanks, "(c)", ">", "."]))
    return "".join(out)


def test_fast_address_path_random_differential(monkeypatch: pytest.MonkeyPatch) -> None:
    general = _CountingGeneralParser(monkeypatch)
    rng = random.Random(2026)
    alphabet = 'ab .@<>"\\(),;:[]\t\r\n\xa0\x85Ã=?_\x00'
    fast = 0
    for i in range(40_000):
        if i % 4:
            value = _random_address_value(rng)
        else:
            value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(14)))
        calls = general.calls
        assert addresses._parse_address_list(value) == general.real(value), repr(value)
        fast += general.calls == calls
    assert fast > 10_000  # the fast path was really exercised
    assert general.calls > 10_000  # and so was the general parser, through the stand-in


def _hval_unfold_then_strip(raw: bytes, h: Any) -> str:
    """_hval as first written: unfold, then strip."""
    v = raw[h.vstart : h.end]
    if b"\n" in v:
        v = re.sub(rb"\r?\n(?=[ \t])", b"", v)
    return v.strip(b" \t\r\n").decode("latin-1")


def test_hval_strip_before_unfold_is_equivalent() -> None:
    rng = random.Random(99)
    alphabet = b"\r\n \tab:\x00\xe9"
    raws = [p.read_bytes() for p in SAMPLES] + [SIMPLE, MULTI, FORWARD, *NASTY]
    for _ in range(5000):
        raws.append(b"X: " + bytes(rng.choice(alphabet) for _ in range(rng.randrange(20))))
    raws += [
        b"X: a\r\n \r\n\r\nbody",
        b"X: a\r\r\n b\n\tc\r\n\r\n d\r\n",
        b"X:\r\n \r\n \r\n",
        b"X: \n\n a",
    ]
    checked = 0
    for raw in raws:
        fields, _ = headers._parse_headers(raw, 0, len(raw))
        for h in fields:
            assert headers._hval(raw, h) == _hval_unfold_then_strip(raw, h), raw[h.start : h.end]
            checked += 1
    assert checked > 5000


def _original_envelope(raw: bytes, m: Any) -> list[Any]:
    """addresses._envelope before the address lists were shared (for the reference)."""
    first = structure._first_headers(m)

    def text(name: str) -> str | None:
        h = first.get(name)
        return headers._l1(headers._hval(raw, h)) if h is not None else None

    def addrs(name: str) -> list[Any] | None:
        h = first.get(name)
        if h is None:
            return None
        return addresses._parse_address_list(headers._hval(raw, h)) or None

    return addresses._envelope_in_order(text, addrs)


def _original_parse(raw: bytes) -> MessageInfo:
    """message._parse as it was before the fast paths: each header parsed as needed.

    Run under _original_code() so that the helpers it reaches are the
    original ones too (general address parser, unfold-then-strip _hval).
    """
    root = structure._build_tree(raw)
    first = structure._first_headers(root)
    envelope = addresses._envelope(raw, root)

    search: dict[str, list[str]] = {}
    for h in root.headers:
        search.setdefault(h.name, []).append(decode_rfc2047(headers._l1(headers._hval(raw, h))))

    def value(name: str) -> str | None:
        h = first.get(name)
        return headers._l1(headers._hval(raw, h)) if h is not None else None

    def specs(name: str) -> list[str]:
        h = first.get(name)
        if h is None:
            return []
        return addresses._addr_specs(addresses._parse_address_list(headers._hval(raw, h)))

    from_list = specs("from")
    refs_value = value("references") or ""
    references = [addresses._WS_RE.sub("", r) for r in addresses._MSGID_RE.findall(refs_value)]
    if not references:
        references = refs_value.split()

    # the walk of the parts has no fast path: the reference runs the real one (with the
    # original helpers, e.g. _hval, that it reaches)
    attachments, parts = message._attachments(raw, root)
    return MessageInfo(
        size=len(raw),
        header_size=root.body_start,
        envelope=envelope,
        bodystructure=bodystructure._bs_node(raw, root),
        subject=decode_rfc2047(value("subject") or ""),
        from_addr=from_list[0] if from_list else None,
        to_addrs=specs("to"),
        cc_addrs=specs("cc"),
        bcc_addrs=specs("bcc"),
        reply_to_addrs=specs("reply-to"),
        message_id=addresses._first_msgid(value("message-id")),
        in_reply_to=addresses._first_msgid(value("in-reply-to")),
        references=references,
        date=addresses._parse_date(value("date")),
        # SEARCH's address fields also spell each address as mailbox@host (issue 13)
        search_headers=message._with_addresses(search, {
            name: addresses._parse_address_list(headers._hval(raw, first[name]))
            for name in ("from", "to", "cc", "bcc") if name in first}),
        attachments=attachments,
        attachment_parts=parts,
        attachments_total_size=sum(a.size for a in attachments),
        has_attachments=bool(attachments),
        _tree=root,
    )


def _no_fast_path(value: str) -> Any:
    raise AssertionError(f"the reference reached the address fast path for {value!r}")


def _reference_dict(monkeypatch: pytest.MonkeyPatch, raw: bytes) -> dict[str, Any]:
    with monkeypatch.context() as mp:
        patch_everywhere(mp, "_parse_address_list", addresses._parse_address_list_general)
        patch_everywhere(mp, "_hval", _hval_unfold_then_strip)
        patch_everywhere(mp, "_envelope", _original_envelope)
        patch_everywhere(mp, "_fast_address", _no_fast_path)
        return _original_parse(raw).to_dict()


ADDRESS_HEADERS_MESSAGE = (
    b"From: =?utf-8?q?Dr_Andr=C3=A9?= <andre@ch.example>\r\n"
    b"Sender: Secretariat (desk) <sec@ch.example>\r\n"
    b'To: "Chanteau, Marie" <marie@x.example>, b@y.example,\r\n\tDr. Who <who@z.example>\r\n'
    b"Cc: undisclosed-recipients:;\r\n"
    b"Bcc: <hidden@x.example>\r\n"
    b"To: second-to-field@ignored.example\r\n"
    b"Subject: x\r\n"
    b"\r\n"
    b"body\r\n"
)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_parse_message_matches_original_on_samples(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = path.read_bytes()
    assert parse_message(raw).to_dict() == _reference_dict(monkeypatch, raw)


def test_parse_message_matches_original_on_other_messages(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    raws = [SIMPLE, MULTI, FORWARD, ADDRESS_HEADERS_MESSAGE, *NASTY]
    raws += [
        b"From: " + v.encode("latin-1") + b"\r\nTo: " + w.encode("latin-1") + b"\r\n"
        b"Reply-To: " + w.encode("latin-1") + b"\r\n\r\nx"
        for v, w in zip(FAST_ADDRESS_VALUES, TRICKY_ADDRESS_VALUES, strict=False)
    ]
    rng = random.Random(77)
    for base in [p.read_bytes() for p in SAMPLES] + [MULTI, ADDRESS_HEADERS_MESSAGE]:
        head = base[: base.find(b"\r\n\r\n") + 4 if b"\r\n\r\n" in base else len(base)]
        for _ in range(40):
            mutated = bytearray(head)
            for _ in range(rng.randrange(1, 8)):
                mutated[rng.randrange(len(mutated))] = rng.choice(b'\r\n\t ,;:<>@"()\\.=\xa0\xc3')
            raws.append(bytes(mutated) + base[len(head) :])
    for raw in raws:
        assert parse_message(raw).to_dict() == _reference_dict(monkeypatch, raw), raw[:300]


def test_address_headers_are_parsed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = addresses._parse_address_list

    def counting(value: str) -> list[Any]:
        calls.append(value)
        return real(value)

    patch_everywhere(monkeypatch, "_parse_address_list", counting)
    info = parse_message(ADDRESS_HEADERS_MESSAGE)
    assert len(calls) == 5  # From, Sender, To, Cc, Bcc: once each
    assert len(set(calls)) == 5
    assert info.from_addr == "andre@ch.example"
    assert info.to_addrs == ["marie@x.example", "b@y.example", "who@z.example"]
    assert info.cc_addrs == []
    assert info.bcc_addrs == ["hidden@x.example"]
    # the envelope's reply-to defaults to From; reply_to_addrs is Reply-To itself
    assert info.reply_to_addrs == []
    assert (
        info.envelope[4]
        == info.envelope[2]
        == [["=?utf-8?q?Dr_Andr=C3=A9?=", None, "andre", "ch.example"]]
    )
    assert info.envelope[3] == [["Secretariat", None, "sec", "ch.example"]]


def test_binary_refused_reads_the_stored_structure_as_binary_section_reads_bytes() -> None:
    """FETCH BINARY checks every message of a set from its stored body structure before it
    sends anything (RFC 3516 §4.2): that check and the section's decoding agree on every part
    of the samples and of a message with unknown encodings at each depth."""
    from imap_store.mime import binary_refused, binary_section

    nested = (
        b"Subject: n\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=o\r\n\r\n"
        b"--o\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: x-unknown\r\n\r\na\r\n"
        b"--o\r\nContent-Type: message/rfc822\r\n\r\n"
        b"Subject: in\r\nContent-Type: multipart/alternative; boundary=i\r\n\r\n"
        b"--i\r\nContent-Type: text/plain\r\n\r\nb\r\n"
        b"--i\r\nContent-Type: text/html\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nc\r\n"
        b"--i--\r\n"
        b"--o\r\nContent-Type: message/rfc822\r\n\r\n"
        b"Subject: single\r\nContent-Transfer-Encoding: x-gzip\r\n\r\nd\r\n"
        b"--o--\r\n")
    single = b"Subject: s\r\nContent-Transfer-Encoding: X-Unknown\r\n\r\ne\r\n"
    parts = [(), (1,), (2,), (3,), (4,), (1, 1), (2, 1), (2, 2), (2, 1, 1), (2, 2, 1),
             (3, 1), (3, 2), (2, 3), (0,), (1, 2)]
    messages = [nested, single] + [p.read_bytes() for p in SAMPLES]
    refused = 0
    for raw in messages:
        structure = parse_message(raw).to_dict()["bodystructure"]
        for part in parts:
            expected = binary_section(raw, part) is None
            assert binary_refused(structure, part) == expected, (raw[:40], part)
            refused += expected
    assert refused == 4  # nested: 1, 2.2, 3.1 (3 is the message/rfc822 part: 7bit); single: 1
