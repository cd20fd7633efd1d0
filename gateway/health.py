"""Readiness of a ``serve`` process (``GET /readyz`` on the metrics listener).

Ready means: the database answers a ``SELECT 1`` within ``DATABASE_TIMEOUT`` seconds, every
listener of the process is bound and accepting (not after SIGTERM: a load balancer stops
sending new connections while the process drains), and the outbound queue's worker task runs.
``/healthz`` only says the process and its event loop answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

from imap_store.store.directory import Store

#: Seconds the database gets to answer the readiness query.
DATABASE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{self.name}: {'ok' if self.ok else 'failing'} ({self.detail})"


def _select_one(conn: Connection) -> object:
    return conn.execute(text("SELECT 1")).scalar()


class Readiness:
    """The checks of ``/readyz`` over the live objects of ``serve``. ``servers`` is the list the
    service fills as it binds its listeners; ``worker_alive`` tells whether the queue worker
    runs."""

    def __init__(self, store: Store, servers: Sequence[asyncio.Server],
                 worker_alive: Callable[[], bool],
                 database_timeout: float = DATABASE_TIMEOUT) -> None:
        self.store = store
        self.servers = servers
        self.worker_alive = worker_alive
        self.database_timeout = database_timeout
        #: The address of each server seen bound (a closed server has no sockets left).
        self._where: dict[int, str] = {}
        for server in servers:
            self.where(server)

    def where(self, server: asyncio.Server) -> str:
        known = self._where.get(id(server))
        if known is None and server.sockets:
            host, port = server.sockets[0].getsockname()[:2]
            known = self._where[id(server)] = f"{host}:{port}"
        return known or "?"

    async def database(self) -> Check:
        try:
            async with asyncio.timeout(self.database_timeout):
                value = await self.store.run_read(_select_one)
        except TimeoutError:
            return Check("database", False, f"no answer within {self.database_timeout:g} s")
        except Exception as exc:  # any driver error: named, never the connection string
            return Check("database", False, exc.__class__.__name__)
        return Check("database", value == 1, "SELECT 1")

    def listeners(self) -> Check:
        if not self.servers:
            return Check("listeners", False, "none bound yet")
        closed = [self.where(s) for s in self.servers if not s.is_serving()]
        if closed:
            return Check("listeners", False, "not accepting: " + " ".join(closed))
        return Check("listeners", True, f"{len(self.servers)} accepting")

    def queue_worker(self) -> Check:
        alive = self.worker_alive()
        return Check("queue_worker", alive, "running" if alive else "stopped")

    async def checks(self) -> list[Check]:
        return [await self.database(), self.listeners(), self.queue_worker()]
