"""The metrics listener (``[metrics] listen``, off by default): plain HTTP on the gateway's own
event loop (uvicorn's protocol, as the portal), three paths:

- ``GET /metrics``: Prometheus text format, the process's default registry: each room's own
  metrics (``smtp_in/metrics.py``, ``imap_store/store/metrics.py``, ``outbound/metrics.py``,
  ``gateway/tlslog.py``), the logins counted here, values read from the live objects at each
  scrape (sessions, DATA bytes held, the outbound queue's depth and age), and the client
  library's process and Python metrics.
- ``GET /healthz``: 200 while the process and its event loop answer.
- ``GET /readyz``: 200 when every check of ``gateway/health.py`` passes, else 503 naming the
  failing one.

No label carries an address, a login or anything about a patient: only listeners, rules,
channels, outcomes and queue kinds. The listener has no TLS and no authentication: bind it to
the loopback or a private network (README "Running in production").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

import uvicorn
from prometheus_client import REGISTRY, Counter, Gauge, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from gateway.health import Readiness
from imap_store.imap.server import ImapService
from imap_store.store.directory import Store
from imap_store.store.metrics import queue_stats
from imap_store.store.outbound import NOTIFICATION, RELAY
from outbound.worker import QueueWorker
from policy.authn import Authenticator, LoginResult
from smtp_in.server import IntakeContext

log = logging.getLogger(__name__)

# Counters without their ``*_created`` twin series (the start time of each): half the output
# for a value nobody graphs.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Connections at once on the metrics listener (a scraper, a health probe, an operator).
MAX_CONNECTIONS = 32
#: Seconds an idle keep-alive connection of a scraper stays open.
KEEP_ALIVE_SECONDS = 5
#: Seconds a scrape in flight gets when the listener closes (the last step of a stop).
CLOSE_SECONDS = 1
#: Seconds the queue query of a scrape may take before the scrape goes on without it.
QUEUE_QUERY_TIMEOUT = 2.0

LOGINS = Counter("mssante_logins", "Password logins by channel (smtp, imap, web) and outcome "
                 "(ok, failed, throttled)", ["channel", "outcome"])
QUEUE_DEPTH = Gauge("mssante_outbound_queue_depth", "Outbound queue rows waiting to be sent",
                    ["kind"])
QUEUE_AGE = Gauge("mssante_outbound_queue_oldest_seconds",
                  "Age of the oldest outbound queue row waiting to be sent", ["kind"])


class MeteredAuthenticator(Authenticator):
    """The one authenticator of SMTP AUTH, IMAP LOGIN and the portal, counting outcomes."""

    async def login(self, username: str, password: str, ip: str, service: str,
                    *, patients_only: bool = False) -> LoginResult:
        result = await super().login(username, password, ip, service,
                                     patients_only=patients_only)
        outcome = "throttled" if result.throttled else \
            "ok" if result.identity is not None else "failed"
        LOGINS.labels(service, outcome).inc()
        return result


class LiveState(Collector):
    """Gauges read from the live objects of ``serve`` at each scrape."""

    def __init__(self, smtp: IntakeContext, imap: ImapService) -> None:
        self.smtp = smtp
        self.imap = imap

    def collect(self) -> Iterable[Metric]:
        sessions = GaugeMetricFamily("mssante_imap_sessions", "IMAP connections open",
                                     labels=["state"])
        connections = list(self.imap.connections.values())
        logged_in = sum(1 for c in connections if c.session.authenticated)
        sessions.add_metric(["authenticated"], logged_in)
        sessions.add_metric(["not_authenticated"], len(connections) - logged_in)
        yield sessions
        yield GaugeMetricFamily("mssante_smtp_sessions", "SMTP connections open",
                                value=len(self.smtp.sessions))
        yield GaugeMetricFamily("mssante_smtp_data_bytes_in_flight",
                                "DATA bytes held in memory by all SMTP sessions",
                                value=self.smtp.budget.used)
        yield GaugeMetricFamily("mssante_smtp_data_bytes_limit",
                                "DATA bytes the SMTP sessions may hold ([limits] data_in_flight)",
                                value=self.smtp.budget.limit)


class OpsListener:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one plain HTTP listener."""

    def __init__(self, store: Store, readiness: Readiness, live: LiveState) -> None:
        self.store = store
        self.readiness = readiness
        self.live = live
        app = Starlette(routes=[
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ])
        self.config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                                     proxy_headers=False, server_header=False,
                                     limit_concurrency=MAX_CONNECTIONS,
                                     timeout_keep_alive=KEEP_ALIVE_SECONDS,
                                     timeout_graceful_shutdown=CLOSE_SECONDS)
        self.config.load()
        self.server = uvicorn.Server(self.config)
        self.server.lifespan = self.config.lifespan_class(self.config)
        self._registered = False

    async def start(self, host: str, port: int) -> asyncio.Server:
        """Listen on ``host:port``; OSError when the address cannot be bound."""
        config, state = self.config, self.server.server_state
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=state, app_state={}, _loop=loop)

        server = await loop.create_server(protocol, host, port, reuse_address=True)
        self.server.servers = [server]
        self.server.started = True
        REGISTRY.register(self.live)
        self._registered = True
        log.info("metrics listening on %s:%d", host, port)
        return server

    async def close(self) -> None:
        if self._registered:
            REGISTRY.unregister(self.live)
            self._registered = False
        if self.server.started:
            await self.server.shutdown()

    async def refresh_queue(self) -> None:
        try:
            async with asyncio.timeout(QUEUE_QUERY_TIMEOUT):
                stats = await self.store.run_read(queue_stats)
        except Exception as exc:  # the scrape goes on with the other metrics
            log.warning("metrics: queue query failed (%s)", exc.__class__.__name__)
            return
        for kind in {RELAY, NOTIFICATION, *stats}:
            depth, age = stats.get(kind, (0, 0.0))
            QUEUE_DEPTH.labels(kind).set(depth)
            QUEUE_AGE.labels(kind).set(age)

    async def metrics(self, request: Request) -> Response:
        await self.refresh_queue()
        # The format the scraper asks for (Accept): Prometheus' text format by default,
        # OpenMetrics when asked.
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(REGISTRY), headers={"Content-Type": content_type})

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(self, request: Request) -> Response:
        checks = await self.readiness.checks()
        failing = [c for c in checks if not c.ok]
        head = "ready" if not failing else \
            "not ready: " + ", ".join(c.name for c in failing)
        body = "\n".join([head, *(c.line() for c in checks)]) + "\n"
        return PlainTextResponse(body, status_code=503 if failing else 200)


def ops_listener(store: Store, servers: Sequence[asyncio.Server], worker: QueueWorker,
                 smtp: IntakeContext, imap: ImapService) -> OpsListener:
    """The metrics listener of ``serve`` (``servers``: the list it fills as it binds)."""
    return OpsListener(store, Readiness(store, servers, lambda: worker.alive),
                       LiveState(smtp, imap))
