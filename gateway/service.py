"""``mssante-gateway serve``: start every listener and worker, drain on SIGTERM (SPEC §9).

Lifecycle: migrate, open the store and the group writer, start listeners; on SIGTERM or
SIGINT stop accepting, let transactions in flight finish (grace period), flush the writer,
close the database, exit 0. Every task is referenced and awaited (ARCHITECTURE practice 9).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Awaitable
from pathlib import Path

from gateway import wiring
from gateway.config import Config, Listen, ListenError
from gateway.logsetup import setup_logging
from gateway.metrics import MeteredAuthenticator, OpsListener, WorkersOps, ops_listener
from gateway.tls import client_context, server_context
from gateway.workers import WorkerRole, ops_socket
from imap_store.imap.server import ImapService
from imap_store.store.db import migrate
from imap_store.store.directory import Store
from imap_store.store.housekeeping import TrashPurge
from imap_store.store.throttle import StoreFailureCounts
from imap_store.store.writer import GroupWriter
from outbound.notification import CodeMailer
from outbound.worker import QueueWorker
from smtp_in.server import DataBudget, IntakeContext, drain_sessions, start_listener
from web.app import Portal
from web.server import WebServer

log = logging.getLogger(__name__)


def return_large_buffers_to_the_os() -> None:
    """glibc raises its mmap threshold after each large free, after which big buffers (an
    argon2 hash takes 19 MiB, a DATA section up to 25 MiB) stay in the heap for good. Pin the
    threshold (mallopt M_MMAP_THRESHOLD, as MALLOC_MMAP_THRESHOLD_ would) so they go back to
    the OS when freed. Does nothing off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


#: How long a thread may keep the GIL while another wants it (CPython's default is 5 ms). The
#: event loop gives up the GIL at every socket operation; while a worker thread analyses a
#: large message, each of those waited up to 5 ms to get it back, so a NOOP of another session
#: took 55-90 ms during a 1 MB message (tests/test_security_event_loop.py); at 1 ms, 20-45 ms.
GIL_SWITCH_INTERVAL = 0.001


def keep_the_loop_responsive() -> None:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)


async def _listen(name: str, listen: Listen, start: Awaitable[asyncio.Server]) -> asyncio.Server:
    try:
        return await start
    except OSError as exc:
        raise ListenError(f"[{name}] listen = \"{listen}\": cannot listen "
                          f"({exc.strerror or exc})") from None


def preflight(config: Config) -> None:
    """What a start refuses for its configuration (the TLS keys, the DKIM key, the
    templates), checked once by the supervisor before any worker starts: one error line,
    not one per worker."""
    server_context(config.tls.cert, config.tls.key, config.tls.client_ca)
    wiring.outbound_settings(config)
    wiring.notices(config)


