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
from collections.abc import Callable, Iterable, Sequence

import uvicorn
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families
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


class _PlainHttp:
    """A small Starlette app on uvicorn's protocol, on the gateway's own event loop, over TCP
    or a Unix socket."""

    def __init__(self, routes: list[Route]) -> None:
        self.config = uvicorn.Config(Starlette(routes=routes), lifespan="off", log_config=None,
                                     access_log=False, proxy_headers=False,
                                     server_header=False, limit_concurrency=MAX_CONNECTIONS,
                                     timeout_keep_alive=KEEP_ALIVE_SECONDS,
                                     timeout_graceful_shutdown=CLOSE_SECONDS)
        self.config.load()
        self.server = uvicorn.Server(self.config)
        self.server.lifespan = self.config.lifespan_class(self.config)

    def _protocol(self) -> Callable[[], asyncio.Protocol]:
        config, state = self.config, self.server.server_state
        loop = asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=state, app_state={}, _loop=loop)

        return protocol

    async def start(self, host: str, port: int) -> asyncio.Server:
        """Listen on ``host:port``; OSError when the address cannot be bound."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._protocol(), host, port, reuse_address=True)
        self._started(server)
        log.info("metrics listening on %s:%d", host, port)
        return server

    async def start_unix(self, path: str) -> asyncio.Server:
        """Listen on a Unix socket (a worker, for the ops process: ``gateway/workers.py``)."""
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(self._protocol(), path)
        self._started(server)
        return server

    def _started(self, server: asyncio.Server) -> None:
        self.server.servers = [server]
        self.server.started = True

    async def close(self) -> None:
        if self.server.started:
            await self.server.shutdown()

    async def healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")


class OpsListener(_PlainHttp):
    """``/metrics``, ``/healthz`` and ``/readyz`` on one plain HTTP listener."""

    def __init__(self, store: Store, readiness: Readiness, live: LiveState) -> None:
        super().__init__([
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ])
        self.store = store
        self.readiness = readiness
        self.live = live
        self._registered = False

    def _started(self, server: asyncio.Server) -> None:
        super()._started(server)
        REGISTRY.register(self.live)
        self._registered = True

    async def close(self) -> None:
        if self._registered:
            REGISTRY.unregister(self.live)
            self._registered = False
        await super().close()

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


# --- several workers (gateway/workers.py) ---------------------------------------------------

#: Families whose value is the same database fact in every worker, or a per-process constant:
#: one value (the largest), not their sum. ``process_start_time_seconds``: the earliest.
_NOT_ADDED = {"mssante_outbound_queue_depth": max, "mssante_outbound_queue_oldest_seconds": max,
              "process_max_fds": max, "python_info": max, "process_start_time_seconds": min}
#: Seconds the ops process waits for one worker's answer.
WORKER_TIMEOUT = 5.0


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def merge_expositions(texts: Sequence[str]) -> list[Metric]:
    """The workers' metrics (Prometheus text format) as one set: each series (name and
    labels) summed over the workers, except the few of ``_NOT_ADDED``."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type,
                                               family.unit)
                values[family.name] = {}
            combine = _NOT_ADDED.get(family.name)
            seen = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in seen:
                    seen[key] = sample.value
                elif combine is not None:
                    seen[key] = combine(seen[key], sample.value)
                else:
                    seen[key] += sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


async def _ask_worker(path: str, target: str) -> tuple[int, str]:
    """One plain HTTP GET over a worker's Unix socket: (status, body); (0, reason) when the
    worker does not answer (it is restarting)."""
    try:
        async with asyncio.timeout(WORKER_TIMEOUT):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                writer.write(f"GET {target} HTTP/1.1\r\nHost: worker\r\n"
                             "Connection: close\r\n\r\n".encode())
                data = await reader.read()
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        return 0, exc.__class__.__name__
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0, "bad answer"
    return status, body.decode("utf-8", "replace")


class WorkersOps(_PlainHttp):
    """``[metrics] listen`` of a ``serve`` with several workers (the ops process): asks each
    worker (its ``OpsListener`` on a Unix socket) and answers for all of them."""

    def __init__(self, sockets: Sequence[str]) -> None:
        super().__init__([
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
        ])
        self.sockets = list(sockets)

    async def metrics(self, request: Request) -> Response:
        answers = await asyncio.gather(*(_ask_worker(s, "/metrics") for s in self.sockets))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Merged(merge_expositions(
            [body for status, body in answers if status == 200])))
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(registry), headers={"Content-Type": content_type})

    async def readyz(self, request: Request) -> Response:
        answers = await asyncio.gather(*(_ask_worker(s, "/readyz") for s in self.sockets))
        failing = [i for i, (status, _body) in enumerate(answers) if status != 200]
        head = "ready" if not failing else \
            "not ready: " + ", ".join(f"worker {i}" for i in failing)
        lines = [head]
        for i, (status, body) in enumerate(answers):
            if status == 0:
                lines.append(f"worker {i}: no answer ({body})")
            else:
                lines += [f"worker {i}: {line}" for line in body.splitlines()]
        return PlainTextResponse("\n".join(lines) + "\n",
                                 status_code=503 if failing else 200)
