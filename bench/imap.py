"""IMAP throughput and latency of the gateway against Dovecot, same machine, same run (SPEC §10).

    .venv/bin/python bench/imap.py [--messages 10000] [--clients 10] [--seconds 20]
        [--target gateway|dovecot|both] [--db sqlite|postgresql] [--keep]
    .venv/bin/python bench/imap.py --sessions [--messages 500] [--seconds 20] [--profile F]

The mailbox: ``--messages`` French health mails from ``bench/imap_workload.py`` (2-20 KB,
30 % with a PDF-like attachment, deterministic seed) plus the gateway's welcome message, so
both servers hold the same N+1 messages with the same UIDs (welcome = UID 1).

* Gateway: ``mssante-gateway init`` in a temporary directory, a trusted domain, patient
  289057512345621 with a password (``mssante-policy patient add --password-stdin``), the
  messages written straight into the store in big transactions (the first through
  ``deliver``, the others in bulk, checked to be the same rows: see ``load_gateway``),
  then ``mssante-gateway serve`` with ``[imap]``/``[imaps]`` on free loopback ports (SMTP
  off).
* Dovecot: ``dovecot -F -c <tmp>/dovecot.conf`` as root on a free loopback imaps port (the
  gateway's dev certificate), its own base_dir/state_dir, a passwd-file with the *same*
  argon2id hash the gateway stores (19 MiB, t=2, p=1: Dovecot verifies it with libsodium from
  the parameters in the hash), a maildir written directly (``dovecot-uidlist`` included;
  ``--dovecot-format mdbox|sdbox`` copies it with ``doveadm backup``, same UIDs).

The load runs in one separate process (asyncio, a small hand-written IMAP client over TLS
that skips literals without parsing them), which reports its own CPU use. Per server:

1. warm-up (SELECT, FETCH 1:* (FLAGS UID), the SEARCHes, a few bodies: Dovecot builds its
   index and cache here, the gateway warms its caches);
2. SELECT latency: median of 20 SELECT INBOX on one connection;
3. memory per idle authenticated connection: server RSS (Dovecot: sum over all its
   processes) before and after opening 200 logged-in idle connections, divided by 200;
4. LOGIN: 20 sequential then 50 with 10 at a time, each a new TLS connection
   (connect + TLS + LOGIN; logins/s is for the concurrent 50);
5. the load: ``--clients`` sessions, each logged in once, looping for ``--seconds``:
   SELECT INBOX; FETCH 1:* (FLAGS UID); UID FETCH <50 random UIDs> BODY.PEEK[]; SEARCH
   (UNSEEN / FROM "x" / SUBJECT "y" in turn); UID STORE <3 UIDs> +FLAGS (\\Seen); APPEND;
   UID STORE <appended> +FLAGS (\\Deleted); UID EXPUNGE <appended>. Each command counts as
   one operation; latency is per command.

Last line: ``ratio=<gateway/dovecot> gateway=<n>/s dovecot=<n>/s p99=<ms>ms`` (p99 over all
commands of the gateway run). A server that cannot be reached or fails gets 0 and an
``error:`` line; the script still ends with that line.

``--sessions`` measures whole sessions instead, a login per cycle (issue 13, "Speed"):
``SESSION_USERS`` (20) mailboxes, patients in the gateway (the benchmark's patient, then INS
of its own, each ``patient add --password-stdin`` with the same password: same argon2id
parameters, own salt) and users of Dovecot's passwd-file with the very hash the gateway
stored, each with its own maildir. Each mailbox holds ``--messages`` messages, **500 by
default in this mode** (the same 500 in every mailbox, plus its welcome message), loaded as
above (``load_gateway`` per patient, the maildir writer per user). After a warm-up that
opens every mailbox once (EXISTS and the bytes of UIDs 1-5 are compared between the
servers) and a phase of one session at a time that gives each step's server CPU and
latency without queueing (``step_costs``), ``--clients`` clients loop for ``--seconds``,
client i on mailboxes i, i+clients, ... in turn, each cycle: connect + TLS (implicit TLS
port), LOGIN, SELECT INBOX, FETCH 1:* (FLAGS), UID FETCH <5 random UIDs> BODY.PEEK[],
UID STORE <3> +FLAGS (\\Seen), APPEND, UID STORE <it> +FLAGS (\\Deleted), UID EXPUNGE <it>,
LOGOUT. The cycle in progress at the deadline is finished and counted. Printed: cycles/s,
latency per step and per cycle, server CPU per cycle. ``--profile`` records serve during
the loop (``bench/pyspy_top.py --drop-idle --group`` summarises it). Last line:
``sessions_ratio=<gateway/dovecot> gateway=<n>/s dovecot=<n>/s p99=<ms>ms`` (cycles/s; p99
over every step of the gateway run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from benchlib import ServerDir, Tally, cleanup, make_ins, set_key  # noqa: E402
from imap_workload import (  # noqa: E402
    EPOCH,
    FROM_TERMS,
    SUBJECT_TERMS,
    BenchMessage,
    make_mailbox,
    make_message,
)

BIN = Path(sys.executable).parent
INS = "289057512345621"
PASSWORD = "mot de passe patient"
SERVICE_DOMAIN = "mssante.bench.test"
TRUSTED_DOMAIN = "medecin.mssante.fr"
PG_URL = os.environ.get("MSSANTE_BENCH_PG", "postgresql://postgres@127.0.0.1/test")
SEED = 20250601
IDLE_CONNECTIONS = 200
LOGINS_SEQUENTIAL = 20
LOGINS_CONCURRENT = 50
LOGIN_CONCURRENCY = 10
SELECT_RUNS = 20
BODIES_PER_FETCH = 50
COMMAND_TIMEOUT = 60.0
KINDS = ("select", "fetch_flags", "uid_fetch_bodies", "search", "store_seen", "append",
         "store_deleted", "uid_expunge")
#: ``--sessions``: mailboxes (patients / Dovecot users), messages per mailbox by default, bodies
#: per UID FETCH, and the steps of one cycle ("connect" is TCP + TLS + greeting).
SESSION_USERS = 20
SESSION_MESSAGES = 500
SESSION_BODIES = 5
SESSION_KINDS = ("connect", "login", "select", "fetch_flags", "uid_fetch_bodies", "store_seen",
                 "append", "store_deleted", "uid_expunge", "logout")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


# --- the IMAP client ------------------------------------------------------------------------

#: A literal announcement ``{n}\r\n``, our tagged reply, a continuation request. Outside
#: literals a ``{n}\r\n`` ends a line only as a literal announcement (a quoted string cannot
#: hold CRLF), so literals are skipped without parsing the response.
_SCAN = re.compile(rb"\{(\d+)\}\r\n|^(?:(a\d+) ([^\r\n]*)|(\+)[^\r\n]*)\r\n", re.M)
_EXISTS = re.compile(rb"^\* (\d+) EXISTS\r$", re.M)
_APPENDUID = re.compile(rb"\[APPENDUID \d+ (\d+)\]", re.I)
_SEARCH = re.compile(rb"^\* SEARCH([ \d]*)\r$", re.M)
_LITERAL = re.compile(rb"\{(\d+)\}\r\n")


class ImapError(Exception):
    pass


@dataclass
class Reply:
    status: bytes  # the tagged line after the tag: b"OK ...", b"NO ...", b"BAD ..."
    text: bytes  # the untagged lines when asked for (literal bytes included)
    literal_bytes: int


class Imap:
    """One IMAP connection; one command at a time; the least work per reply."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()
        self.seq = 0

    @classmethod
    async def connect(cls, host: str, port: int, ctx: ssl.SSLContext) -> Imap:
        async with asyncio.timeout(COMMAND_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port, ssl=ctx,
                                                           limit=1 << 20)
            conn = cls(reader, writer)
            while b"\r\n" not in conn.buf:
                await conn._fill()
            end = conn.buf.index(b"\r\n") + 2
            greeting = bytes(conn.buf[:end])
            del conn.buf[:end]
        if not greeting.startswith(b"* OK"):
            raise ImapError(f"greeting: {greeting[:200]!r}")
        return conn

    async def _fill(self) -> None:
        data = await self.reader.read(262144)
        if not data:
            raise ConnectionError("connection closed by the server")
        self.buf += data

    async def _scan(self, tag: bytes, keep: bool, continuation: bool) -> Reply | None:
        """Read until ``tag``'s reply (None: a continuation request, when one is awaited)."""
        buf = self.buf
        pos = 0
        literal_bytes = 0
        while True:
            m = _SCAN.search(buf, pos)
            if m is None:
                nl = buf.rfind(b"\n", pos)
                if nl >= 0:
                    pos = nl + 1
                if not keep and pos > (1 << 20):
                    del buf[:pos]
                    pos = 0
                await self._fill()
                continue
            if m.group(1) is not None:
                n = int(m.group(1))
                literal_bytes += n
                end = m.end() + n
                if len(buf) >= end:
                    pos = end
                    continue
                if keep:
                    while len(buf) < end:
                        await self._fill()
                    pos = end
                    continue
                # not kept: drop what came of the literal, then read past its end
                remaining = end - len(buf)
                del buf[:]
                while remaining:
                    data = await self.reader.read(262144)
                    if not data:
                        raise ConnectionError("connection closed by the server")
                    if len(data) <= remaining:
                        remaining -= len(data)
                    else:
                        buf += data[remaining:]
                        remaining = 0
                pos = 0
                continue
            if m.group(4) is not None:
                del buf[:m.end()]
                if continuation:
                    return None
                pos = 0
                continue
            if m.group(2) != tag:
                raise ImapError(f"unexpected tagged reply {bytes(m.group(0))[:200]!r}")
            reply = Reply(bytes(m.group(3)), bytes(buf[:m.start()]) if keep else b"",
                          literal_bytes)
            del buf[:m.end()]
            return reply

    async def command(self, line: bytes, *, literal: bytes | None = None,
                      keep: bool = False) -> Reply:
        """Send one command and read its reply; a NO or BAD raises ImapError."""
        self.seq += 1
        tag = b"a%d" % self.seq
        async with asyncio.timeout(COMMAND_TIMEOUT):
            if literal is None:
                self.writer.write(tag + b" " + line + b"\r\n")
            else:
                self.writer.write(tag + b" " + line + b" {%d}\r\n" % len(literal))
                first = await self._scan(tag, False, True)
                if first is not None:
                    raise ImapError(f"{line.split(b' ')[0].decode()}: "
                                    f"{first.status[:200].decode(errors='replace')}")
                self.writer.write(literal + b"\r\n")
            await self.writer.drain()
            reply = await self._scan(tag, keep, False)
        assert reply is not None
        if not reply.status.startswith(b"OK"):
            raise ImapError(f"{line.split(b' ')[0].decode()}: "
                            f"{reply.status[:200].decode(errors='replace')}")
        return reply

    async def login(self, user: str, password: str) -> None:
        await self.command(b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))

    async def logout(self) -> None:
        with contextlib.suppress(Exception):
            await self.command(b"LOGOUT")
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # loopback, the dev certificate
    return ctx


