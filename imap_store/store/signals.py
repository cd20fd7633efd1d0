"""Change signals between processes (issue 13): a commit that changes a mailbox wakes the IMAP
sessions of every ``serve`` process and worker on the same database at once, instead of at
their next poll.

- **PostgreSQL**: a statement trigger on ``mailbox`` (migration 0007) calls ``pg_notify`` when
  ``highestmodseq`` moves (every new message, flag change and expunge moves it). PostgreSQL
  delivers a notification only once its transaction has committed, to every connection that
  ``LISTEN``s on the channel: each started process keeps one such connection (asyncpg, the
  driver of the store), reconnecting with a back-off when it is lost. The channel carries the
  schema's name, so databases that share a server by schema do not wake each other.
- **SQLite**: no server to relay a signal. Each started process binds a Unix datagram socket in
  a private directory named after the database file (``$XDG_RUNTIME_DIR`` or the temporary
  directory, ``mssante-<uid>-<hash of the path>``, mode 0700); after each commit of this
  process, one byte goes to every other socket there. A socket nobody reads any more
  (a process that died) is removed by the first sender that finds it refused.

:meth:`ChangeSignals.committed` is called after each commit (the group writer, ``Store.write``);
it wakes this process's subscribers (on PostgreSQL only while not listening: the commit's
NOTIFY comes back to its own process) and, on SQLite, the other processes. Calls made while a
wake-up is already due are folded into it. A signal says only "something committed": the
subscriber (the IMAP change watcher) asks the database what moved. Nothing is lost when a
signal is (the watcher's slow poll remains as a safety net, for writes of other programs).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import secrets
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imap_store.store.db import async_url
from imap_store.store.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: The notification channel's prefix; the schema's name follows (``mssante_changes.public``).
CHANNEL_PREFIX = "mssante_changes"
#: Seconds between two attempts to (re)open the LISTEN connection, doubling up to the last.
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0)
#: Seconds a list of the other processes' sockets is reused before the directory is read again.
PEERS_TTL = 1.0


def channel(schema: str | None) -> str:
    return f"{CHANNEL_PREFIX}.{schema or 'public'}"


def socket_directory(database: str) -> Path:
    """The directory where the processes of one SQLite database meet."""
    digest = hashlib.sha256(os.path.realpath(database).encode()).hexdigest()[:16]
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"mssante-{os.getuid()}-{digest}"


class ChangeSignals:
    """The change signals of one database, for one process."""

    def __init__(self, url: str) -> None:
        parsed, _args, schema = async_url(url)
        self.sqlite = parsed.get_backend_name() == "sqlite"
        self._database = parsed.database or ""
        self._pg_dsn = "" if self.sqlite else parsed.set(drivername="postgresql").render_as_string(
            hide_password=False)
        self.channel = channel(schema)
        self._subscribers: list[Callable[[], None]] = []
        self._due = False
        self._started = False
        # SQLite
        self._directory: Path | None = None
        self._socket: socket.socket | None = None
        self._path: Path | None = None
        self._peers: list[Path] = []
        self._peers_read = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        # PostgreSQL
        self._listen_task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()  # set while the LISTEN connection is open
        #: Signals received from other processes (a figure for tests and diagnosis).
        self.received = 0

    # --- subscribers ----------------------------------------------------------------------

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(callback)

    def _wake(self) -> None:
        for callback in list(self._subscribers):
            try:
                callback()
            except Exception:
                log.exception("change signal subscriber failed")

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Receive the other processes' signals (on the running event loop)."""
        if self._started:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        if self.sqlite:
            self._bind()
        else:
            self._listen_task = asyncio.create_task(self._listen(), name="change-signals")

    async def close(self) -> None:
        if not self._started:
            return
        self._started = False
        await cancel_and_wait(self._listen_task)
        self._listen_task = None
        if self._socket is not None:
            assert self._loop is not None
            self._loop.remove_reader(self._socket.fileno())
            self._socket.close()
            self._socket = None
            if self._path is not None:
                with contextlib.suppress(OSError):
                    self._path.unlink()
                with contextlib.suppress(OSError):  # the last one out: leave no directory
                    self._path.parent.rmdir()

    # --- sending --------------------------------------------------------------------------

    def committed(self) -> None:
        """A transaction of this process committed: wake the subscribers here and the other
        processes, once for all the commits of this turn of the event loop."""
        if self._due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a synchronous tool): nobody here to wake
            self._send()
            return
        self._due = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._due = False
        if self.sqlite or not self.listening.is_set():
            self._wake()  # PostgreSQL: the NOTIFY of this commit comes back here too
        self._send()

    def _send(self) -> None:
        if not self.sqlite:
            return  # the trigger's NOTIFY reaches the other processes
        directory = self._directory or socket_directory(self._database)
        now = time.monotonic()
        if now - self._peers_read > PEERS_TTL:
            self._peers_read = now
            try:
                self._peers = [p for p in directory.iterdir()
                               if p.suffix == ".sock" and p != self._path]
            except OSError:
                self._peers = []
        if not self._peers:
            return
        sender = self._socket or socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sender.setblocking(False)
            for peer in list(self._peers):
                try:
                    sender.sendto(b"!", str(peer))
                except BlockingIOError:
                    pass  # its queue is full: it has wake-ups to read already
                except (ConnectionRefusedError, FileNotFoundError):
                    self._peers.remove(peer)  # its process is gone
                    with contextlib.suppress(OSError):
                        peer.unlink()
                except OSError as exc:
                    log.debug("change signal to %s failed: %s", peer.name, exc)
        finally:
            if sender is not self._socket:
                sender.close()

    # --- SQLite: receiving ------------------------------------------------------------------

    def _bind(self) -> None:
        directory = socket_directory(self._database)
        path = directory / f"{os.getpid()}-{secrets.token_hex(4)}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            for attempt in (1, 2):
                directory.mkdir(mode=0o700, exist_ok=True)
                info = directory.lstat()
                if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or \
                        stat.S_IMODE(info.st_mode) & 0o077:
                    raise PermissionError(errno.EPERM, "not a private directory of this user")
                try:
                    sock.bind(str(path))
                    break
                except FileNotFoundError:  # the last process out removed it meanwhile
                    if attempt == 2:
                        raise
        except OSError as exc:
            sock.close()
            log.warning("change signals off (%s: %s): other processes' changes show at the "
                        "next poll", directory, exc.strerror or exc)
            return
        sock.setblocking(False)
        self._directory, self._socket, self._path = directory, sock, path
        assert self._loop is not None
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self._socket is not None
        got = False
        while True:
            try:
                self._socket.recv(64)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            got = True
            self.received += 1
        if got:
            self._wake()

    # --- PostgreSQL: receiving --------------------------------------------------------------

    async def _listen(self) -> None:
        import asyncpg  # type: ignore[import-untyped]  # the store's PostgreSQL driver

        attempt = 0
        while True:
            conn: Any = None
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._pg_dsn)
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(self.channel, self._notified)
                attempt = 0
                self.listening.set()
                # A commit made while the connection was down raised no signal: look now.
                self._wake()
                await lost.wait()
                log.warning("change signals: the LISTEN connection was lost; reconnecting")
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("change signals: cannot LISTEN (%s); other processes' changes "
                            "show at the next poll", exc.__class__.__name__)
            finally:
                self.listening.clear()
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))
            await asyncio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
            attempt += 1

    def _notified(self, _conn: Any, _pid: int, _channel: str, _payload: str) -> None:
        self.received += 1
        self._wake()
