"""The fast reading of MAIL/RCPT paths gives exactly what aiosmtpd's full parser gives."""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP

from smtp_in.server import GatewaySMTP

PATHS = [
    "<a@b.c>", "<a@b.c> SIZE=10", "<a.b@c-d.e>  BODY=8BITMIME", "<a@b.c>\tSIZE=1",
    "<A+B@x.Y>", "<marie.chanteau@medecin.mssante.fr> SIZE=4096",
    "<289057512345621@patient.mssante.fr>", "<a@b>x", "<a@b.>", "<a..b@c>", "<.a@b>",
    "<a@-b.c>", "<a@b.c>>", "<a@b.c> (comment) SIZE=1", "<a@b.c>(c)", "<>", "< a@b.c >",
    '<"quoted local"@b.c>', "<@route:a@b.c>", "<a@[127.0.0.1]>", "<é@b.c>", "<a@b.c",
    "a@b.c", " <a@b.c>", "<a@b.c> ", "<a@b.c>  ", "<a b@c.d>", "<a@b@c.d>", "",
    "<" + "x" * 65 + "@b.c>", "<" + "x" * 64 + "@b.c>", "<a@b.c> SIZE=1 BODY=8BITMIME",
]


def _parsed(cls: type[SMTP], arg: str, limit: int) -> object:
    server = object.__new__(GatewaySMTP)
    server.local_part_limit = limit
    try:
        return cls._getaddr(server, arg)
    except Exception as exc:  # the comparison covers failures too
        return type(exc)


@pytest.mark.parametrize("limit", [0, 64])
@pytest.mark.parametrize("arg", PATHS)
def test_fast_path_matches_aiosmtpd(arg: str, limit: int) -> None:
    assert _parsed(GatewaySMTP, arg, limit) == _parsed(SMTP, arg, limit)


def test_fast_path_is_taken_for_plain_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    def full_parser(self: SMTP, arg: str) -> tuple[str | None, str | None]:
        raise AssertionError(f"full parser called for {arg!r}")

    monkeypatch.setattr(SMTP, "_getaddr", full_parser)
    assert _parsed(GatewaySMTP, "<a.b@c.d> SIZE=10", 0) == ("a.b@c.d", "SIZE=10")
    assert _parsed(GatewaySMTP, "<a@b.c>", 64) == ("a@b.c", "")
    assert _parsed(GatewaySMTP, "<a@b.c> (comment)", 0) is AssertionError  # not the fast path
