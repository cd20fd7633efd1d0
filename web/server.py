"""The portal's HTTPS listener: uvicorn's HTTP protocol on a server opened in the gateway's own
event loop (no thread, no signal handlers of its own: the gateway drains it with the others)."""

from __future__ import annotations

import asyncio
import logging
import ssl

import uvicorn
from starlette.applications import Starlette

log = logging.getLogger(__name__)

#: Seconds requests in flight get to finish when the gateway stops.
DRAIN_SECONDS = 30
#: Connections and requests at once before new ones get 503 (the process serves SMTP and IMAP
#: too: the portal may not take all its descriptors).
MAX_CONNECTIONS = 1000


class WebServer:
    def __init__(self, app: Starlette, tls: ssl.SSLContext) -> None:
        self.config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                     proxy_headers=False, server_header=False,
                                     timeout_graceful_shutdown=DRAIN_SECONDS,
                                     limit_concurrency=MAX_CONNECTIONS, timeout_keep_alive=15)
        self.config.load()
        self.server = uvicorn.Server(self.config)
        self.server.lifespan = self.config.lifespan_class(self.config)
        self.tls = tls

    async def start(self, host: str, port: int) -> asyncio.Server:
        """Listen on ``host:port`` over TLS; OSError when the address cannot be bound."""
        config, state = self.config, self.server.server_state
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=state, app_state={}, _loop=loop)

        server = await loop.create_server(protocol, host, port, ssl=self.tls,
                                          reuse_address=True)
        self.server.servers = [server]
        self.server.started = True
        log.info("web listening on %s:%d", host, port)
        return server

    async def drain(self) -> None:
        """Stop accepting, let requests in flight finish, close the connections."""
        if self.server.started:
            await self.server.shutdown()