# --- the load (runs in the worker process) --------------------------------------------------


@dataclass
class Spec:
    name: str
    port: int
    pids: list[int]
    messages: int  # in INBOX, welcome included; UIDs 1..messages
    clients: int
    seconds: float
    host: str = "127.0.0.1"
    user: str = INS
    password: str = PASSWORD
    profile: str = ""  # py-spy record of pids[0] during the load, to this file
    py_spy_args: str = ""  # more ``py-spy record`` options
    users: list[str] = field(default_factory=list)  # --sessions: every mailbox's login


@dataclass
class Stats(Tally):
    kinds: tuple[str, ...] = KINDS
    bytes_in_bodies: int = 0

    def total(self, results: list[int | BaseException]) -> int:
        """The sum of the clients' counts; a client that failed is counted as an error."""
        count = 0
        for r in results:
            if isinstance(r, BaseException):
                self.error("connection", r)
            else:
                count += r
        return count

    def figures(self, *, sums: bool = False) -> dict[str, Any]:
        """Latencies (all kinds, then per kind; ``sums``: each kind's total too), errors and
        body bytes."""
        all_lat = [v for values in self.latencies.values() for v in values]
        return {
            "p50_ms": percentile(all_lat, 50), "p99_ms": percentile(all_lat, 99),
            "kinds": {k: {"n": len(v), "p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99),
                          **({"sum_ms": sum(v)} if sums else {})}
                      for k, v in self.latencies.items()},
            "errors": self.errors, "first_errors": self.first_errors,
            "body_mb": self.bytes_in_bodies / 1e6,
        }


@dataclass
class Measured:
    """What :func:`measured` saw of a load phase: the clients' results, the wall time and the
    CPU seconds of the client, the server and the rest of the machine."""
    results: list[int | BaseException]
    wall: float
    cpu: dict[str, float]
    profiler: asyncio.subprocess.Process | None


async def measured(spec: Spec, clients: Callable[[float], list[Awaitable[int]]]) -> Measured:
    """Run ``clients(deadline)`` for ``spec.seconds`` under the profiler if asked for, timing
    the wall and the CPU of each side."""
    machine0 = machine_busy()
    cpu_server0 = server_cpu(spec.pids)
    cpu_client0 = time.process_time()
    spy = await start_profiler(spec)
    t0 = time.perf_counter()
    results = await asyncio.gather(*clients(t0 + spec.seconds), return_exceptions=True)
    wall = time.perf_counter() - t0
    cpu_client = time.process_time() - cpu_client0
    cpu_server = server_cpu(spec.pids) - cpu_server0
    busy = machine_busy() - machine0
    return Measured(list(results), wall, {"client_cpu_s": cpu_client, "server_cpu_s": cpu_server,
                                          "others_cpu_s": busy - cpu_client - cpu_server},
                    spy)


_TICK = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, str, list[str]]]:
    """pid -> (ppid, name, /proc/PID/stat fields after the name)."""
    out: dict[int, tuple[int, str, list[str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        close = stat.rindex(")")
        fields = stat[close + 2:].split()
        out[int(entry)] = (int(fields[1]), stat[stat.index("(") + 1:close], fields)
    return out


def server_processes(pids: list[int]) -> dict[int, tuple[int, str, list[str]]]:
    """The server processes and all their descendants."""
    table = _processes()
    tree = {pid for pid in pids if pid in table}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _n, _f) in table.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    return {pid: table[pid] for pid in tree}


def server_cpu(pids: list[int]) -> float:
    """CPU seconds of the server processes, and of their children already reaped."""
    total = 0
    for pid, (_ppid, _name, f) in server_processes(pids).items():
        total += int(f[11]) + int(f[12])  # utime, stime
        if pid in pids:
            total += int(f[13]) + int(f[14])  # cutime, cstime
    return total / _TICK


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:8]) - values[3] - values[4]) / _TICK  # minus idle and iowait


def server_memory(pids: list[int]) -> dict[str, float]:
    """RSS, PSS and USS (KiB) summed over the server processes, RSS also by name."""
    out: dict[str, float] = {"rss": 0.0, "pss": 0.0, "uss": 0.0, "processes": 0}
    for pid, (_ppid, name, _f) in server_processes(pids).items():
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        kib = {line.split(":")[0]: float(line.split()[1]) for line in rollup.splitlines()[1:]
               if line.endswith(" kB")}
        out["rss"] += kib.get("Rss", 0.0)
        out["pss"] += kib.get("Pss", 0.0)
        out["uss"] += kib.get("Private_Clean", 0.0) + kib.get("Private_Dirty", 0.0)
        out["processes"] += 1
        out[f"rss:{name}"] = out.get(f"rss:{name}", 0.0) + kib.get("Rss", 0.0)
    return out


async def open_session(spec: Spec, ctx: ssl.SSLContext) -> Imap:
    conn = await Imap.connect(spec.host, spec.port, ctx)
    try:
        await conn.login(spec.user, spec.password)
    except BaseException:
        conn.close()
        raise
    return conn


