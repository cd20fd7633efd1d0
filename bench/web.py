"""The patient portal over HTTPS against the gateway's own IMAP, same mailbox, same run
(SPEC §10, §11).

    .venv/bin/python bench/web.py [--messages 10000] [--conversations 1500] [--clients 20]
        [--seconds 20] [--db sqlite|postgresql] [--profile FILE] [--keep]

The mailbox: ``--messages`` French health mails in ``--conversations`` conversations (threads
of 1 to ~30 messages: each reply has ``In-Reply-To`` its parent and ``References`` the root
then its last parents, so ``thread_id`` is the root's Message-ID), bodies, senders with their
display names and subjects as in ``bench/imap_workload.py``, in date order (UIDs follow
arrival), 70 % ``\\Seen``, plus the gateway's welcome message.

* Gateway: ``mssante-gateway init`` in a temporary directory, a trusted domain, a patient with
  a password and a phone (``mssante-policy patient add --phone ... --password-stdin``), the
  messages written in bulk as ``bench/imap.py`` does (its ``load_gateway``: the first through
  ``deliver``, the others in rows checked to be the same), then ``mssante-gateway serve``
  with ``[web]`` and ``[imaps]`` on free loopback ports, SMTP off; the one-time code goes to
  the dev SMS outbox file (``sms-outbox.txt``).
* The 50 conversations of the list's first page (read from the store with the portal's own
  query) are the ones opened on the web and fetched over IMAP.

The load runs in one separate process (asyncio, small hand-written HTTP/1.1 and IMAP clients
over TLS, keep-alive), which reports its own CPU use; the two phases run one after the other:

1. web: ``--clients`` browsers log in once each, one after the other (password, code by SMS
   read from the outbox, code), then loop for ``--seconds``: ``GET /messagerie``, ``GET
   /messagerie?page=K`` (K a random later page), then 2-3 conversations of the first page
   (``GET /messagerie/conversations/{key}``). A warm-up opens each of the 50 once first
   (opening marks them ``\\Seen``: a write, then none).
2. imap: ``--clients`` sessions over implicit TLS, logged in once, ``SELECT INBOX``, then
   loop for ``--seconds``: ``UID FETCH <the UIDs of one of the 50 conversations> (ENVELOPE
   FLAGS)`` (what a mail client needs to show that conversation).

One page or one FETCH is one operation. Every page must be a 200 with what it should show (a
list page its "1 - 50 sur N" / "Page K sur P" and 50 conversations, a conversation its
subject), every FETCH one ``FETCH`` reply per UID with an ENVELOPE; anything else is counted
as an error (``check:`` line).

Last line: ``ratio=<web/imap> web=<n>/s imap=<n>/s p99=<ms>ms`` (p99 over all web requests).
Target (issue): ratio >= 1.0 and p99 < 150 ms at 20 clients.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import random
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "bench"), str(ROOT)):  # the project's packages first (``imap`` too)
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

from benchlib import ServerDir, Tally, cleanup, free_port, set_key, tree_state  # noqa: E402
from imap_workload import (  # noqa: E402
    EPOCH,
    PATIENT_DOMAIN,
    SENDERS,
    SUBJECTS,
    USER_AGENTS,
    BenchMessage,
    _header,
    content,
)


def _bench_imap() -> Any:
    """``bench/imap.py`` as a module (its IMAP client, bulk load, CPU readers): it cannot be
    imported as ``imap``, the name of the project's IMAP package."""
    spec = importlib.util.spec_from_file_location("bench_imap", ROOT / "bench" / "imap.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_imap"] = module
    spec.loader.exec_module(module)
    return module


bi = _bench_imap()

BIN = Path(sys.executable).parent
INS = bi.INS  # bench_imap's load reads this patient's INBOX
PASSWORD = bi.PASSWORD
PHONE = "+33612345678"
SERVICE_DOMAIN = "mssante.bench.test"
TRUSTED_DOMAIN = "medecin.mssante.fr"
SEED = 20250602
PAGE_SIZE = 50
POOL = 50
TIMEOUT = 60.0
ALONE = 10  # requests of each kind by one client alone (service time, no queueing)
WEB_KINDS = ("list_page1", "list_later", "conversation")
IMAP_KINDS = ("uid_fetch_envelope",)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the mailbox ------------------------------------------------------------------------------


