"""The asyncio edge of the IMAP server (SPEC §5, RFC 3501): listeners with STARTTLS (``imap``)
or implicit TLS (``imaps``), the read loop feeding the sans-IO parser and session, literal
continuations, IDLE, timeouts, per-IP connection and bad-command limits, and the per-process
change watcher that tells sessions a selected mailbox moved.

Unexpected errors end the connection with ``* BYE [SERVERBUG]``; the exception is logged with
the connection id, never written to the client. Logs carry no credentials and no health data
(no mailbox names, subjects or addresses).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import collections
import gc
import logging
import secrets
import ssl
from collections.abc import Callable
from typing import Any

from imap_store.imap import responses as r
from imap_store.imap.commands import StartTls
from imap_store.imap.parser import (
    DEFAULT_MAX_COMMAND,
    PRE_LOGIN_MAX_COMMAND,
    CommandParser,
    ParseLater,
)
from imap_store.imap.session import Action, Session
from imap_store.imap.settings import ImapListener, ImapSettings
from imap_store.store.directory import Store
from imap_store.store.mailboxes import SqlMailStores
from imap_store.store.signals import ChangeSignals
from imap_store.store.tasks import cancel_and_wait
from imap_store.store.writer import GroupWriter
from policy.authn import Authenticator, LoginResult

log = logging.getLogger(__name__)

#: How often the selected mailboxes of this process are polled for changes (one query for
#: all of them) besides the change signals: a safety net for writes the signals do not cover
#: (another program writing to the database). ``[imap] poll_interval`` sets it.
POLL_INTERVAL = 1.0
#: Seconds a client may stay silent before logging in (RFC 3501 §5.4 only constrains the
#: authenticated autologout timer, ``[limits] idle_timeout``, at least 30 minutes).
PREAUTH_TIMEOUT = 60.0
#: Seconds for a TLS handshake.
HANDSHAKE_TIMEOUT = 30.0
#: Bytes read from the socket at once.
READ_CHUNK = 64 * 1024
#: Most bytes of lines handed to the parser per turn of the event loop: a 64 KiB read of
#: lines with empty literals held the loop 45-50 ms on the CI machine (a watchdog thread's
#: stack samples), 16 KiB slices still over 25 ms; a literal's bytes go in whole reads.
FEED_SLICE = 4 * 1024
#: Pending output above which the writer waits for the client to read.
WRITE_HIGH_WATER = 256 * 1024
#: Grace period for commands in flight when the service stops (SIGTERM).
DRAIN_SECONDS = 30.0
#: Per-connection TLS read buffer of asyncio (``SSLProtocol.max_size``, 256 KiB by default,
#: allocated and zero-filled for every connection). Idle IMAP connections must stay small
#: (target < 100 KB each): 32 KiB still holds two full TLS records (RFC 8446 §5.1).
TLS_READ_BUFFER = 32 * 1024

AuditFn = Callable[[str, str, str, dict[str, object]], None]


class ChangeWatcher:
    """Per-process registry of selected mailboxes: wakes the sessions of a mailbox that moved.
    It looks (one query for all selected mailboxes) when a change signal says a transaction
    committed, in this process or another (``imap_store/store/signals.py``), and every
    ``interval`` seconds in case a signal was missed. Changes made by a session of this
    process are announced at once with :meth:`touched`."""

    def __init__(self, stores: SqlMailStores, interval: float = POLL_INTERVAL,
                 signals: ChangeSignals | None = None) -> None:
        self._stores = stores
        self._interval = interval
        self._signals = signals
        self._listeners: dict[int, set[Callable[[], None]]] = {}
        self._latest: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None
        self._signalled: asyncio.Task[None] | None = None
        self._again = False

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="imap-change-watcher")
            if self._signals is not None:
                self._signals.subscribe(self._on_signal)
                self._signals.start()

    async def close(self) -> None:
        if self._signals is not None:
            self._signals.unsubscribe(self._on_signal)
            await self._signals.close()
        await cancel_and_wait(self._task, self._signalled)
        self._task = self._signalled = None

    def _on_signal(self) -> None:
        """A transaction committed somewhere: look at once, or once more after the look in
        progress (signals arriving meanwhile fold into that one)."""
        if not self._listeners:
            return
        if self._signalled is not None and not self._signalled.done():
            self._again = True
            return
        self._signalled = asyncio.create_task(self._look(), name="imap-change-look")

    async def _look(self) -> None:
        while True:
            self._again = False
            try:
                await self.poll()
            except Exception:
                log.exception("change watcher look failed")
            if not self._again:
                return

    def watch(self, mailbox_id: int, modseq: int, listener: Callable[[], None]) -> None:
        self._listeners.setdefault(mailbox_id, set()).add(listener)
        self._latest[mailbox_id] = max(self._latest.get(mailbox_id, 0), modseq)

    def unwatch(self, mailbox_id: int, listener: Callable[[], None]) -> None:
        listeners = self._listeners.get(mailbox_id)
        if listeners is None:
            return
        listeners.discard(listener)
        if not listeners:
            del self._listeners[mailbox_id]
            self._latest.pop(mailbox_id, None)

    def latest(self, mailbox_id: int) -> int:
        return self._latest.get(mailbox_id, 0)

    def touched(self, mailbox_id: int, modseq: int) -> None:
        if mailbox_id in self._listeners and modseq > self._latest.get(mailbox_id, 0):
            self._latest[mailbox_id] = modseq
            self._notify(mailbox_id)

    def _notify(self, mailbox_id: int) -> None:
        for listener in list(self._listeners.get(mailbox_id, ())):
            listener()

    async def poll(self) -> None:
        if not self._listeners:
            return
        values = await self._stores.highestmodseqs(list(self._listeners))
        for mailbox_id, modseq in values.items():
            if mailbox_id in self._listeners and modseq > self._latest.get(mailbox_id, 0):
                self._latest[mailbox_id] = modseq
                self._notify(mailbox_id)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll()
            except Exception:
                log.exception("change watcher poll failed")


class _Output:
    """Where a session writes: the stream, with back-pressure and a write timeout."""

    __slots__ = ("timeout", "writer")

    def __init__(self, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.writer = writer
        self.timeout = timeout

    async def write(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("connection closed")
        self.writer.write(data)
        transport = self.writer.transport
        if transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()


class ImapService:
    """Both IMAP listeners of one ``serve`` process and everything their sessions share."""

    def __init__(self, settings: ImapSettings, store: Store, writer: GroupWriter,
                 authenticator: Authenticator, tls: ssl.SSLContext, audit: AuditFn) -> None:
        self.settings = settings
        self.tls = tls
        self.authenticator = authenticator
        self.audit = audit
        self.stores = SqlMailStores(store, writer.submit, writer.submit_sync)
        self.watcher = ChangeWatcher(self.stores, settings.poll_interval, store.signals)
        self.servers: list[asyncio.Server] = []
        self.connections: dict[asyncio.StreamWriter, _Connection] = {}
        self.per_ip: collections.Counter[tuple[str, str]] = collections.Counter()
        self.stopping = False

    def start(self) -> None:
        """Start what the sessions share; the listeners are started one by one with
        :meth:`start_listener` (``[imap]`` STARTTLS, ``[imaps]`` implicit TLS)."""
        # Process-wide asyncio setting (the SMTP listeners benefit too): see TLS_READ_BUFFER.
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
        # The objects of a started process (modules, SQLAlchemy's compiled statements...) live
        # as long as it: keep them out of the cyclic GC, whose full collections otherwise scan
        # them all (~50 ms each, measured) about every other large FETCH or SEARCH, whose
        # thousands of short-lived rows reach the oldest generation (CPython's gc.freeze).
        gc.freeze()
        self.watcher.start()

    async def start_listener(self, listener: ImapListener, *,
                             reuse_port: bool = False) -> asyncio.Server:
        """Listen on one address; OSError when it cannot be bound. ``reuse_port``: other
        processes (the workers of one ``serve``) listen on the same port."""
        name, implicit = listener.name, listener.implicit_tls

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(name, implicit, reader, writer)

        server = await asyncio.start_server(
            handler, listener.host, listener.port, ssl=self.tls if implicit else None,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if implicit else None, reuse_address=True,
            reuse_port=reuse_port or None,
            limit=READ_CHUNK,
        )
        self.servers.append(server)
        log.info("%s listening on %s:%d", name, listener.host, listener.port)
        return server

    async def _serve(self, listener: str, implicit: bool, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        ip = str(peer[0]) if peer else "?"
        key = (listener, ip)
        self.per_ip[key] += 1
        conn_id = secrets.token_hex(4)
        try:
            if self.stopping or self.per_ip[key] > self.settings.connections_per_ip:
                reply = r.BYE_SHUTTING_DOWN if self.stopping else r.BYE_TOO_MANY_CONNECTIONS
                writer.write(reply.untagged())
                log.info("conn=%s refused (%s)", conn_id,
                         "stopping" if self.stopping else "connections per IP")
                return
            connection = _Connection(self, conn_id, ip, implicit, reader, writer)
            self.connections[writer] = connection
            log.info("conn=%s %s connection", conn_id, listener)
            try:
                await connection.run()
            except (ConnectionError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
                log.info("conn=%s connection lost", conn_id)
            except Exception:
                log.exception("conn=%s unexpected error", conn_id)
                try:
                    writer.write(r.BYE_SERVERBUG.untagged())
                except (RuntimeError, OSError):
                    pass
            finally:
                connection.session.close_quietly()
                self.connections.pop(writer, None)
        finally:
            self.per_ip[key] -= 1
            if self.per_ip[key] <= 0:
                del self.per_ip[key]
            await _close(writer)
            log.info("conn=%s closed", conn_id)

    async def drain(self, grace: float = DRAIN_SECONDS) -> None:
        """SIGTERM: stop accepting, let commands in flight finish, then say BYE to all."""
        self.stopping = True
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(c.busy for c in self.connections.values()) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for writer in list(self.connections):
            if not writer.is_closing():
                try:
                    writer.write(r.BYE_SHUTTING_DOWN.untagged())
                except (RuntimeError, OSError):
                    pass
                writer.close()
        while self.connections and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        await self.watcher.close()


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        async with asyncio.timeout(5):
            await writer.wait_closed()
    except (OSError, TimeoutError, ssl.SSLError, RuntimeError):
        pass


class _Connection:
    """One client: the read loop between the socket, the parser and the session."""

    def __init__(self, service: ImapService, conn_id: str, ip: str, implicit: bool,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.service = service
        self.conn_id = conn_id
        self.ip = ip
        self.reader = reader
        self.writer = writer
        self.busy = False
        self.idle_timeout = float(service.settings.idle_timeout)
        self.parser = CommandParser(max_literal=0, max_command=PRE_LOGIN_MAX_COMMAND,
                                    defer_large=True)
        # Read from the socket, not yet fed to the parser (a view: slicing it copies nothing).
        self._pending = memoryview(b"")
        self.session = Session(
            _Output(writer, self.idle_timeout), tls=implicit, starttls_available=not implicit,
            login=self._login, mail_factory=service.stores.for_patient,
            watcher=service.watcher, audit=service.audit, conn_id=conn_id,
        )

    async def _login(self, user: str, password: str) -> LoginResult:
        return await self.service.authenticator.login(
            user, password, self.ip, "imap", patients_only=True)

    async def run(self) -> None:
        session, parser = self.session, self.parser
        await session.greet()
        while True:
            if session.authenticated:
                parser.max_literal, parser.max_command = r.APPEND_LIMIT, DEFAULT_MAX_COMMAND
            else:
                parser.max_literal, parser.max_command = 0, PRE_LOGIN_MAX_COMMAND
            parser.utf8_names = session.rev2  # RFC 9051 §5.1
            event = parser.next_event()
            if event is None:
                if self._pending:  # the rest of the last read, after a turn of the loop
                    await asyncio.sleep(0)
                else:
                    self._pending = memoryview(await self._read())
                    if not self._pending:
                        return
                size = parser.literal_remaining + FEED_SLICE
                parser.feed(self._pending[:size])
                self._pending = self._pending[size:]
                continue
            if isinstance(event, ParseLater):  # in a thread: the loop serves the others
                event = await asyncio.to_thread(event.parse)
            if isinstance(event, StartTls) and (parser.buffered_bytes or self._pending
                                                or self._unread()):
                # RFC 3501 §6.2.1, §11.1: nothing pipelined after STARTTLS may run inside TLS.
                await session.out.write(r.BAD_STARTTLS_PIPELINED.tagged(event.tag))
                return
            self.busy = True
            try:
                action = await session.handle(event)
            finally:
                self.busy = False
            if action is Action.CLOSE:
                return
            if action is Action.EXPECT_LINE:
                parser.expect_line()
            elif action is Action.REJECT_LITERAL:
                parser.reject_literal()
            elif action is Action.REPLAY:
                parser.unread(session.take_replay())
            elif action is Action.STARTTLS:
                # asyncio marks the stream as TLS only once start_tls returns: a close_notify
                # that came with the client's Finished logged an asyncio warning ("returning
                # true from eof_received() has no effect when using ssl"). Mark it before.
                self.writer.transport.get_protocol()._over_ssl = True  # type: ignore[attr-defined]
                await self.writer.start_tls(self.service.tls,
                                            ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
                session.tls_started()
                log.info("conn=%s TLS started", self.conn_id)

    def _unread(self) -> int:
        buffered = getattr(self.reader, "_buffer", b"")
        return len(buffered)

    async def _read(self) -> bytes:
        session = self.session
        timeout = self.idle_timeout if session.authenticated else PREAUTH_TIMEOUT
        if not session.idling:
            try:
                async with asyncio.timeout(timeout):
                    return await self.reader.read(READ_CHUNK)
            except TimeoutError:
                await session.out.write(r.BYE_TIMEOUT.untagged())
                return b""
        return await self._read_idling(timeout_s=timeout)

    async def _read_idling(self, *, timeout_s: float) -> bytes:
        """IDLE (RFC 2177): wait for DONE while reporting changes; IDLE renews the timer."""
        session = self.session
        wake = asyncio.Event()
        session.wake = wake.set
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        read_task: asyncio.Task[bytes] = asyncio.create_task(self.reader.read(READ_CHUNK))
        wake_task: asyncio.Task[Any] | None = None
        try:
            while True:
                wake_task = asyncio.create_task(wake.wait())
                done, _pending = await asyncio.wait(
                    {read_task, wake_task}, timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if read_task in done:
                    return read_task.result()
                if wake_task in done:
                    wake.clear()
                    self.busy = True
                    try:
                        await session.idle_update()
                    finally:
                        self.busy = False
                    continue
                await session.out.write(r.BYE_TIMEOUT.untagged())
                return b""
        finally:
            session.wake = None
            await cancel_and_wait(read_task, wake_task)