def search_command(i: int) -> bytes:
    kind = i % 3
    if kind == 0:
        return b"SEARCH UNSEEN"
    if kind == 1:
        return b'SEARCH FROM "%s"' % FROM_TERMS[(i // 3) % len(FROM_TERMS)].encode()
    return b'SEARCH SUBJECT "%s"' % SUBJECT_TERMS[(i // 3) % len(SUBJECT_TERMS)].encode()


def literals(text: bytes) -> list[bytes]:
    """The literals of a kept reply, in order."""
    out: list[bytes] = []
    pos = 0
    while (m := _LITERAL.search(text, pos)) is not None:
        out.append(text[m.end():m.end() + int(m.group(1))])
        pos = m.end() + int(m.group(1))
    return out


async def warm_up(spec: Spec, ctx: ssl.SSLContext) -> dict[str, Any]:
    """Touch everything the load uses once, and keep what both servers must agree on:
    the message count, the SEARCH results, the bytes of messages 1..20."""
    conn = await open_session(spec, ctx)
    t0 = time.perf_counter()
    searches: dict[str, int] = {}
    try:
        reply = await conn.command(b"SELECT INBOX", keep=True)
        m = _EXISTS.search(reply.text)
        exists = int(m.group(1)) if m else -1
        first_select = (time.perf_counter() - t0) * 1000
        await conn.command(b"FETCH 1:* (FLAGS UID)")
        for i in range(3 * max(len(FROM_TERMS), len(SUBJECT_TERMS))):
            line = search_command(i)
            if line.decode() not in searches:
                found = _SEARCH.search((await conn.command(line, keep=True)).text)
                searches[line.decode()] = len(found.group(1).split()) if found else -1
        bodies = literals((await conn.command(b"UID FETCH 1:20 BODY.PEEK[]", keep=True)).text)
    finally:
        await conn.logout()
    return {"exists": exists, "first_select_ms": first_select,
            "seconds": time.perf_counter() - t0, "searches": searches,
            "bodies": len(bodies),
            "bodies_sha256": hashlib.sha256(b"".join(bodies)).hexdigest()[:16]}


async def select_latency(spec: Spec, ctx: ssl.SSLContext) -> list[float]:
    conn = await open_session(spec, ctx)
    times: list[float] = []
    try:
        for _ in range(SELECT_RUNS):
            t0 = time.perf_counter()
            await conn.command(b"SELECT INBOX")
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        await conn.logout()
    return times


#: Logins before the idle-memory baseline (see idle_memory).
WARM_UP_LOGINS = 20


async def idle_memory(spec: Spec, ctx: ssl.SSLContext) -> dict[str, Any]:
    # The one-time allocations of logging in are made before the baseline, so that they are
    # not counted per connection: each gateway worker keeps one 19 MiB argon2 work area per
    # hashing thread (policy/passwords.py); 20 logins at once reach every such thread.
    warm = await asyncio.gather(*(open_session(spec, ctx) for _ in range(WARM_UP_LOGINS)),
                                return_exceptions=True)
    await asyncio.gather(*(c.logout() for c in warm if not isinstance(c, BaseException)),
                         return_exceptions=True)
    await asyncio.sleep(1.0)
    before = server_memory(spec.pids)
    conns: list[Imap] = []
    sem = asyncio.Semaphore(LOGIN_CONCURRENCY)

    async def one() -> None:
        async with sem:
            conns.append(await open_session(spec, ctx))

    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*(one() for _ in range(IDLE_CONNECTIONS)),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        opened = time.perf_counter() - t0
        await asyncio.sleep(1.5)
        after = server_memory(spec.pids)
    finally:
        await asyncio.gather(*(c.logout() for c in conns), return_exceptions=True)
    n = len(conns)
    out: dict[str, Any] = {
        "connections": n, "failed": len(failed), "open_seconds": opened,
        "before_kib": before["rss"], "after_kib": after["rss"],
        "rss_per_conn_kib": (after["rss"] - before["rss"]) / n if n else 0.0,
        "pss_per_conn_kib": (after["pss"] - before["pss"]) / n if n else 0.0,
        "uss_per_conn_kib": (after["uss"] - before["uss"]) / n if n else 0.0,
        "processes_before": before["processes"], "processes_after": after["processes"],
        "by_name_kib": {k[4:]: round((after.get(k, 0.0) - before.get(k, 0.0)) / max(n, 1), 1)
                        for k in after if k.startswith("rss:")},
    }
    if failed:
        out["error"] = f"{type(failed[0]).__name__}: {failed[0]}"
    return out


async def login_bench(spec: Spec, ctx: ssl.SSLContext) -> dict[str, Any]:
    login_ms: list[float] = []
    full_ms: list[float] = []

    async def one() -> None:
        t0 = time.perf_counter()
        conn = await Imap.connect(spec.host, spec.port, ctx)
        t1 = time.perf_counter()
        try:
            await conn.login(spec.user, spec.password)
            t2 = time.perf_counter()
            login_ms.append((t2 - t1) * 1000)
            full_ms.append((t2 - t0) * 1000)
        finally:
            await conn.logout()

    t0 = time.perf_counter()
    for _ in range(LOGINS_SEQUENTIAL):
        await one()
    sequential = time.perf_counter() - t0
    seq_login = list(login_ms)
    login_ms.clear()
    full_ms.clear()
    sem = asyncio.Semaphore(LOGIN_CONCURRENCY)

    async def limited() -> None:
        async with sem:
            await one()

    cpu0 = server_cpu(spec.pids)
    t0 = time.perf_counter()
    await asyncio.gather(*(limited() for _ in range(LOGINS_CONCURRENT)))
    wall = time.perf_counter() - t0
    return {
        "sequential_per_s": LOGINS_SEQUENTIAL / sequential,
        "sequential_login_median_ms": statistics.median(seq_login),
        "concurrent_per_s": LOGINS_CONCURRENT / wall,
        "concurrent_login_p50_ms": percentile(login_ms, 50),
        "concurrent_login_p99_ms": percentile(login_ms, 99),
        "server_cpu_per_login_ms": (server_cpu(spec.pids) - cpu0) / LOGINS_CONCURRENT * 1000,
    }


async def client_loop(index: int, conn: Imap, spec: Spec, deadline: float,
                      stats: Stats) -> int:
    """One session's loop until ``deadline``; returns the commands it completed."""
    rng = random.Random(SEED * 1000 + index)
    ops = 0
    appends = 0
    i = index
    lat = stats.latencies

    async def op(kind: str, line: bytes, **kw: Any) -> Reply | None:
        nonlocal ops
        t0 = time.perf_counter()
        try:
            reply = await conn.command(line, **kw)
        except ImapError as exc:
            stats.error(kind, exc)
            return None
        lat[kind].append((time.perf_counter() - t0) * 1000)
        ops += 1
        return reply

    def done() -> bool:
        return time.perf_counter() >= deadline

    try:
        while not done():
            reply = await op("select", b"SELECT INBOX", keep=True)
            if reply is not None and not _EXISTS.search(reply.text):
                stats.error("select", ImapError("no EXISTS in the SELECT reply"))
            if done():
                break
            await op("fetch_flags", b"FETCH 1:* (FLAGS UID)")
            if done():
                break
            uids = sorted(rng.sample(range(1, spec.messages + 1), BODIES_PER_FETCH))
            reply = await op("uid_fetch_bodies",
                             b"UID FETCH %s BODY.PEEK[]" % ",".join(map(str, uids)).encode())
            if reply is not None:
                stats.bytes_in_bodies += reply.literal_bytes
            if done():
                break
            await op("search", search_command(i), keep=True)
            i += 1
            if done():
                break
            seen = ",".join(map(str, sorted(rng.sample(range(1, spec.messages + 1), 3))))
            await op("store_seen", b"UID STORE %s +FLAGS (\\Seen)" % seen.encode())
            if done():
                break
            appends += 1
            message = make_message(rng, appends, EPOCH, tag=f"append{index}.").raw
            reply = await op("append", b"APPEND INBOX (\\Seen)", literal=message)
            if reply is None:
                continue
            m = _APPENDUID.search(reply.status)
            if m is None:
                stats.error("append", ImapError(f"no APPENDUID in {reply.status[:100]!r}"))
                continue
            uid = m.group(1)
            await op("store_deleted", b"UID STORE %s +FLAGS (\\Deleted)" % uid)
            await op("uid_expunge", b"UID EXPUNGE %s" % uid)
    except (OSError, TimeoutError, ImapError) as exc:  # the connection is gone or stuck
        stats.error("connection", exc)
    return ops


async def start_profiler(spec: Spec) -> asyncio.subprocess.Process | None:
    """``py-spy record`` of the server for the measured phase, when asked for."""
    if not spec.profile:
        return None
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(spec.profile).suffix, "raw")
    return await asyncio.create_subprocess_exec(
        str(BIN / "py-spy"), "record", "--pid", str(spec.pids[0]), "--output", spec.profile,
        "--format", fmt, "--duration", str(round(spec.seconds)), *spec.py_spy_args.split(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


async def load(spec: Spec, ctx: ssl.SSLContext) -> dict[str, Any]:
    conns = list(await asyncio.gather(*(open_session(spec, ctx) for _ in range(spec.clients))))
    stats = Stats()
    run = await measured(spec, lambda deadline: [client_loop(i, c, spec, deadline, stats)
                                                 for i, c in enumerate(conns)])
    await asyncio.gather(*(c.logout() for c in conns), return_exceptions=True)
    if run.profiler is not None:
        await run.profiler.wait()
    ops = stats.total(run.results)
    return {"ops": ops, "wall": run.wall, "ops_per_s": ops / run.wall, **stats.figures(),
            **run.cpu}


# --- --sessions: whole sessions, a login per cycle -------------------------------------------


async def sessions_warm_up(spec: Spec, ctx: ssl.SSLContext) -> dict[str, Any]:
    """Every mailbox once (Dovecot builds its index and cache here): its EXISTS, and a digest
    of the bytes of its UIDs 1..SESSION_BODIES, which both servers must agree on."""
    sem = asyncio.Semaphore(LOGIN_CONCURRENCY)
    t0 = time.perf_counter()

    async def one(user: str) -> tuple[int, bytes]:
        async with sem:
            conn = await Imap.connect(spec.host, spec.port, ctx)
            try:
                await conn.login(user, spec.password)
                m = _EXISTS.search((await conn.command(b"SELECT INBOX", keep=True)).text)
                await conn.command(b"FETCH 1:* (FLAGS)")
                reply = await conn.command(b"UID FETCH 1:%d BODY.PEEK[]" % SESSION_BODIES,
                                           keep=True)
            finally:
                await conn.logout()
            return (int(m.group(1)) if m else -1), b"".join(literals(reply.text))

    found = await asyncio.gather(*(one(u) for u in spec.users))
    return {"exists": [n for n, _b in found], "seconds": time.perf_counter() - t0,
            "bodies_sha256": hashlib.sha256(b"".join(b for _n, b in found)).hexdigest()[:16]}


#: The parts of a cycle after connect + TLS, for the CPU cost of each (``step_costs``): a
#: session stops after the first ``n`` of them and logs out.
COST_PARTS = ("login", "select", "fetch_flags", "uid_fetch_bodies", "store_seen",
              "append+store_deleted+uid_expunge")
COST_RUNS = 15  # sequential sessions per prefix


async def one_session(conn: Imap, user: str, turn: int, index: int, spec: Spec,
                      rng: random.Random, stats: Stats, step_kind: list[str],
                      parts: int = len(COST_PARTS)) -> None:
    """LOGIN .. LOGOUT on an open connection (only the first ``parts`` of ``COST_PARTS``,
    then LOGOUT); each step's latency into ``stats``, the step in progress in
    ``step_kind[0]`` (for the error count when one fails)."""
    lat = stats.latencies
    t0 = time.perf_counter()

    async def step(name: str, line: bytes, **kw: Any) -> Reply:
        nonlocal t0
        step_kind[0] = name
        reply = await conn.command(line, **kw)
        now = time.perf_counter()
        lat[name].append((now - t0) * 1000)
        t0 = now
        return reply

    async def body() -> None:
        if parts < 1:
            return
        await step("login", b'LOGIN "%s" "%s"' % (user.encode(), spec.password.encode()))
        if parts < 2:
            return
        reply = await step("select", b"SELECT INBOX", keep=True)
        if not _EXISTS.search(reply.text):
            raise ImapError("no EXISTS in the SELECT reply")
        if parts < 3:
            return
        await step("fetch_flags", b"FETCH 1:* (FLAGS)")
        if parts < 4:
            return
        uids = sorted(rng.sample(range(1, spec.messages + 1), SESSION_BODIES))
        reply = await step("uid_fetch_bodies",
                           b"UID FETCH %s BODY.PEEK[]" % ",".join(map(str, uids)).encode())
        stats.bytes_in_bodies += reply.literal_bytes
        if parts < 5:
            return
        seen = ",".join(map(str, sorted(rng.sample(range(1, spec.messages + 1), 3))))
        await step("store_seen", b"UID STORE %s +FLAGS (\\Seen)" % seen.encode())
        if parts < 6:
            return
        message = make_message(rng, turn, EPOCH, tag=f"session{index}.").raw
        reply = await step("append", b"APPEND INBOX (\\Seen)", literal=message)
        m = _APPENDUID.search(reply.status)
        if m is None:
            raise ImapError(f"no APPENDUID in {reply.status[:100]!r}")
        await step("store_deleted", b"UID STORE %s +FLAGS (\\Deleted)" % m.group(1))
        await step("uid_expunge", b"UID EXPUNGE %s" % m.group(1))

    await body()
    await step("logout", b"LOGOUT")


async def step_costs(spec: Spec, ctx: ssl.SSLContext) -> dict[str, Any]:
    """Server CPU (ms) of each part of a cycle, one session at a time (no queueing): the
    CPU per session of ``COST_RUNS`` sessions that stop after the first n parts, minus that of
    the sessions that stop after n-1 ("connect" = TCP + TLS + greeting + LOGOUT); and the
    median latency of each step in these sessions (the service time without queueing)."""
    rng = random.Random(SEED)
    stats = Stats(SESSION_KINDS)
    per_session: list[float] = []
    turn = 0
    for parts in range(len(COST_PARTS) + 1):
        cpu0 = server_cpu(spec.pids)
        for _ in range(COST_RUNS):
            turn += 1
            t0 = time.perf_counter()
            conn = await Imap.connect(spec.host, spec.port, ctx)
            stats.latencies["connect"].append((time.perf_counter() - t0) * 1000)
            try:
                await one_session(conn, spec.users[turn % len(spec.users)], turn, 0, spec, rng,
                                  stats, ["?"], parts)
            finally:
                conn.close()
        await asyncio.sleep(0.3)  # Dovecot: its exited processes reaped, their CPU counted
        per_session.append((server_cpu(spec.pids) - cpu0) / COST_RUNS * 1000)
    names = ("connect", *COST_PARTS)
    return {"cpu_ms": {name: per_session[i] - (per_session[i - 1] if i else 0.0)
                       for i, name in enumerate(names)} | {"whole": per_session[-1]},
            "alone_p50_ms": {k: percentile(v, 50) for k, v in stats.latencies.items()}}


async def session_loop(index: int, spec: Spec, ctx: ssl.SSLContext, deadline: float,
                       stats: Stats, cycle_ms: list[float]) -> int:
    """One client: whole sessions on the mailboxes in turn until ``deadline`` (the cycle in
    progress then is finished); returns the cycles it completed."""
    rng = random.Random(SEED * 1000 + index)
    cycles = 0
    turn = 0
    while time.perf_counter() < deadline:
        # client i takes mailboxes i, i + clients, ...: two clients rarely share a mailbox
        user = spec.users[(index + turn * spec.clients) % len(spec.users)]
        turn += 1
        step_kind = ["connect"]
        start = time.perf_counter()
        try:
            conn = await Imap.connect(spec.host, spec.port, ctx)
        except (OSError, TimeoutError, ImapError) as exc:
            stats.error("connect", exc)
            continue
        stats.latencies["connect"].append((time.perf_counter() - start) * 1000)
        try:
            await one_session(conn, user, turn, index, spec, rng, stats, step_kind)
        except (OSError, TimeoutError, ImapError) as exc:
            stats.error(step_kind[0], exc)
            continue
        finally:
            conn.close()
        cycle_ms.append((time.perf_counter() - start) * 1000)
        cycles += 1
    return cycles


async def sessions_load(spec: Spec, ctx: ssl.SSLContext) -> dict[str, Any]:
    stats = Stats(SESSION_KINDS)
    cycle_ms: list[float] = []
    run = await measured(spec, lambda deadline: [session_loop(i, spec, ctx, deadline, stats,
                                                              cycle_ms)
                                                 for i in range(spec.clients)])
    if run.profiler is not None:
        await run.profiler.wait()
    cycles = stats.total(run.results)
    return {
        "cycles": cycles, "wall": run.wall, "cycles_per_s": cycles / run.wall,
        "cycle_p50_ms": percentile(cycle_ms, 50), "cycle_p99_ms": percentile(cycle_ms, 99),
        **stats.figures(sums=True), **run.cpu,
    }


async def worker_main(spec: Spec) -> dict[str, Any]:
    """Every phase for one server; a failing phase is reported and the next ones still run
    (except after a failing warm-up: nothing would work)."""
    ctx = client_context()
    out: dict[str, Any] = {"errors": []}
    phases: tuple[tuple[str, Any], ...] = (
        (("warmup", warm_up), ("select_ms", select_latency), ("memory", idle_memory),
         ("login", login_bench), ("load", load)) if not spec.users else
        (("warmup", sessions_warm_up), ("costs", step_costs), ("sessions", sessions_load)))
    for name, phase in phases:
        log(f"  [{spec.name}] {name}...")
        try:
            out[name] = await phase(spec, ctx)
        except Exception as exc:
            out["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            if name == "warmup":
                break
    return out


def run_worker(spec: Spec) -> dict[str, Any]:
    """The load in its own process, so the client and the orchestration never share a
    core's time slices with each other's event loop."""
    proc = subprocess.run([sys.executable, __file__, "--worker"],
                          input=json.dumps(spec.__dict__), capture_output=True, text=True,
                          timeout=spec.seconds + 600)
    sys.stderr.write(proc.stderr)
    try:
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    except (ValueError, IndexError):
        return {"errors": [f"worker exited {proc.returncode}: {proc.stdout[-500:]}"]}


# --- gateway --------------------------------------------------------------------------------


def _cli(prog: str, config: Path | None, *args: str, stdin: str = "") -> None:
    """One of the project's command lines, in this process (a subprocess costs ~0.5 s)."""
    from gateway.admin import main as policy_main
    from gateway.cli import main as gateway_main

    main = gateway_main if prog == "mssante-gateway" else policy_main
    argv = ([] if config is None else ["--config", str(config)]) + list(args)
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        sys.stdin = saved
    if code != 0:
        raise RuntimeError(f"{prog} {' '.join(args)} failed ({code}): {err.getvalue()}")


@dataclass
class GatewayDir(ServerDir):
    imap_port: int = 0


def session_users(n: int) -> list[str]:
    """The logins of ``--sessions``: the benchmark's patient, then valid INS of its own."""
    return [INS] + [make_ins(i) for i in range(1, n)]


LISTENERS = ("smtp", "submission", "submissions", "imap", "imaps", "web")


def init_gateway(base: Path, db: str, listen: dict[str, int]
                 ) -> tuple[Path, str, str | None]:
    """``mssante-gateway init`` in ``base/gw`` on SQLite in that directory or on a schema of
    its own in PostgreSQL, listening only as ``listen`` says (listener: port on 127.0.0.1):
    the directory, the storage URL (set in gateway.toml) and the schema."""
    directory = base / "gw"
    _cli("mssante-gateway", None, "init", "--dir", str(directory), "--domain", SERVICE_DOMAIN)
    schema = None
    url = f"sqlite:///{directory / 'gateway.db'}"
    if db == "postgresql":
        schema = "bench_" + secrets.token_hex(4)
        url = f"{PG_URL}?schema={schema}"
    config = directory / "gateway.toml"
    set_key(config, "storage", "url", url)
    for name in LISTENERS:
        set_key(config, name, "listen", f"127.0.0.1:{listen[name]}" if name in listen else "")
    return directory, url, schema


def make_gateway_dir(base: Path, db: str, users: list[str] | None = None) -> GatewayDir:
    """The gateway directory, the trusted domain and the patients (``users``, default the
    one patient INS), each with the benchmark's password (its own salt, same parameters)."""
    ports = {"imap": free_port(), "imaps": free_port()}
    directory, url, schema = init_gateway(base, db, ports)
    gw = GatewayDir(directory, url, schema, imaps_port=ports["imaps"], imap_port=ports["imap"])
    cfg = gw.config
    set_key(cfg, "limits", "connections_per_ip", str(IDLE_CONNECTIONS + 100))
    _cli("mssante-policy", cfg, "domain", "add", TRUSTED_DOMAIN)
    for n, ins in enumerate(users or [INS]):
        _cli("mssante-policy", cfg, "patient", "add", ins,
             "--name", "Inaya Michel" if n == 0 else f"Patient {n} Bench",
             "--notify-email", f"patient{n}@example.org" if n else "inaya@example.org",
             "--password-stdin", stdin=PASSWORD + "\n")
    return gw


async def _inbox(gw: GatewayDir, ins: str = INS) -> tuple[Any, int, bytes, str]:
    """The store, the patient's INBOX id, the welcome message and the stored password hash."""
    from sqlalchemy import select

    from imap_store.store import schema as t
    from imap_store.store.directory import Store

    store = Store.from_url(gw.url)
    patient = await store.get_patient(ins)
    async with store.read() as conn:
        mailbox = await store.mailbox_id(conn, patient.id, "INBOX")
        row = (await conn.execute(
            select(t.blob.c.data).select_from(t.message.join(t.blob,
                                                             t.message.c.blob_id == t.blob.c.id))
            .where(t.message.c.mailbox_id == mailbox).order_by(t.message.c.uid).limit(1)
        )).first()
    hashed = await store.patient_password_hash(ins)
    assert hashed is not None and hashed[2]
    return store, mailbox, bytes(row[0]) if row else b"", str(hashed[2])


def gateway_welcome(gw: GatewayDir, ins: str = INS) -> tuple[bytes, str]:
    async def run() -> tuple[bytes, str]:
        store, _mailbox, welcome, hashed = await _inbox(gw, ins)
        await store.close()
        return welcome, hashed

    return asyncio.run(run())


def _message_row(mailbox: int, uid: int, modseq: int, m: BenchMessage, fields: Any,
                 blob_id: int) -> dict[str, Any]:
    """The ``message`` row ``deliver`` writes (checked against it on every load)."""
    from imap_store.store import schema as t

    return {
        "mailbox_id": mailbox, "uid": uid, "modseq": modseq,
        "flags": t.FLAG_SEEN if m.seen else 0, "keywords": "", "internal_date": m.date,
        "size": len(m.raw), "blob_id": blob_id, "message_id": fields.message_id,
        "in_reply_to": fields.in_reply_to, "references": fields.references,
        "subject": fields.subject, "from_addr": fields.from_addr,
        "sent_date": fields.sent_date, "thread_id": fields.thread_id,
        "has_attachments": int(fields.has_attachments), "from_name": fields.from_name,
        "meta": fields.meta,
    }


def _normal(value: Any) -> Any:
    from datetime import UTC, datetime

    if isinstance(value, datetime):
        return (value.replace(tzinfo=UTC) if value.tzinfo is None else value).timestamp()
    return value


def load_gateway(gw: GatewayDir, box: list[BenchMessage], ins: str = INS
                 ) -> tuple[float, str]:
    """Write the messages into the INBOX of patient ``ins``, in big transactions.

    The first message goes through ``deliver``; the others are written the same way in
    bulk (one UID/MODSEQ allocation per 2000, executemany for blobs and rows: ~10x faster
    than 10,000 ``deliver`` calls over aiosqlite). The row ``deliver`` wrote is
    compared with the one the bulk path builds; if they differ (``deliver`` changed, or
    the blob store is not the database one) every message goes through ``deliver``."""
    from sqlalchemy import insert, select, update

    from imap_store.store import schema as t
    from imap_store.store.deliver import deliver, derive

    async def run() -> str:
        store, mailbox, _welcome, _hash = await _inbox(gw, ins)
        try:
            fields = [derive(m.raw) for m in box]
            first = box[0]
            async with store.write() as conn:
                stored = (await conn.run_sync(
                    deliver, [mailbox], first.raw, fields[0],
                    flags=t.FLAG_SEEN if first.seen else 0, internal_date=first.date))[0]
            async with store.read() as conn:
                row = (await conn.execute(select(t.message).where(
                    t.message.c.mailbox_id == mailbox, t.message.c.uid == stored.uid))).one()
            actual = {k: _normal(v) for k, v in row._mapping.items() if k not in ("id",)}
            expected = {k: _normal(v) for k, v in _message_row(
                mailbox, stored.uid, stored.modseq, first, fields[0], row.blob_id).items()}
            differs = sorted(k for k in actual.keys() | expected.keys()
                             if actual.get(k) != expected.get(k))
            if type(store.blobs).__name__ != "DatabaseBlobStore":
                differs.append("blob store")
            if differs:
                for start in range(1, len(box), 1000):
                    async with store.write() as conn:
                        for m, f in zip(box[start:start + 1000], fields[start:start + 1000],
                                        strict=True):
                            await conn.run_sync(deliver, [mailbox], m.raw, f,
                                                flags=t.FLAG_SEEN if m.seen else 0,
                                                internal_date=m.date)
                return f"deliver for all (bulk row differs: {', '.join(differs)})"
            for start in range(1, len(box), 2000):
                chunk = box[start:start + 2000]
                async with store.write() as conn:
                    top = (await conn.execute(
                        update(t.mailbox).where(t.mailbox.c.id == mailbox)
                        .values(uidnext=t.mailbox.c.uidnext + len(chunk),
                                highestmodseq=t.mailbox.c.highestmodseq + len(chunk))
                        .returning(t.mailbox.c.uidnext, t.mailbox.c.highestmodseq))).one()
                    uid0, modseq0 = int(top[0]) - len(chunk), int(top[1]) - len(chunk) + 1
                    blob_ids = (await conn.execute(
                        insert(t.blob).returning(t.blob.c.id, sort_by_parameter_order=True),
                        [{"sha256": hashlib.sha256(m.raw).hexdigest(), "size": len(m.raw),
                          "data": m.raw} for m in chunk])).scalars().all()
                    await conn.execute(insert(t.message), [
                        _message_row(mailbox, uid0 + i, modseq0 + i, m, fields[start + i],
                                     int(blob_ids[i])) for i, m in enumerate(chunk)])
            return "1 deliver + bulk rows identical to it"
        finally:
            await store.close()

    t0 = time.perf_counter()
    how = asyncio.run(run())
    return time.perf_counter() - t0, how


class Server:
    def __init__(self, name: str, argv: list[str], log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_port(self, port: int, timeout: float, marker: bytes | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if marker is None or marker in self.log_path.read_bytes():
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                            0.5):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: nothing listens on 127.0.0.1:{port} after "
                           f"{timeout:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout: float = 40.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def run_gateway(gw: GatewayDir, box: list[BenchMessage], accounts: list[Account],
                args: argparse.Namespace) -> dict[str, Any]:
    log(f"gateway: loading {len(box)} messages into {len(accounts)} INBOX(es)...")
    loaded, hows = 0.0, set()
    for account in accounts:
        seconds, how = load_gateway(gw, box, account.login)
        loaded += seconds
        hows.add(how)
    how = "; ".join(sorted(hows))
    log(f"gateway: loaded in {loaded:.1f}s ({how}); starting mssante-gateway serve")
    env = {**os.environ, "MSSANTE_CONFIG": str(gw.config), "PYTHONUNBUFFERED": "1"}
    server = Server("mssante-gateway serve", [str(BIN / "mssante-gateway"), "serve"],
                    gw.directory / "serve.log", env)
    try:
        server.wait_port(gw.imaps_port, 30.0, marker=b"mssante-gateway ready")
        ready = next((line for line in server.log_path.read_text(errors="replace")
                      .splitlines() if "mssante-gateway ready" in line), "")
        result = run_worker(Spec("gateway", gw.imaps_port, [server.proc.pid], len(box) + 1,
                                 args.clients, args.seconds,
                                 profile=str(Path(args.profile).resolve()) if args.profile
                                 else "", py_spy_args=args.py_spy_args,
                                 users=[a.login for a in accounts] if args.sessions else []))
        result["ready_line"] = ready
        result["load_seconds"] = loaded
        result["load_how"] = how
        if result.get("errors"):
            result["log_tail"] = server.log_tail()
        return result
    finally:
        server.stop()


# --- Dovecot --------------------------------------------------------------------------------

DOVECOT_CONF = """\
# bench/imap.py: a throw-away Dovecot on loopback
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
default_process_limit = 1000
default_client_limit = 3000
mail_max_userip_connections = 1000
mail_location = {location}
auth_mechanisms = plain
auth_cache_size = 0
passdb {{
  driver = passwd-file
  args = scheme=ARGON2ID {d}/passwd
}}
userdb {{
  driver = passwd-file
  args = {d}/passwd
}}
namespace inbox {{
  inbox = yes
  separator = /
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {port}
    ssl = yes
  }}
}}
"""


def dovecot_version() -> str:
    try:
        return subprocess.run(["dovecot", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except OSError:
        return ""


@dataclass
class Account:
    """One mailbox of both servers: the login, the gateway's stored argon2id hash, and the
    gateway's welcome message (UID 1)."""

    login: str
    password_hash: str
    welcome: bytes


def _write_maildir(maildir: Path, messages: list[BenchMessage]) -> None:
    """``messages`` as UIDs 1.. of a maildir, with its ``dovecot-uidlist``."""
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    uidlist = [f"3 V{int(EPOCH.timestamp())} N{len(messages) + 1} G{secrets.token_hex(16)}"]
    for uid, m in enumerate(messages, 1):
        data = m.raw.replace(b"\r\n", b"\n")
        base_name = f"{1600000000 + uid}.M{uid:06d}P1.bench,S={len(data)},W={len(m.raw)}"
        path = maildir / "cur" / f"{base_name}:2,{'S' if m.seen else ''}"
        path.write_bytes(data)
        stamp = m.date.timestamp()
        os.utime(path, (stamp, stamp))
        uidlist.append(f"{uid} :{base_name}")
    (maildir / "dovecot-uidlist").write_text("\n".join(uidlist) + "\n")


def make_dovecot_dir(base: Path, cert: Path, key: Path, box: list[BenchMessage],
                     accounts: list[Account], fmt: str, extra: list[str]) -> tuple[Path, int]:
    """Config, passwd-file (one line per account, its gateway hash) and per account a
    maildir with its welcome message then ``box`` (UIDs 1..), written directly, with its
    ``dovecot-uidlist`` so the UIDs match the gateway's."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    d = base / "dovecot"
    d.mkdir(parents=True)
    port = free_port()
    location = f"{fmt}:~/{fmt}" if fmt != "maildir" else "maildir:~/Maildir"
    conf = DOVECOT_CONF.format(d=d, cert=cert, key=key, port=port, location=location)
    (d / "dovecot.conf").write_text(conf + "".join(f"{line.strip()}\n" for line in extra))
    passwd = []
    for account in accounts:
        home = d / "home" / account.login
        passwd.append(f"{account.login}:{{ARGON2ID}}{account.password_hash}:{nobody.pw_uid}:"
                      f"{nobody.pw_gid}::{home}::\n")
        _write_maildir(home / "Maildir", ([BenchMessage(account.welcome, EPOCH, False)]
                                          if account.welcome else []) + box)
    (d / "passwd").write_text("".join(passwd))
    for root, dirs, files in os.walk(d / "home"):
        for name in dirs + files:
            os.chown(os.path.join(root, name), nobody.pw_uid, nobody.pw_gid)
    os.chown(d / "home", nobody.pw_uid, nobody.pw_gid)
    for path in (base, d):
        path.chmod(0o755)
    return d, port


def run_dovecot(base: Path, gw: GatewayDir, box: list[BenchMessage], accounts: list[Account],
                args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("dovecot") is None:
        return {"errors": ["dovecot is not installed (apt-get install -y dovecot-imapd)"]}
    d, port = make_dovecot_dir(base, gw.directory / "certs" / "server.pem",
                               gw.directory / "certs" / "server.key", box, accounts,
                               args.dovecot_format, args.dovecot_setting)
    server = Server("dovecot", ["dovecot", "-F", "-c", str(d / "dovecot.conf")],
                    d / "stdout.log")
    try:
        server.wait_port(port, 30.0)
        if args.dovecot_format != "maildir":  # same UIDs, UIDVALIDITY, flags and dates
            t0 = time.perf_counter()
            for account in accounts:
                subprocess.run(["doveadm", "-c", str(d / "dovecot.conf"), "backup", "-R",
                                "-u", account.login,
                                f"maildir:{d / 'home' / account.login / 'Maildir'}"],
                               check=True, timeout=300, capture_output=True)
            log(f"dovecot: maildir copied to {args.dovecot_format} in "
                f"{time.perf_counter() - t0:.1f}s (doveadm backup)")
        result = run_worker(Spec("dovecot", port, [server.proc.pid],
                                 len(box) + (1 if accounts[0].welcome else 0),
                                 args.clients, args.seconds,
                                 users=[a.login for a in accounts] if args.sessions else []))
        if result.get("errors"):
            result["log_tail"] = "\n".join((d / "dovecot.log").read_text(errors="replace")
                                           .splitlines()[-15:])
        return result
    finally:
        server.stop()


# --- report ---------------------------------------------------------------------------------


def report_problems(name: str, r: dict[str, Any]) -> None:
    """A server's errors and the last lines of its log, when it has them."""
    for err in r.get("errors", []):
        print(f"error: {name}: {err}")
    if r.get("log_tail"):
        print(f"{name} log (last lines):\n{r['log_tail']}")


def loaded(r: dict[str, Any]) -> str:
    return f"store loaded in {r['load_seconds']:.1f}s ({r['load_how']})"


def cpu_shares(ld: dict[str, Any], cycles: int | None = None) -> str:
    """Where the CPU went during a load, in % of one core over its wall time; the server's also
    per cycle when given the number of ``cycles``."""
    def share(key: str) -> str:
        return f"{ld[key] / ld['wall'] * 100:.0f}%"

    server = share("server_cpu_s")
    if cycles is not None:
        server += f" = {ld['server_cpu_s'] / cycles * 1000:.0f}ms per cycle"
    return (f"CPU: server {server}, load client {share('client_cpu_s')}, everything else "
            f"{share('others_cpu_s')} (100% = one core)")


def report_kinds(name: str, ld: dict[str, Any], what: str, cycles: int | None = None) -> None:
    """The latencies of each kind of command (``what``), also its mean per cycle when given the
    number of ``cycles``; then the failures."""
    for kind, k in ld["kinds"].items():
        per_cycle = "" if cycles is None else f"  mean per cycle {k['sum_ms'] / cycles:7.1f}ms"
        print(f"{name}:   {kind:17} n={k['n']:6} p50={k['p50_ms']:8.1f}ms "
              f"p99={k['p99_ms']:8.1f}ms{per_cycle}")
    if ld["errors"]:
        print(f"error: {name}: failed {what} {ld['errors']}: " + " | ".join(ld["first_errors"]))


def report(name: str, r: dict[str, Any]) -> None:
    w = r.get("warmup")
    if w:
        print(f"{name}: INBOX exists={w['exists']} first SELECT {w['first_select_ms']:.0f} ms, "
              f"warm-up {w['seconds']:.1f}s; SEARCH hits "
              + " ".join(f"{k.split(' ', 1)[1]}={v}" for k, v in w["searches"].items()))
    if "ready_line" in r:
        ready = r["ready_line"].strip()
        note = "" if "imap" in ready else " (does not mention imap; imaps answered anyway)"
        print(f"{name}: ready line: {ready!r}{note}; {loaded(r)}")
    if r.get("select_ms"):
        print(f"{name}: SELECT INBOX median={statistics.median(r['select_ms']):.1f}ms "
              f"(of {len(r['select_ms'])}, max {max(r['select_ms']):.1f}ms)")
    m = r.get("memory")
    if m:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(m["by_name_kib"].items())
                          if abs(v) >= 1)
        print(f"{name}: memory per idle authenticated connection: "
              f"RSS {m['rss_per_conn_kib']:.0f} KiB, PSS {m['pss_per_conn_kib']:.0f} KiB, "
              f"USS {m['uss_per_conn_kib']:.0f} KiB "
              f"({m['connections']} connections, server RSS {m['before_kib'] / 1024:.1f} -> "
              f"{m['after_kib'] / 1024:.1f} MiB, processes {m['processes_before']} -> "
              f"{m['processes_after']}; RSS KiB/conn by process: {parts})"
              + (f" [{m['failed']} failed: {m.get('error')}]" if m.get("failed") else ""))
    g = r.get("login")
    if g:
        print(f"{name}: LOGIN {g['concurrent_per_s']:.1f} logins/s ({LOGINS_CONCURRENT} new "
              f"TLS connections, {LOGIN_CONCURRENCY} at a time; LOGIN p50 "
              f"{g['concurrent_login_p50_ms']:.0f}ms p99 {g['concurrent_login_p99_ms']:.0f}ms; "
              f"server CPU {g['server_cpu_per_login_ms']:.0f}ms/login); sequential "
              f"{g['sequential_per_s']:.1f}/s, LOGIN median "
              f"{g['sequential_login_median_ms']:.0f}ms")
    ld = r.get("load")
    if ld:
        print(f"{name}: {ld['ops_per_s']:.0f} ops/s ({ld['ops']} commands in {ld['wall']:.1f}s, "
              f"p50 {ld['p50_ms']:.1f}ms p99 {ld['p99_ms']:.1f}ms, {ld['body_mb']:.0f} MB of "
              f"bodies); {cpu_shares(ld)}")
        report_kinds(name, ld, "commands")


def compare(g: dict[str, Any] | None, d: dict[str, Any] | None) -> None:
    """Same mailbox, same answers? (message count, SEARCH hit counts, bytes of UIDs 1-20)"""
    gw, dw = (g or {}).get("warmup"), (d or {}).get("warmup")
    if not gw or not dw:
        return
    diffs = [f"{key}: gateway {gw[key]} dovecot {dw[key]}"
             for key in ("exists", "bodies", "bodies_sha256") if gw[key] != dw[key]]
    diffs += [f"{cmd}: gateway {gw['searches'].get(cmd)} hits, dovecot {n}"
              for cmd, n in dw["searches"].items() if gw["searches"].get(cmd) != n]
    if diffs:
        print("check: the servers answer differently on the same mailbox: " + "; ".join(diffs))
    else:
        print(f"check: same message count, same bytes for UIDs 1-20, same hit counts for "
              f"{len(dw['searches'])} SEARCHes on both servers")


def tree_state() -> str:
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    dirty = git("status", "--porcelain", "--", "gateway", "imap_store", "policy", "smtp_in")
    return (git("rev-parse", "--short", "HEAD") or "?") + (" + uncommitted changes" if dirty
                                                           else "")


def report_sessions(name: str, r: dict[str, Any]) -> None:
    w = r.get("warmup")
    if w:
        print(f"{name}: {len(w['exists'])} mailboxes, EXISTS {min(w['exists'])}.."
              f"{max(w['exists'])}, warm-up {w['seconds']:.1f}s")
    if "ready_line" in r:
        print(f"{name}: {loaded(r)}")
    c = r.get("costs")
    if c:
        cpu = c["cpu_ms"]
        print(f"{name}: server CPU per step, one session at a time ({COST_RUNS} sessions per "
              f"prefix of the cycle, differences): "
              + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items() if k != "whole")
              + f"; whole cycle {cpu['whole']:.1f} ms")
        print(f"{name}: latency p50 per step, one session at a time (no queueing): "
              + ", ".join(f"{k} {v:.1f}" for k, v in c["alone_p50_ms"].items()) + " ms")
    ld = r.get("sessions")
    if not ld:
        return
    n = max(ld["cycles"], 1)
    print(f"{name}: {ld['cycles_per_s']:.1f} cycles/s ({ld['cycles']} whole sessions in "
          f"{ld['wall']:.1f}s; a cycle p50 {ld['cycle_p50_ms']:.0f}ms p99 "
          f"{ld['cycle_p99_ms']:.0f}ms); {cpu_shares(ld, n)}")
    report_kinds(name, ld, "steps", n)


def compare_sessions(g: dict[str, Any] | None, d: dict[str, Any] | None) -> None:
    """Same mailboxes? (EXISTS of each, bytes of UIDs 1..SESSION_BODIES of each)"""
    gw, dw = (g or {}).get("warmup"), (d or {}).get("warmup")
    if not gw or not dw:
        return
    diffs = [f"{key}: gateway {gw[key]} dovecot {dw[key]}"
             for key in ("exists", "bodies_sha256") if gw[key] != dw[key]]
    if diffs:
        print("check: the servers answer differently on the same mailboxes: " + "; ".join(diffs))
    else:
        print(f"check: same EXISTS in the {len(dw['exists'])} mailboxes and same bytes for their "
              f"UIDs 1-{SESSION_BODIES} on both servers")


def cycles(r: dict[str, Any] | None) -> float:
    return float(r["sessions"]["cycles_per_s"]) if r and r.get("sessions") else 0.0


def ops(r: dict[str, Any] | None) -> float:
    return float(r["load"]["ops_per_s"]) if r and r.get("load") else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=None,
                        help=f"messages per mailbox (default 10,000; {SESSION_MESSAGES} "
                             f"with --sessions)")
    parser.add_argument("--sessions", action="store_true",
                        help=f"whole sessions (connect, TLS, LOGIN ... LOGOUT) on "
                             f"{SESSION_USERS} mailboxes: cycles/s")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--target", choices=("gateway", "dovecot", "both"), default="both")
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--dovecot-format", choices=("maildir", "sdbox", "mdbox"),
                        default="maildir", help="Dovecot's mailbox format (default %(default)s)")
    parser.add_argument("--dovecot-setting", action="append", default=[], metavar="LINE",
                        help="one more dovecot.conf line, e.g. 'maildir_very_dirty_syncs = yes'")
    parser.add_argument("--profile", metavar="FILE",
                        help="py-spy record of gateway serve during the load (.svg, .json, raw)")
    parser.add_argument("--py-spy-args", default="",
                        help='more py-spy record options, as one argument: '
                             '--py-spy-args="--gil --threads"')
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.messages is None:
        args.messages = SESSION_MESSAGES if args.sessions else 10_000
    if args.worker:
        spec = Spec(**json.loads(sys.stdin.read()))
        print(json.dumps(asyncio.run(worker_main(spec))))
        return 0

    started = time.perf_counter()
    print(f"commit {tree_state()}, load average {os.getloadavg()[0]:.2f} at start, "
          f"{os.cpu_count()} CPUs", flush=True)
    base = Path(tempfile.mkdtemp(prefix="imap-bench-"))
    results: dict[str, dict[str, Any] | None] = {"gateway": None, "dovecot": None}
    gw: GatewayDir | None = None
    try:
        t0 = time.perf_counter()
        box = make_mailbox(args.messages, SEED)
        log(f"generated {len(box)} messages ({sum(len(m.raw) for m in box) / 1e6:.0f} MB) in "
            f"{time.perf_counter() - t0:.1f}s")
        users = session_users(SESSION_USERS) if args.sessions else [INS]
        try:
            gw = make_gateway_dir(base, args.db, users)
            accounts = []
            for ins in users:
                welcome, password_hash = gateway_welcome(gw, ins)
                accounts.append(Account(ins, password_hash, welcome))
        except Exception as exc:
            print(f"error: gateway directory: {type(exc).__name__}: {exc}")
            print(f"{'sessions_ratio' if args.sessions else 'ratio'}=0.00 gateway=0/s "
                  f"dovecot=0/s p99=0ms")
            return 1
        if args.target in ("dovecot", "both"):
            log(f"dovecot {dovecot_version()}: writing {len(accounts)} maildir(s), starting it")
            try:
                results["dovecot"] = run_dovecot(base, gw, box, accounts, args)
            except Exception as exc:
                results["dovecot"] = {"errors": [f"{type(exc).__name__}: {exc}"]}
        if args.target in ("gateway", "both"):
            try:
                results["gateway"] = run_gateway(gw, box, accounts, args)
            except Exception as exc:
                results["gateway"] = {"errors": [f"{type(exc).__name__}: {exc}"]}
    finally:
        cleanup(base, gw.pg_schema if gw is not None else None, args.keep)

    print(f"mailbox: {args.messages} messages + welcome"
          + (f" in each of {SESSION_USERS} mailboxes (whole sessions)" if args.sessions else "")
          + f", {args.clients} clients, "
          f"{args.seconds:.0f}s per server, load average {os.getloadavg()[0]:.2f} at the end; "
          f"Dovecot {dovecot_version()} ({args.dovecot_format}); "
          f"argon2id m=19456 KiB t=2 p=1 on both (the same hash); db={args.db}")
    for name in ("dovecot", "gateway"):
        r = results[name]
        if r is not None:
            report_problems(name, r)
            (report_sessions if args.sessions else report)(name, r)
    if args.sessions:
        compare_sessions(results["gateway"], results["dovecot"])
        g, d = cycles(results["gateway"]), cycles(results["dovecot"])
        p99 = float((results["gateway"] or {})["sessions"]["p99_ms"]) if g else 0.0
        cpu = {name: r["sessions"]["server_cpu_s"] / r["sessions"]["cycles"] * 1000
               for name, r in results.items() if r and r.get("sessions", {}).get("cycles")}
        if len(cpu) == 2:  # cycles/s follow the CPU share each server gets; this does not
            print(f"server CPU per cycle under the load: gateway {cpu['gateway']:.0f} ms, "
                  f"dovecot {cpu['dovecot']:.0f} ms (dovecot/gateway "
                  f"{cpu['dovecot'] / cpu['gateway']:.2f})")
        print(f"(total {time.perf_counter() - started:.0f}s)")
        print(f"sessions_ratio={g / d if d else 0.0:.2f} gateway={g:.1f}/s dovecot={d:.1f}/s "
              f"p99={p99:.0f}ms")
        return 0
    compare(results["gateway"], results["dovecot"])
    g, d = ops(results["gateway"]), ops(results["dovecot"])
    p99 = float((results["gateway"] or {})["load"]["p99_ms"]) if g else 0.0
    ratio = g / d if d else 0.0
    print(f"(total {time.perf_counter() - started:.0f}s)")
    print(f"ratio={ratio:.2f} gateway={g:.0f}/s dovecot={d:.0f}/s p99={p99:.0f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