def _body(rng: random.Random, size: int) -> tuple[list[str], bytes]:
    """Content headers and body of about ``size`` bytes, the mix of ``imap_workload``."""
    return content(rng, max(300, size - 1200))


def make_threads(n: int, conversations: int, seed: int = SEED) -> list[BenchMessage]:
    """``n`` messages in ``conversations`` threads, sorted by date (the order they arrived)."""
    rng = random.Random(seed)
    conversations = max(1, min(conversations, n))
    sizes = [1] * conversations
    weights = [rng.expovariate(1.0) for _ in range(conversations)]
    for i in rng.choices(range(conversations), weights, k=n - conversations):
        sizes[i] += 1
    recipient = f"{INS}@{PATIENT_DOMAIN}"
    box: list[BenchMessage] = []
    for c, count in enumerate(sizes):
        first = SENDERS[rng.randrange(len(SENDERS))]
        other = SENDERS[rng.randrange(len(SENDERS))] if rng.random() < 0.3 else first
        date = EPOCH - timedelta(seconds=rng.randrange(2 * 365 * 86400))
        subject = rng.choice(SUBJECTS).format(d=date.strftime("%d/%m/%Y"))
        ids: list[str] = []
        for i in range(count):
            name, address = first if i % 2 == 0 else other
            domain = address.split("@", 1)[1]
            message_id = f"<c{c}.{i}.{rng.getrandbits(40):010x}@{domain}>"
            headers = [
                f"Return-Path: <{address}>",
                f"Received: from mx.{domain} (mx.{domain} [10.{c % 250}.{i % 250}.7])\r\n"
                f"\tby {SERVICE_DOMAIN} with ESMTPS id {rng.getrandbits(40):010X}\r\n"
                f"\tfor <{recipient}>; {format_datetime(date)}",
                f"Date: {format_datetime(date)}",
                f"From: {_header(name)} <{address}>",
                f"To: Inaya Michel <{recipient}>",
                f"Subject: {_header(subject if i == 0 else 'RE: ' + subject)}",
                f"Message-ID: {message_id}",
            ]
            if ids:
                refs = ids if len(ids) <= 10 else ids[:1] + ids[-9:]
                headers += [f"In-Reply-To: {ids[-1]}", "References: " + "\r\n ".join(refs)]
            content, body = _body(rng, int(2048 * (10 ** rng.random())))
            headers += ["MIME-Version: 1.0", f"User-Agent: {rng.choice(USER_AGENTS)}", *content]
            raw = "\r\n".join(headers).encode() + b"\r\n\r\n" + body
            box.append(BenchMessage(raw, date, rng.random() < 0.7))
            ids.append(message_id)
            date += timedelta(seconds=rng.randrange(600, 5 * 86400))
    box.sort(key=lambda m: m.date)
    return box


# --- the HTTP client --------------------------------------------------------------------------


class HttpError(Exception):
    pass


@dataclass
class HttpReply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


