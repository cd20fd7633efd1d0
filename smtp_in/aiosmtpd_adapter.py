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
- What ``SMTP.__init__`` sets (``INIT_ATTRIBUTES``): its tables of command methods
  (``_smtp_methods``), AUTH mechanisms (``_auth_methods`` of ``_AuthMechAttr``), handler hooks
  (``_handle_hooks``) and ``_ehlo_hook_ver`` come from ``dir()``/``inspect.getmembers()`` of
  the session and the handler at *every* connection (about 1 ms of CPU: ``getmembers`` reads
  every attribute). :class:`AdaptedSMTP` runs aiosmtpd's ``__init__`` once per (class, handler
  class, settings) and later sessions get the same attributes from the names it found, bound
  to themselves (``tests/test_smtp_adapter.py`` compares both ways, attribute by attribute).

Behaviour relied on (no attribute, but checked by the tests of the server):

- the greeting is the first ``push`` of a session, and ``smtp_EHLO``/``smtp_HELO`` send their
  lines through ``push`` (the server adds enhanced status codes to every other reply);
- an exception escaping a command method reaches the handler's ``handle_exception`` and its
  return value is pushed as the reply;
- STARTTLS calls ``connection_made`` a second time, with the TLS transport.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, NamedTuple

from aiosmtpd.smtp import SMTP, _AuthMechAttr, login_always_fail

#: ``SMTP`` methods and class attributes this module uses beyond aiosmtpd's documented API.
CLASS_INTERNALS = ("_getaddr", "_set_post_data_state", "_cb_client_connected",
                   "command_size_limit", "command_size_limits")
#: Every attribute aiosmtpd 1.4.6's ``SMTP.__init__`` sets on the instance (beyond those of
#: ``asyncio.StreamReaderProtocol.__init__``), for the keyword arguments the gateway passes.
INIT_ATTRIBUTES = frozenset({
    "__ident__", "loop", "event_handler", "data_size_limit",
    "enable_SMTPUTF8", "_decode_data", "hostname", "tls_context", "require_starttls",
    "_timeout_duration", "_timeout_handle", "_tls_handshake_okay", "_tls_protocol",
    "_original_transport", "session", "envelope", "transport", "_handler_coroutine",
    "_auth_require_tls", "_proxy_timeout", "_authenticator", "_auth_callback",
    "_auth_required", "_auth_methods", "_handle_hooks", "_ehlo_hook_ver", "_smtp_methods",
    "_enforce_call_limit",
})
#: The keyword arguments the fast path of :class:`AdaptedSMTP` knows (else aiosmtpd's own).
_FAST_KWARGS = frozenset({"data_size_limit", "enable_SMTPUTF8", "hostname", "ident",
                          "tls_context", "require_starttls", "timeout", "auth_require_tls",
                          "loop"})


class _Tables(NamedTuple):
    """What aiosmtpd's ``__init__`` found by introspection, as names (bound per session)."""

    smtp: tuple[str, ...]  # command names: ``smtp_<NAME>`` methods of the session
    hooks: tuple[str, ...]  # ``handle_<NAME>`` methods of the handler
    auth: tuple[tuple[str, str, bool], ...]  # (mechanism, attribute, on the session)
    ehlo_hook_ver: str | None


_TABLES: dict[tuple[type, type, bool], _Tables] = {}
#: Attributes every connected ``SMTP`` instance has, beyond the documented API.
INSTANCE_INTERNALS = ("_reader", "_writer", "_tls_protocol")
#: Attributes of ``asyncio.StreamReader`` used through ``SMTP._reader``.
READER_INTERNALS = ("_buffer",)


class AdaptedSMTP(SMTP):
    """aiosmtpd's ``SMTP`` with its internals behind named methods (see the module)."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        key = (type(self), type(handler), bool(kwargs.get("auth_require_tls", True)))
        tables = _TABLES.get(key)
        known = _FAST_KWARGS.issuperset(kwargs) and bool(kwargs.get("hostname")) and \
            bool(kwargs.get("ident"))
        if tables is None or not known:
            super().__init__(handler, **kwargs)
            if known:
                _TABLES[key] = self._introspected()
        else:
            self._fast_init(handler, tables, **kwargs)
        # A per-session dict instead of the class-level one every session would raise.
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)

    def _introspected(self) -> _Tables:
        """The names behind the tables aiosmtpd's ``__init__`` just built."""
        auth = []
        for mechanism, attr in self._auth_methods.items():
            func = attr.method
            name = getattr(func, "__name__", "")
            auth.append((mechanism, name, attr.is_builtin))
        return _Tables(
            smtp=tuple(self._smtp_methods), hooks=tuple(self._handle_hooks),
            auth=tuple(auth), ehlo_hook_ver=self._ehlo_hook_ver)

    def _fast_init(self, handler: Any, tables: _Tables, *,
                   data_size_limit: int | None = None, enable_SMTPUTF8: bool = False,
                   hostname: str | None = None, ident: str | None = None,
                   tls_context: Any = None, require_starttls: bool = False,
                   timeout: float = 300, auth_require_tls: bool = True,
                   loop: asyncio.AbstractEventLoop | None = None) -> None:
        """aiosmtpd's ``SMTP.__init__`` for the arguments the gateway passes, with the tables
        of an earlier session's introspection (see the module)."""
        loop = loop or asyncio.get_running_loop()
        self.__ident__ = ident or ""
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.event_handler = handler
        self.data_size_limit = data_size_limit
        self.enable_SMTPUTF8 = enable_SMTPUTF8
        self._decode_data = False
        self.hostname = hostname or ""
        self.tls_context = tls_context
        self.require_starttls = tls_context and require_starttls
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = auth_require_tls
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods = {
            mechanism: _AuthMechAttr(getattr(self if builtin else handler, name), builtin)
            for mechanism, name, builtin in tables.auth}
        self._handle_hooks = {name: getattr(handler, "handle_" + name) for name in tables.hooks}
        self._ehlo_hook_ver = tables.ehlo_hook_ver
        self._smtp_methods = {name: getattr(self, "smtp_" + name) for name in tables.smtp}
        self._enforce_call_limit = False

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
