"""The portal's HTTPS listener: uvicorn's HTTP protocol on a server opened in the gateway's own
event loop (no thread, no signal handlers of its own: the gateway drains it with the others)."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from typing import Any

import uvicorn
from starlette.applications import Starlette

log = logging.getLogger(__name__)

#: Seconds requests in flight get to finish when the gateway stops.
DRAIN_SECONDS = 30
#: Connections and requests at once before new ones get 503 (the process serves SMTP and IMAP
#: too: the portal may not take all its descriptors).
MAX_CONNECTIONS = 1000
#: The answer to a connection over the per-address limit (``[limits] connections_per_ip``).
_TOO_MANY_TEXT = b"Too many connections from your address\n"
TOO_MANY_CONNECTIONS = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; "
                        b"charset=utf-8\r\nRetry-After: 10\r\nConnection: close\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(_TOO_MANY_TEXT), _TOO_MANY_TEXT))


def limited_per_address(protocol_class: type[Any], limit: int) -> type[Any]:
    """``protocol_class`` (uvicorn's HTTP protocol) refusing a connection with 503 when its
    peer address already has ``limit`` open, as the SMTP and IMAP listeners do: one address
    cannot take the descriptors the whole process shares."""
    open_per_address: Counter[str] = Counter()

    class Limited(protocol_class):  # type: ignore[misc]
        _address: str | None = None
        _refused = False

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if peer else "?"
            if open_per_address[address] >= limit:
                self._refused = True
                log.info("web connection from %s refused (connections per IP)", address)
                transport.write(TOO_MANY_CONNECTIONS)  # type: ignore[attr-defined]
                transport.close()
                return
            self._address = address
            open_per_address[address] += 1
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            if self._address is not None:
                open_per_address[self._address] -= 1
                if not open_per_address[self._address]:
                    del open_per_address[self._address]
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def eof_received(self) -> Any:
            if not self._refused:
                return super().eof_received()
            return None

    return Limited


class WebServer:
    def __init__(self, app: Starlette, tls: ssl.SSLContext,
                 connections_per_ip: int = 50) -> None:
        self.config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                     proxy_headers=False, server_header=False,
                                     timeout_graceful_shutdown=DRAIN_SECONDS,
                                     limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=15)
        self.config.load()
        self.server = uvicorn.Server(self.config)
        self.server.lifespan = self.config.lifespan_class(self.config)
        self.tls = tls
        self.protocol_class = limited_per_address(self.config.http_protocol_class,
                                                  connections_per_ip)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> asyncio.Server:
        """Listen on ``host:port`` over TLS; OSError when the address cannot be bound.
        ``reuse_port``: other processes (the workers of one ``serve``) listen on it too."""
        config, state = self.config, self.server.server_state
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            return self.protocol_class(  # type: ignore[no-any-return]
                config=config, server_state=state, app_state={}, _loop=loop)

        server = await loop.create_server(protocol, host, port, ssl=self.tls,
                                          reuse_address=True, reuse_port=reuse_port or None)
        self.server.servers = [server]
        self.server.started = True
        log.info("web listening on %s:%d", host, port)
        return server

    async def drain(self) -> None:
        """Stop accepting, let requests in flight finish, close the connections."""
        if self.server.started:
            await self.server.shutdown()
