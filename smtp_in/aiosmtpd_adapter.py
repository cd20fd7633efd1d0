"""Every use of aiosmtpd's internals, in one place (aiosmtpd is pinned in pyproject.toml).

aiosmtpd documents the ``SMTP`` constructor, the ``smtp_<COMMAND>``/``auth_<MECHANISM>``
methods, the handler's ``handle_<COMMAND>`` hooks, ``push``, ``challenge_auth``,
``line_length_limit`` and ``local_part_limit``. The gateway needs a little more: it reads DATA
itself, groups pipelined replies and reads addresses faster. :class:`AdaptedSMTP` wraps each
such internal in a named method, so that ``smtp_in/server.py`` uses documented names only and
an aiosmtpd upgrade has one module to check. ``tests/test_smtp_adapter.py`` fails, naming the
attribute, when one of them disappears.

Internals used, and why (checked against aiosmtpd 1.4.6):

- ``SMTP._reader`` (the ``asyncio.StreamReader`` set by ``_cb_client_connected``): our DATA
  reads raw chunks from it (:meth:`AdaptedSMTP.read_chunk`) instead of aiosmtpd's line by
  line reading.
- ``asyncio.StreamReader._buffer`` (a ``bytearray``, private to asyncio, reached through
  ``SMTP._reader``): bytes received but not read yet. :meth:`AdaptedSMTP.has_buffered_line`
  tells whether the client's next command is already here (RFC 2920 reply grouping) and
  :meth:`AdaptedSMTP.unread` puts pipelined commands read past the end-of-data back in front.
- ``SMTP._writer`` (the ``asyncio.StreamWriter``): our ``push`` writes held replies together
  (:meth:`AdaptedSMTP.send_raw`).
- ``SMTP._tls_protocol``: set by ``smtp_STARTTLS``, ``None`` before; the only record that
  STARTTLS completed (:attr:`AdaptedSMTP.starttls_done`).
- ``SMTP._set_post_data_state()``: resets the envelope after DATA; aiosmtpd's ``smtp_DATA``
  calls it and ours replaces that method (:meth:`AdaptedSMTP.set_post_data_state`).
- ``SMTP._getaddr(arg)``: aiosmtpd's path parser, called by its ``smtp_MAIL`` and
  ``smtp_RCPT``. Overridden here to call :meth:`AdaptedSMTP.parse_path`, which subclasses
  override (a fast path); :meth:`AdaptedSMTP.full_parse_path` is aiosmtpd's own parser.
- ``SMTP.command_size_limits`` / ``SMTP.command_size_limit``: the class-level ``defaultdict``
  of command line limits, which ``smtp_EHLO`` raises for MAIL at every EHLO: shared by all
  sessions, it would grow for ever. Each session gets its own (in ``__init__``).

Behaviour relied on (no attribute, but checked by the tests of the server):

- the greeting is the first ``push`` of a session, and ``smtp_EHLO``/``smtp_HELO`` send their
  lines through ``push`` (the server adds enhanced status codes to every other reply);
- an exception escaping a command method reaches the handler's ``handle_exception`` and its
  return value is pushed as the reply;
- STARTTLS calls ``connection_made`` a second time, with the TLS transport.
"""

from __future__ import annotations

import collections
from typing import Any

from aiosmtpd.smtp import SMTP

#: ``SMTP`` methods and class attributes this module uses beyond aiosmtpd's documented API.
CLASS_INTERNALS = ("_getaddr", "_set_post_data_state", "_cb_client_connected",
                   "command_size_limit", "command_size_limits")
#: Attributes every connected ``SMTP`` instance has, beyond the documented API.
INSTANCE_INTERNALS = ("_reader", "_writer", "_tls_protocol")
#: Attributes of ``asyncio.StreamReader`` used through ``SMTP._reader``.
READER_INTERNALS = ("_buffer",)


class AdaptedSMTP(SMTP):
    """aiosmtpd's ``SMTP`` with its internals behind named methods (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # A per-session dict instead of the class-level one every session would raise.
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)

    # --- the stream ----------------------------------------------------------------------

    def buffered_bytes(self) -> bytearray:
        """Bytes received from the client and not read yet (the reader's live buffer: do not
        change it, see :meth:`unread`)."""
        buffer: bytearray = self._reader._buffer  # type: ignore[attr-defined]
        return buffer

    def has_buffered_line(self) -> bool:
        """Whether a whole command line (or more) is already received and not read yet."""
        return b"\n" in self._reader._buffer  # type: ignore[attr-defined]

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front of what the command reader reads next."""
        self._reader._buffer[:0] = data  # type: ignore[attr-defined]

    async def read_chunk(self, n: int) -> bytes:
        """Up to ``n`` bytes as they arrive (``b""`` at the end of the stream)."""
        return await self._reader.read(n)

    async def send_raw(self, data: bytes) -> None:
        """Write ``data`` as is (replies with their CRLF), waiting while the peer is slow."""
        self._writer.write(data)
        await self._writer.drain()

    @property
    def starttls_done(self) -> bool:
        """Whether STARTTLS switched this session to TLS."""
        return self._tls_protocol is not None

    # --- transaction state ---------------------------------------------------------------

    def set_post_data_state(self) -> None:
        """A new, empty envelope, as aiosmtpd leaves the session after DATA."""
        self._set_post_data_state()  # type: ignore[no-untyped-call]

    # --- addresses -----------------------------------------------------------------------

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        return self.parse_path(arg)

    def parse_path(self, arg: str) -> tuple[str | None, str | None]:
        """The address of a MAIL or RCPT argument and what follows it (the parameters);
        ``(None, None)`` when malformed. Subclasses may add a fast path."""
        return self.full_parse_path(arg)

    def full_parse_path(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's full RFC 5322 parser of MAIL and RCPT paths."""
        result: tuple[str | None, str | None] = SMTP._getaddr(self, arg)
        return result