async def serve(config: Config, worker: WorkerRole | None = None) -> int:
    """Run every listener until SIGTERM. ``worker``: this process is one of several started by
    the supervisor (``gateway/workers.py``), which migrated the database and prints the
    banner; the listeners share their ports with the other workers (``SO_REUSEPORT``)."""
    setup_logging(config.logging.format, config.logging.level)
    return_large_buffers_to_the_os()
    keep_the_loop_responsive()
    first = worker is None or worker.index == 0
    if config.notifier.relay is None and first:  # said once, at start
        log.warning("notifications off: [notifier] relay is empty, patients get no e-mail "
                    "at their personal address when a message arrives")
    if worker is None:
        await migrate(config.storage_url)
    reuse_port = worker is not None
    store = Store.from_url(config.storage_url)
    writer = GroupWriter(store)
    writer.start()
    tls = server_context(config.tls.cert, config.tls.key, config.tls.client_ca)
    throttle = wiring.login_throttle(config, StoreFailureCounts(store))
    authenticator = MeteredAuthenticator(store, throttle, config.domains.patient,
                                         audit=writer.audit_later)
    notices = wiring.notices(config)
    queue = QueueWorker(wiring.outbound_settings(config), store, notices.templates, notices)
    smtp_settings = wiring.smtp_settings(config)
    ctx = IntakeContext(
        settings=smtp_settings, store=store, writer=writer, authenticator=authenticator,
        # Several workers share [limits] data_in_flight: the memory bound stays the one set.
        notices=notices, tls=tls,
        budget=DataBudget(smtp_settings.data_in_flight // (worker.count if worker else 1)),
        queue_wakeup=queue.poke,
    )
    queue.start()
    trash = TrashPurge(store, writer.submit, config.web.trash_days,
                       submit_sync=writer.submit_sync)  # at start, then hourly
    trash.start()
    imap = ImapService(wiring.imap_settings(config), store, writer, authenticator, tls,
                       writer.audit_later)
    web: WebServer | None = None
    web_settings = wiring.web_settings(config)
    if web_settings is not None:
        mailer = CodeMailer(wiring.notifier_settings(config), notices.templates,
                            config.hostname, client_context(config.tls.client_ca))
        portal = Portal(web_settings, store, writer, authenticator, mailer, notices.templates)
        web = WebServer(portal.app(), server_context(config.tls.cert, config.tls.key, None),
                        config.limits.connections_per_ip)
    servers: list[asyncio.Server] = []
    ops: OpsListener | None = None
    try:
        for name, listen, implicit in (("smtp", config.smtp, False),
                                       ("submission", config.submission, False),
                                       ("submissions", config.submissions, True)):
            if listen is not None:
                servers.append(await _listen(name, listen, start_listener(
                    ctx, name, listen.host, listen.port, implicit, reuse_port=reuse_port)))
        for listener in imap.settings.listeners:
            listen = Listen(listener.host, listener.port)
            servers.append(await _listen(listener.name, listen,
                                         imap.start_listener(listener, reuse_port=reuse_port)))
        imap.start()
        if web is not None and config.web.listen is not None:
            listen = config.web.listen
            servers.append(await _listen("web", listen, web.start(listen.host, listen.port,
                                                                  reuse_port=reuse_port)))
        if worker is not None and worker.ops_socket is not None:  # for the ops process
            ops = ops_listener(store, servers, queue, ctx, imap)
            await ops.start_unix(str(worker.ops_socket))
        elif worker is None and config.metrics.listen is not None:  # last: /readyz checks
            listen = config.metrics.listen                           # the others
            ops = ops_listener(store, servers, queue, ctx, imap)
            await _listen("metrics", listen, ops.start(listen.host, listen.port))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():  # a second SIGTERM: exit at once
                log.warning("second signal: exiting without draining")
                os._exit(1)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        # A worker starts with them blocked (gateway/workers.py): handled from here on.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
        listening = " ".join(
            f"{n}={lst}" for n, lst in (("smtp", config.smtp), ("submission", config.submission),
                                        ("submissions", config.submissions),
                                        ("imap", config.imap), ("imaps", config.imaps),
                                        ("web", config.web.listen),
                                        ("metrics", config.metrics.listen))
            if lst is not None)
        if worker is not None:  # the supervisor prints the banner once all are ready
            log.info("worker %d ready", worker.index)
            os.write(worker.ready_fd, b"r")
            os.close(worker.ready_fd)
        elif config.logging.format == "json":  # one object per line: the banner is a record
            log.info("mssante-gateway ready: %s", listening)
        else:
            log.info("ready %s", listening)
            print(f"mssante-gateway ready: {listening}", file=sys.stderr, flush=True)
        await stop.wait()
        log.info("stopping: no new connections, draining transactions in flight")
        for server in servers:
            server.close()
        # Every listener drains at once: one grace period in all, not one after another.
        await asyncio.gather(drain_sessions(ctx), imap.drain(),
                             *([web.drain()] if web is not None else []))
        for server in servers:
            await server.wait_closed()
    finally:
        if ops is not None:  # open while draining: /readyz says 503 meanwhile
            await ops.close()
        for server in servers:
            server.close()
        await queue.stop()
        await trash.stop()
        await imap.close()
        await writer.close()
        await store.close()
    log.info("stopped")
    return 0


async def serve_ops(config: Config, runtime: Path, count: int) -> int:
    """The ops process of a ``serve`` with several workers (``gateway/workers.py``):
    ``[metrics] listen`` answered for all the workers, until SIGTERM."""
    setup_logging(config.logging.format, config.logging.level)
    listen = config.metrics.listen
    assert listen is not None
    ops = WorkersOps([str(ops_socket(runtime, i)) for i in range(count)])
    await _listen("metrics", listen, ops.start(listen.host, listen.port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGTERM, signal.SIGINT))
    try:
        await stop.wait()
    finally:
        await ops.close()
    return 0