class Browser:
    """One HTTP/1.1 keep-alive connection over TLS with a cookie jar; the least work per
    reply (headers split, Content-Length or chunked body read, nothing else parsed)."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext) -> None:
        self.host, self.port, self.ctx = host, port, ctx
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.cookies: dict[str, str] = {}
        self.connects = 0

    async def _connect(self) -> None:
        self.close()
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.ctx, server_hostname="localhost", limit=1 << 22)
        self.connects += 1

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, form: dict[str, str] | None = None
                      ) -> HttpReply:
        body = urlencode(form).encode() if form is not None else b""
        head = [f"{method} {path} HTTP/1.1", f"Host: localhost:{self.port}",
                "User-Agent: bench-web/1.0", "Accept: text/html"]
        if self.cookies:
            head.append("Cookie: " + "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        if form is not None:
            head += ["Content-Type: application/x-www-form-urlencoded",
                     f"Content-Length: {len(body)}"]
        data = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        async with asyncio.timeout(TIMEOUT):
            for attempt in (1, 2):
                fresh = self.writer is None
                if fresh:
                    await self._connect()
                assert self.writer is not None
                try:
                    self.writer.write(data)
                    await self.writer.drain()
                    reply = await self._read()
                except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
                    # an idle keep-alive connection the server closed: once more, anew
                    self.close()
                    if fresh or attempt == 2 or (isinstance(exc, asyncio.IncompleteReadError)
                                                 and exc.partial):
                        raise HttpError(f"{method} {path}: {type(exc).__name__}: {exc}"
                                        ) from exc
                    continue
                if (reply.header("connection") or "").lower() == "close":
                    self.close()
                self._cookies(reply)
                return reply
        raise AssertionError("unreachable")

    async def _read(self) -> HttpReply:
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        hdr = dict(headers)
        if "content-length" in hdr:
            body = await self.reader.readexactly(int(hdr["content-length"]))
        elif hdr.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")  # no trailers are sent
                    break
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(chunks)
        else:
            body = await self.reader.read()
            self.close()
        return HttpReply(status, headers, body)

    def _cookies(self, reply: HttpReply) -> None:
        for name, value in reply.headers:
            if name != "set-cookie":
                continue
            pair, _, attributes = value.partition(";")
            key, _, val = pair.strip().partition("=")
            if "max-age=0" in attributes.lower().replace(" ", ""):
                self.cookies.pop(key, None)
            else:
                self.cookies[key] = val.strip('"')

    async def follow(self, reply: HttpReply, limit: int = 5) -> HttpReply:
        """Follow 30x redirects with GET."""
        while reply.status in (301, 302, 303, 307) and limit:
            location = reply.header("location") or "/"
            reply = await self.request("GET", location)
            limit -= 1
        return reply


_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_KEY = re.compile(r'href="/messagerie/conversations/(\d+)"')
_CODE = re.compile(r"code de connexion est (\d{6})")


def csrf(reply: HttpReply) -> str:
    m = _CSRF.search(reply.text)
    if m is None:
        raise HttpError(f"no CSRF token in a {reply.status} page: {reply.text[:300]!r}")
    return m.group(1)


def last_code(outbox: Path) -> str:
    codes = _CODE.findall(outbox.read_text("utf-8")) if outbox.exists() else []
    if not codes:
        raise HttpError(f"no one-time code in {outbox}")
    return str(codes[-1])


async def login(browser: Browser, spec: Spec) -> HttpReply:
    """The walkthrough: identifier + password, the code by SMS, the code; the list page."""
    page = await browser.request("GET", "/connexion")
    reply = await browser.request("POST", "/connexion", {
        "csrf": csrf(page), "identifiant": spec.ins, "mot_de_passe": spec.password})
    if reply.status != 303 or reply.header("location") != "/connexion/code":
        raise HttpError(f"password step: {reply.status} {reply.header('location')} "
                        f"{reply.text[:300]!r}")
    page = await browser.follow(reply)
    reply = await browser.request("POST", "/connexion/code", {"csrf": csrf(page),
                                                              "canal": "sms"})
    if reply.status != 303:
        raise HttpError(f"code choice: {reply.status} {reply.text[:300]!r}")
    page = await browser.follow(reply)
    reply = await browser.request("POST", "/connexion/code/saisie", {
        "csrf": csrf(page), "code": last_code(Path(spec.outbox))})
    if reply.status != 303 or reply.header("location") != "/messagerie":
        raise HttpError(f"code step: {reply.status} {reply.header('location')} "
                        f"{reply.text[:300]!r}")
    return await browser.follow(reply)


# --- the load (runs in the worker process) ------------------------------------------------------


@dataclass
class Spec:
    web_port: int
    imaps_port: int
    pids: list[int]
    ca: str
    outbox: str
    clients: int
    seconds: float
    total: int  # conversations in the list
    pool: list[dict[str, Any]]  # the first page: {"key", "subject", "uids"}
    ins: str = INS
    password: str = PASSWORD
    host: str = "127.0.0.1"
    profile: str = ""
    py_spy_args: str = ""


@dataclass
class Stats(Tally):
    bytes_in: int = 0


def escape(text: str) -> str:
    """As Jinja's autoescape writes it (markupsafe)."""
    import markupsafe

    return str(markupsafe.escape(text))


