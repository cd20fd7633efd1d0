"""The metrics listener (``[metrics] listen``): Prometheus text scraped over HTTP from the real
gateway after real SMTP, IMAP and relay traffic, ``/healthz`` and ``/readyz`` (503 naming the
failing check while the gateway drains, and in process for a database that does not answer)."""

from __future__ import annotations

import asyncio
import base64
import email.policy
import imaplib
import re
import signal
import smtplib
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ConfigError, build_config
from gateway.health import Readiness
from imap_store.store.directory import Store
from tests.conftest import CHRISTELLE, DUPOND, INAYA, MARTINE, PATIENT_PASSWORD, prepare_gateway
from tests.gateway_proc import Gateway, free_port, set_listen, set_routes
from tests.helpers import sample, smtp, tls_context
from tests.relay import Relay, operator_relay, running_with

PATIENT = f"{INAYA}@patient.mssante.fr"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    values: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return values


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_openmetrics_when_asked(world: World) -> None:
    request = urllib.request.Request(f"http://127.0.0.1:{world.metrics}/metrics",
                                     headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = response.read().decode()
    assert text.endswith("# EOF\n")
    assert "# TYPE mssante_logins counter" in text


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:  # its socket
            return exc.code, exc.read().decode()


@dataclass
class World:
    gw: Gateway
    operator: Relay
    metrics: int  # the metrics listener's port


@pytest.fixture
def world(gw_dir: Path) -> Iterator[World]:
    """A gateway with metrics on; medecin.mssante.fr routed to a real relay, ch-exemple to a
    closed port (its messages wait in the queue)."""
    gw: Gateway = prepare_gateway(gw_dir)  # type: ignore[assignment]
    operator = operator_relay(gw)
    metrics_port = free_port()
    set_listen(gw.config, "metrics", f"127.0.0.1:{metrics_port}")
    set_routes(gw.config, {"medecin.mssante.fr": operator.port,
                           "ch-exemple.mssante.fr": free_port()})
    with running_with(gw, operator):
        yield World(gw, operator, metrics_port)


def patient_mail(to: str, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = f"Inaya Michel <{PATIENT}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{time.time_ns()}@patient.test>"
    msg["Date"] = "Thu, 26 Nov 2026 10:00:00 +0000"
    msg.set_content("Bonjour,\nmerci.\n")
    return msg.as_bytes(policy=email.policy.SMTP)


def test_counters_move_with_real_traffic(world: World) -> None:
    gw, port = world.gw, world.metrics
    before = scrape(port)

    # Professionals: two messages stored, one refused at DATA (R10), one recipient refused (R8).
    conn = smtp(gw, CHRISTELLE)
    assert conn.sendmail(CHRISTELLE, [PATIENT], sample("01")) == {}
    with pytest.raises(smtplib.SMTPDataError) as refused:
        conn.sendmail(CHRISTELLE, [PATIENT], sample("02"))  # From: Dupond
    assert refused.value.smtp_code == 550
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        conn.sendmail(CHRISTELLE, ["289456789012345@patient.mssante.fr"], sample("14"))
    conn.quit()
    conn = smtp(gw, DUPOND)
    assert conn.sendmail(DUPOND, [PATIENT], sample("02")) == {}
    conn.quit()

    # The patient: a failed then a good AUTH; replies to both professionals.
    conn = smtp(gw, None, "submission")
    plain = base64.b64encode(f"\0{INAYA}\0not the password".encode()).decode()
    assert conn.docmd("AUTH", f"PLAIN {plain}")[0] == 535  # one try (login() tries two)
    conn.login(INAYA, PATIENT_PASSWORD)
    assert conn.sendmail(PATIENT, [CHRISTELLE], sample("06")) == {}
    assert conn.sendmail(PATIENT, [DUPOND], patient_mail(DUPOND, "Re: résultats")) == {}
    conn.quit()

    # IMAP: one failed login, one session kept open during the scrape.
    failed = imaplib.IMAP4_SSL("127.0.0.1", gw.ports["imaps"], ssl_context=tls_context(gw))
    with pytest.raises(imaplib.IMAP4.error):
        failed.login(INAYA, "not the password")
    # Martine: five failures (login_failures), then an attempt during the wait is throttled.
    for _ in range(5):
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            failed.login(MARTINE, "not the password either")
    with pytest.raises(imaplib.IMAP4.error) as throttled:
        failed.login(MARTINE, "not the password either")
    assert "AUTHENTICATIONFAILED" not in str(throttled.value), throttled.value
    failed.logout()
    imap = imaplib.IMAP4_SSL("127.0.0.1", gw.ports["imaps"], ssl_context=tls_context(gw))
    imap.login(INAYA, PATIENT_PASSWORD)
    try:
        assert len(world.operator.handler.wait(1)) == 1  # the reply to Christelle was relayed
        deadline = time.monotonic() + 30
        while True:  # the reply to Dupond failed once (closed port) and waits for its retry
            after = scrape(port)
            if value(after, "mssante_outbound_failures_total", kind="relay",
                     failure="temporary") > value(before, "mssante_outbound_failures_total",
                                                  kind="relay", failure="temporary"):
                break
            assert time.monotonic() < deadline, "the relay failure was never counted"
            time.sleep(0.2)
    finally:
        imap.logout()

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    messages = "mssante_smtp_messages_total"
    assert delta(messages, listener="smtp", outcome="accepted", rule="none") == 2
    assert delta(messages, listener="smtp", outcome="refused", rule="R10") == 1
    assert delta(messages, listener="submission", outcome="accepted", rule="none") == 2
    refusals = "mssante_smtp_refusals_total"
    assert delta(refusals, listener="smtp", code="550", rule="R10") == 1
    assert delta(refusals, listener="smtp", code="553", rule="R8") == 1
    assert delta(refusals, listener="submission", code="535", rule="none") == 1
    logins = "mssante_logins_total"
    assert delta(logins, channel="smtp", outcome="failed") == 1
    assert delta(logins, channel="smtp", outcome="ok") == 1
    assert delta(logins, channel="imap", outcome="failed") == 6
    assert delta(logins, channel="imap", outcome="throttled") == 1
    assert delta(logins, channel="imap", outcome="ok") == 1
    assert delta("mssante_outbound_deliveries_total", kind="relay", outcome="sent") == 1
    assert delta("mssante_outbound_deliveries_total", kind="relay", outcome="retry") == 1
    assert value(after, "mssante_outbound_queue_depth", kind="relay") == 1
    assert value(after, "mssante_outbound_queue_depth", kind="notification") == 0
    assert 0 <= value(after, "mssante_outbound_queue_oldest_seconds", kind="relay") < 120
    # Group commits: at least one per stored message, each of at least one job.
    commits = delta("mssante_group_commit_seconds_count")
    assert commits >= 4
    assert delta("mssante_group_commit_jobs_sum") >= commits
    assert value(after, "mssante_group_commit_jobs_bucket", le="256.0") == \
        value(after, "mssante_group_commit_jobs_count")
    assert value(after, "mssante_imap_sessions", state="authenticated") >= 1
    assert value(after, "mssante_smtp_data_bytes_in_flight") == 0  # nothing held after DATA
    assert value(after, "mssante_smtp_data_bytes_limit") == 256 * 1024 * 1024
    assert value(after, "process_resident_memory_bytes") > 0

    # The server forgets the connection just after its BYE: wait for it.
    expected = value(after, "mssante_imap_sessions", state="authenticated") - 1
    deadline = time.monotonic() + 10
    while value(scrape(port), "mssante_imap_sessions", state="authenticated") != expected:
        assert time.monotonic() < deadline, "the IMAP session gauge never went down"
        time.sleep(0.05)


def test_health_and_readiness_while_draining(world: World) -> None:
    gw, port = world.gw, world.metrics
    assert get(port, "/healthz") == (200, "ok\n")
    status, body = get(port, "/readyz")
    assert status == 200, body
    assert body.splitlines()[0] == "ready"
    assert "database: ok" in body and "listeners: ok (6 accepting)" in body
    assert "queue_worker: ok" in body
    assert get(port, "/nothing")[0] == 404
    request = urllib.request.Request(f"http://127.0.0.1:{port}/readyz", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405
    refused.value.close()

    # A transaction in flight keeps the gateway draining after SIGTERM: listeners are closed,
    # /readyz says so (503, the failing check named) while /healthz still answers.
    conn = smtp(gw, CHRISTELLE)
    conn.mail(CHRISTELLE)
    conn.rcpt(PATIENT)
    assert conn.docmd("DATA")[0] == 354
    conn.send(f"From: <{CHRISTELLE}>\r\nSubject: en cours\r\n\r\nune ligne\r\n".encode())
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 20
    while True:
        status, body = get(port, "/readyz")
        if status == 503:
            break
        assert time.monotonic() < deadline, body
        time.sleep(0.05)
    assert body.splitlines()[0] == "not ready: listeners"
    assert "listeners: failing (not accepting: 127.0.0.1:" in body
    assert "database: ok" in body
    assert get(port, "/healthz") == (200, "ok\n")
    conn.send(b".\r\n")
    assert conn.getreply()[0] == 250  # the transaction in flight finishes
    conn.close()
    assert gw.proc.wait(timeout=60) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


async def test_readiness_names_each_failing_check() -> None:
    """In process: a database that refuses connections, a closed listener, a stopped worker."""
    dead = free_port()  # nothing listens there
    store = Store.from_url(f"postgresql://postgres@127.0.0.1:{dead}/nothing")
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    server.close()
    await server.wait_closed()
    try:
        checks = {c.name: c for c in await Readiness(store, [server], lambda: False).checks()}
    finally:
        await store.close()
    assert not checks["database"].ok
    assert re.fullmatch(r"[A-Za-z]+(Error|Exception)", checks["database"].detail), checks
    assert not checks["listeners"].ok and "not accepting" in checks["listeners"].detail
    assert not checks["queue_worker"].ok
    assert not (await Readiness(store, [], lambda: True).checks())[1].ok  # none bound yet


def test_metrics_off_by_default_and_config_checked(tmp_path: Path) -> None:
    base = {"storage": {"url": "sqlite:///x.db"},
            "tls": {"cert": "c.pem", "key": "k.pem", "client_ca": "ca.pem"}}
    config = build_config(base, tmp_path / "gateway.toml")
    assert config.metrics.listen is None
    assert (config.logging.format, config.logging.level) == ("text", "info")
    on = build_config({**base, "metrics": {"listen": "127.0.0.1:9464"}}, tmp_path / "g.toml")
    assert str(on.metrics.listen) == "127.0.0.1:9464"
    for raw, key in (({"metrics": {"listen": "9464"}}, "metrics.listen"),
                     ({"metrics": {"port": 9464}}, "metrics.port"),
                     ({"logging": {"format": "xml"}}, "logging.format"),
                     ({"logging": {"level": "verbose"}}, "logging.level")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            build_config({**base, **raw}, tmp_path / "gateway.toml")