class Checks:
    """What each page must show."""

    def __init__(self, spec: Spec) -> None:
        self.total = spec.total
        self.pages = max(1, -(-spec.total // PAGE_SIZE))
        self.first = f"1 - {min(PAGE_SIZE, spec.total)} sur {spec.total}"
        self.keys = [int(p["key"]) for p in spec.pool]
        self.subjects = {int(p["key"]): escape(p["subject"] or "(sans objet)")
                         for p in spec.pool}

    def page1(self, reply: HttpReply) -> str | None:
        if reply.status != 200:
            return f"status {reply.status}"
        text = reply.text
        if self.first not in text:
            return f"no {self.first!r}"
        keys = [int(k) for k in _KEY.findall(text)]
        if keys != self.keys:
            return f"{len(keys)} conversations, not the first page's {len(self.keys)}"
        return None

    def later(self, reply: HttpReply, number: int) -> str | None:
        if reply.status != 200:
            return f"status {reply.status}"
        text = reply.text
        first = (number - 1) * PAGE_SIZE + 1
        last = min(number * PAGE_SIZE, self.total)
        if f"{first} - {last} sur {self.total}" not in text or \
                f"Page {number} sur {self.pages}" not in text:
            return f"page {number}: no '{first} - {last} sur {self.total}'"
        n = len(_KEY.findall(text))
        if n != last - first + 1:
            return f"page {number}: {n} conversations"
        return None

    def conversation(self, reply: HttpReply, key: int) -> str | None:
        if reply.status != 200:
            return f"{key}: status {reply.status}"
        if f"<h1>{self.subjects[key]}</h1>" not in reply.text:
            return f"{key}: no subject {self.subjects[key]!r}"
        return None


async def web_client(index: int, browser: Browser, spec: Spec, checks: Checks,
                     deadline: float, stats: Stats) -> int:
    rng = random.Random(SEED * 1000 + index)
    ops = 0
    lat = stats.latencies

    async def get(kind: str, path: str) -> HttpReply:
        nonlocal ops
        t0 = time.perf_counter()
        reply = await browser.request("GET", path)
        lat[kind].append((time.perf_counter() - t0) * 1000)
        stats.bytes_in += len(reply.body)
        ops += 1
        return reply

    try:
        while time.perf_counter() < deadline:
            reply = await get("list_page1", "/messagerie")
            problem = checks.page1(reply)
            if problem:
                stats.error("list_page1", problem)
            if time.perf_counter() >= deadline:
                break
            number = rng.randrange(2, checks.pages + 1) if checks.pages > 1 else 1
            reply = await get("list_later", f"/messagerie?page={number}")
            problem = checks.later(reply, number) if number > 1 else checks.page1(reply)
            if problem:
                stats.error("list_later", problem)
            keys = checks.keys  # the first page's conversations (the IMAP side fetches them)
            for key in rng.sample(keys, min(len(keys), rng.choice((2, 3)))):
                if time.perf_counter() >= deadline:
                    break
                reply = await get("conversation", f"/messagerie/conversations/{key}")
                problem = checks.conversation(reply, key)
                if problem:
                    stats.error("conversation", problem)
    except (HttpError, OSError, TimeoutError) as exc:
        stats.error("connection", f"{type(exc).__name__}: {exc}")
    return ops


_FETCH = re.compile(rb"^\* \d+ FETCH \(", re.M)


async def imap_client(index: int, conn: Any, spec: Spec, deadline: float,
                      stats: Stats) -> int:
    rng = random.Random(SEED * 2000 + index)
    ops = 0
    lat = stats.latencies["uid_fetch_envelope"]
    try:
        while time.perf_counter() < deadline:
            convo = rng.choice(spec.pool)
            uids = convo["uids"]
            t0 = time.perf_counter()
            try:
                reply = await conn.command(b"UID FETCH %s (ENVELOPE FLAGS)"
                                           % ",".join(map(str, uids)).encode(), keep=True)
            except bi.ImapError as exc:
                stats.error("uid_fetch_envelope", str(exc))
                continue
            lat.append((time.perf_counter() - t0) * 1000)
            ops += 1
            stats.bytes_in += len(reply.text)
            n = len(_FETCH.findall(reply.text))
            if n != len(uids) or reply.text.count(b"ENVELOPE (") != len(uids):
                stats.error("uid_fetch_envelope", f"{n} FETCH replies for {len(uids)} UIDs")
    except (OSError, TimeoutError, bi.ImapError) as exc:
        stats.error("connection", f"{type(exc).__name__}: {exc}")
    return ops


def postgres_cpu() -> float:
    """CPU seconds of the machine's PostgreSQL processes (they are not serve's children)."""
    ticks = sum(int(f[11]) + int(f[12]) for _ppid, name, f in bi._processes().values()
                if name.startswith("postgres"))
    return ticks / os.sysconf("SC_CLK_TCK")


def start_spy(spec: Spec) -> subprocess.Popen[bytes] | None:
    if not spec.profile:
        return None
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(spec.profile).suffix, "raw")
    return subprocess.Popen([str(BIN / "py-spy"), "record", "--pid", str(spec.pids[0]),
                             "--output", spec.profile, "--format", fmt,
                             "--duration", str(round(spec.seconds)),
                             *spec.py_spy_args.split()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def measure(spec: Spec, stats: Stats, loops: list[Any], profile: bool) -> dict[str, Any]:
    machine0 = bi.machine_busy()
    server0 = bi.server_cpu(spec.pids)
    client0 = time.process_time()
    pg0 = postgres_cpu()
    spy = start_spy(spec) if profile else None
    t0 = time.perf_counter()
    results = await asyncio.gather(*(f(t0 + spec.seconds) for f in loops),
                                   return_exceptions=True)
    wall = time.perf_counter() - t0
    client = time.process_time() - client0
    server = bi.server_cpu(spec.pids) - server0
    busy = bi.machine_busy() - machine0
    pg = postgres_cpu() - pg0
    if spy is not None:
        await asyncio.to_thread(spy.wait)
    ops = 0
    for r in results:
        if isinstance(r, BaseException):
            stats.error("connection", f"{type(r).__name__}: {r}")
        else:
            ops += r
    every = [v for values in stats.latencies.values() for v in values]
    return {
        "ops": ops, "wall": wall, "ops_per_s": ops / wall,
        "p50_ms": bi.percentile(every, 50), "p99_ms": bi.percentile(every, 99),
        "kinds": {k: {"n": len(v), "p50_ms": bi.percentile(v, 50),
                      "p99_ms": bi.percentile(v, 99), "max_ms": max(v) if v else 0.0}
                  for k, v in stats.latencies.items()},
        "errors": stats.errors, "first_errors": stats.first_errors,
        "mb_in": stats.bytes_in / 1e6,
        "client_cpu_s": client, "server_cpu_s": server, "postgres_cpu_s": pg,
        "others_cpu_s": busy - client - server - pg,
    }


async def web_phase(spec: Spec) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=spec.ca)
    checks = Checks(spec)
    out: dict[str, Any] = {}
    browsers = [Browser(spec.host, spec.web_port, ctx) for _ in range(spec.clients)]
    login_ms: list[float] = []
    cpu0 = bi.server_cpu(spec.pids)
    # Logins one after the other (the code is the outbox's last one); the portal sends one
    # patient at most 10 codes an hour, so 3 real logins and the other clients share the last
    # session (as tabs of one browser do).
    for i, b in enumerate(browsers):
        if i >= 3:
            b.cookies = dict(browsers[2].cookies)
            page = await b.request("GET", "/messagerie")
        else:
            t0 = time.perf_counter()
            page = await login(b, spec)
            login_ms.append((time.perf_counter() - t0) * 1000)
        problem = checks.page1(page)
        if problem:
            raise HttpError(f"the list after login: {problem}")
    out["login"] = {"n": len(login_ms), "p50_ms": bi.percentile(login_ms, 50),
                    "max_ms": max(login_ms),
                    "server_cpu_ms": (bi.server_cpu(spec.pids) - cpu0) / len(login_ms) * 1000}
    t0 = time.perf_counter()
    warm = browsers[0]
    problems = []
    for number in (1, 2, checks.pages):
        reply = await warm.request("GET", f"/messagerie?page={number}")
        problem = checks.page1(reply) if number == 1 else checks.later(reply, number)
        if problem:
            problems.append(problem)
    for key in checks.keys:  # marks the unseen ones \Seen (writes), once
        problem = checks.conversation(
            await warm.request("GET", f"/messagerie/conversations/{key}"), key)
        if problem:
            problems.append(problem)
    out["warmup"] = {"seconds": time.perf_counter() - t0, "problems": problems}
    rng = random.Random(SEED)
    alone: dict[str, list[float]] = {k: [] for k in WEB_KINDS}
    for _ in range(ALONE):  # one client, nothing else running: the service time
        for kind, path in (
                ("list_page1", "/messagerie"),
                ("list_later", f"/messagerie?page={rng.randrange(2, checks.pages + 1)}"
                 if checks.pages > 1 else "/messagerie"),
                ("conversation", f"/messagerie/conversations/{rng.choice(checks.keys)}")):
            t1 = time.perf_counter()
            await warm.request("GET", path)
            alone[kind].append((time.perf_counter() - t1) * 1000)
    out["alone"] = {k: statistics.median(v) for k, v in alone.items()}
    for b in browsers:  # fresh connections: uvicorn closes idle keep-alive ones after 5 s
        b.close()
        b.connects = 0
    stats = Stats(WEB_KINDS)
    loops = [lambda d, i=i, b=b: web_client(i, b, spec, checks, d, stats)
             for i, b in enumerate(browsers)]
    out["load"] = await measure(spec, stats, loops, profile=True)
    out["load"]["connects"] = sum(b.connects for b in browsers) - len(browsers)
    for b in browsers:
        b.close()
    return out


async def imap_phase(spec: Spec) -> dict[str, Any]:
    ctx = bi.client_context()
    conns = []
    for _ in range(spec.clients):
        conn = await bi.Imap.connect(spec.host, spec.imaps_port, ctx)
        await conn.login(spec.ins, spec.password)
        await conn.command(b"SELECT INBOX")
        conns.append(conn)
    t0 = time.perf_counter()
    for convo in spec.pool:  # warm-up, and the same check as in the load
        uids = ",".join(map(str, convo["uids"])).encode()
        await conns[0].command(b"UID FETCH %s (ENVELOPE FLAGS)" % uids)
    out: dict[str, Any] = {"warmup": {"seconds": time.perf_counter() - t0}}
    rng = random.Random(SEED)
    alone: list[float] = []
    for _ in range(3 * ALONE):
        uids = ",".join(map(str, rng.choice(spec.pool)["uids"])).encode()
        t1 = time.perf_counter()
        await conns[0].command(b"UID FETCH %s (ENVELOPE FLAGS)" % uids)
        alone.append((time.perf_counter() - t1) * 1000)
    out["alone"] = {IMAP_KINDS[0]: statistics.median(alone)}
    stats = Stats(IMAP_KINDS)
    loops = [lambda d, i=i, c=c: imap_client(i, c, spec, d, stats)
             for i, c in enumerate(conns)]
    out["load"] = await measure(spec, stats, loops, profile=False)
    await asyncio.gather(*(c.logout() for c in conns), return_exceptions=True)
    return out


async def worker_main(spec: Spec) -> dict[str, Any]:
    out: dict[str, Any] = {"errors": []}
    for name, phase in (("web", web_phase), ("imap", imap_phase)):
        log(f"  [{name}] logins, warm-up, {spec.seconds:.0f}s of load...")
        try:
            out[name] = await phase(spec)
        except Exception as exc:
            out["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
    return out


def run_worker(spec: Spec) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker"],
                          input=json.dumps(spec.__dict__), capture_output=True, text=True,
                          timeout=2 * spec.seconds + 900)
    sys.stderr.write(proc.stderr)
    try:
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"errors": [f"worker exited {proc.returncode}: {proc.stdout[-500:]}"]}


# --- the gateway --------------------------------------------------------------------------------


@dataclass
class GatewayDir(ServerDir):
    web_port: int = 0


def make_gateway_dir(base: Path, db: str, clients: int) -> GatewayDir:
    ports = {"web": free_port(), "imaps": free_port()}
    directory, url, schema = bi.init_gateway(base, db, ports)
    gw = GatewayDir(directory, url, schema, web_port=ports["web"], imaps_port=ports["imaps"])
    cfg = gw.config
    set_key(cfg, "web", "sms_outbox", "sms-outbox.txt")
    set_key(cfg, "limits", "connections_per_ip", str(4 * clients + 50))
    bi._cli("mssante-policy", cfg, "domain", "add", TRUSTED_DOMAIN)
    bi._cli("mssante-policy", cfg, "patient", "add", INS, "--name", "Inaya Michel",
            "--notify-email", "inaya@example.org", "--phone", PHONE, "--password-stdin",
            stdin=PASSWORD + "\n")
    return gw


def first_page(gw: GatewayDir) -> tuple[int, int, list[dict[str, Any]]]:
    """(conversations, threads among the messages, the first page: key, subject, INBOX UIDs),
    with the portal's own queries."""
    from sqlalchemy import func, select

    from imap_store.store import schema as t
    from imap_store.store.directory import Store
    from imap_store.store.portal import Conversations

    async def run() -> tuple[int, int, list[dict[str, Any]]]:
        store = Store.from_url(gw.url)
        try:
            patient = await store.get_patient(INS)
            convos = Conversations(store, patient.id)
            total, items = await convos.page(0, POOL)
            pool = []
            for c in items:
                messages = await convos.messages(c.key)
                pool.append({"key": c.key, "subject": messages[0].subject,
                             "uids": sorted(m.uid for m in messages if m.mailbox == "INBOX")})
            async with store.read() as conn:
                threads = int((await conn.execute(
                    select(func.count(func.distinct(t.message.c.thread_id))))).scalar_one())
            return total, threads, pool
        finally:
            await store.close()

    return asyncio.run(run())


def run_gateway(gw: GatewayDir, box: list[BenchMessage], args: argparse.Namespace
                ) -> dict[str, Any]:
    log(f"gateway: loading {len(box)} messages into the store...")
    loaded, how = bi.load_gateway(gw, box)
    total, threads, pool = first_page(gw)
    sizes = [len(p["uids"]) for p in pool]
    log(f"gateway: loaded in {loaded:.1f}s ({how}); {total} conversations; starting serve")
    env = {**os.environ, "MSSANTE_CONFIG": str(gw.config), "PYTHONUNBUFFERED": "1"}
    server = bi.Server("mssante-gateway serve", [str(BIN / "mssante-gateway"), "serve"],
                       gw.directory / "serve.log", env)
    try:
        server.wait_port(gw.web_port, 30.0, marker=b"mssante-gateway ready")
        server.wait_port(gw.imaps_port, 10.0)
        result = run_worker(Spec(
            web_port=gw.web_port, imaps_port=gw.imaps_port, pids=[server.proc.pid],
            ca=str(gw.directory / "certs" / "ca.pem"),
            outbox=str(gw.directory / "sms-outbox.txt"), clients=args.clients,
            seconds=args.seconds, total=total, pool=pool,
            profile=str(Path(args.profile).resolve()) if args.profile else "",
            py_spy_args=args.py_spy_args))
        result.update(load_seconds=loaded, load_how=how, total=total, threads=threads,
                      pool_sizes=sizes)
        if result.get("errors") or any(result.get(p, {}).get("load", {}).get("errors")
                                       for p in ("web", "imap")):
            result["log_tail"] = server.log_tail(40)
        return result
    finally:
        server.stop()


# --- report -------------------------------------------------------------------------------------


def report_load(name: str, side: dict[str, Any], db: str) -> None:
    ld = side["load"]
    wall = ld["wall"]
    alone = side.get("alone", {})
    print(f"{name}: {ld['ops_per_s']:.1f} ops/s ({ld['ops']} in {wall:.1f}s, p50 "
          f"{ld['p50_ms']:.1f}ms p99 {ld['p99_ms']:.1f}ms, {ld['mb_in']:.0f} MB received); "
          f"CPU: server {ld['server_cpu_s'] / wall * 100:.0f}% "
          f"({ld['server_cpu_s'] / max(ld['ops'], 1) * 1000:.1f}ms/op), load client "
          f"{ld['client_cpu_s'] / wall * 100:.0f}%, "
          + (f"PostgreSQL {ld['postgres_cpu_s'] / wall * 100:.0f}%, " if db == "postgresql"
             else "")
          + "everything else "
          f"{ld['others_cpu_s'] / wall * 100:.0f}% (100% = one core)"
          + (f"; {ld['connects']} reconnections" if ld.get("connects") else ""))
    for kind, k in ld["kinds"].items():
        print(f"{name}:   {kind:19} n={k['n']:6} p50={k['p50_ms']:8.1f}ms "
              f"p99={k['p99_ms']:8.1f}ms max={k['max_ms']:8.1f}ms"
              + (f"  (one client alone: median {alone[kind]:.1f}ms)" if kind in alone else ""))


def report(r: dict[str, Any], args: argparse.Namespace) -> tuple[float, float, float]:
    for err in r.get("errors", []):
        print(f"error: {err}")
    if "total" in r:
        sizes = r["pool_sizes"]
        print(f"mailbox: {args.messages} messages + welcome, {r['threads']} threads, "
              f"{r['total']} conversations in the list; store loaded in "
              f"{r['load_seconds']:.1f}s ({r['load_how']}); the {len(sizes)} conversations "
              f"of page 1 hold {min(sizes, default=0)}-{max(sizes, default=0)} messages "
              f"({sum(sizes)} in all)")
    checks: list[str] = []
    web, imap = r.get("web") or {}, r.get("imap") or {}
    if web.get("login"):
        g = web["login"]
        print(f"web: {g['n']} logins (password + SMS code + code), one after the other: "
              f"p50 {g['p50_ms']:.0f}ms max {g['max_ms']:.0f}ms, server CPU "
              f"{g['server_cpu_ms']:.0f}ms/login; warm-up (3 list pages, the 50 conversations "
              f"opened once) {web['warmup']['seconds']:.1f}s")
        checks += [f"web warm-up: {p}" for p in web["warmup"]["problems"]]
    if web.get("load"):
        report_load("web", web, args.db)
    if imap.get("load"):
        print(f"imap: warm-up (each of the 50 fetched once) {imap['warmup']['seconds']:.2f}s")
        report_load("imap", imap, args.db)
    for name, side in (("web", web), ("imap", imap)):
        ld = side.get("load")
        if ld and ld["errors"]:
            checks.append(f"{name} errors {ld['errors']}: " + " | ".join(ld["first_errors"]))
    if r.get("log_tail"):
        print(f"serve log (last lines):\n{r['log_tail']}")
    if checks or r.get("errors") or not web.get("load") or not imap.get("load"):
        print("check: FAILED: " + ("; ".join(checks) or "a phase did not run"))
    else:
        print(f"check: every page was a 200 with what it should show (page 1: the 50 "
              f"expected conversations and '1 - 50 sur {r['total']}', later pages their "
              f"range, conversations their subject); every FETCH had one ENVELOPE per UID")
    w = web.get("load", {}).get("ops_per_s", 0.0) if not web.get("load", {}).get("errors") \
        else 0.0
    i = imap.get("load", {}).get("ops_per_s", 0.0) if not imap.get("load", {}).get("errors") \
        else 0.0
    p99 = web.get("load", {}).get("p99_ms", 0.0)
    return w, i, p99


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--conversations", type=int, default=1_500)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--profile", metavar="FILE",
                        help="py-spy record of serve during the web load (.svg, .json, raw)")
    parser.add_argument("--py-spy-args", default="",
                        help='more py-spy record options, as one argument: "--gil"')
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = Spec(**json.loads(sys.stdin.read()))
        print(json.dumps(asyncio.run(worker_main(spec))))
        return 0

    started = time.perf_counter()
    print(f"commit {tree_state()}; db={args.db}", flush=True)
    base = Path(tempfile.mkdtemp(prefix="web-bench-"))
    result: dict[str, Any] = {}
    gw: GatewayDir | None = None
    try:
        t0 = time.perf_counter()
        box = make_threads(args.messages, args.conversations)
        log(f"generated {len(box)} messages ({sum(len(m.raw) for m in box) / 1e6:.0f} MB) in "
            f"{time.perf_counter() - t0:.1f}s")
        try:
            gw = make_gateway_dir(base, args.db, args.clients)
            result = run_gateway(gw, box, args)
        except Exception as exc:
            result = {"errors": [f"{type(exc).__name__}: {exc}"]}
    finally:
        cleanup(base, gw.pg_schema if gw is not None else None, args.keep)
    print(f"{args.clients} clients, {args.seconds:.0f}s per side, load average "
          f"{os.getloadavg()[0]:.2f} at the end")
    web, imap, p99 = report(result, args)
    if args.profile:
        print(f"profile: {args.profile} (bench/pyspy_top.py {args.profile})")
    print(f"(total {time.perf_counter() - started:.0f}s)")
    print(f"ratio={web / imap if imap else 0.0:.2f} web={web:.0f}/s imap={imap:.0f}/s "
          f"p99={p99:.0f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
