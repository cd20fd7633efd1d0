"""Shared pieces of the SMTP benchmarks (SPEC §10): a throw-away gateway directory made with
the real command lines, ``mssante-gateway serve`` and the bare aiosmtpd sink as subprocesses,
a small asyncio SMTP client (STARTTLS, client certificate, PIPELINING) and percentiles.

The client is written here on purpose: it does the least work per message (no reply parsing
beyond the code), so the servers, not the load generator, set the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BIN = Path(sys.executable).parent
PG_URL = os.environ.get("MSSANTE_BENCH_PG", "postgresql://postgres@127.0.0.1/test")
PRO_DOMAIN = "medecin.bench.test"
PATIENT_DOMAIN = "patient.mssante.fr"
SERVICE_DOMAIN = "mssante.bench.test"
MiB = 1024 * 1024


# --- gateway directory ------------------------------------------------------------------------


def bench_arguments(doc: str | None, *, workers: bool = False) -> argparse.ArgumentParser:
    """The command line of a bench that starts a gateway: its docstring as the description,
    ``--db`` and, with ``workers``, ``--workers`` ([server] workers)."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    if workers:
        parser.add_argument("--workers", type=int, default=None,
                            help="[server] workers of the gateway (default: the gateway's own, "
                            "one per core)")
    return parser


@dataclass
class Tally:
    """A load run's latencies by kind of request, and its errors by kind with the first five
    in words."""

    kinds: tuple[str, ...]
    latencies: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.latencies = {k: [] for k in self.kinds}

    def error(self, kind: str, problem: str | BaseException) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.first_errors) < 5:
            text = (problem if isinstance(problem, str)
                    else f"{type(problem).__name__}: {problem}")
            self.first_errors.append(f"{kind}: {text}")


@dataclass
class ServerDir:
    """The directory of a gateway a bench made for itself (bench/imap.py, bench/web.py): its
    storage URL, its PostgreSQL schema if any, and its IMAPS port."""

    directory: Path
    url: str
    pg_schema: str | None
    imaps_port: int = 0

    @property
    def config(self) -> Path:
        return self.directory / "gateway.toml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_ins(n: int) -> str:
    """A valid INS (SPEC §2): 13-character NIR, then its key 97 - (NIR mod 97)."""
    from policy.addresses import ins_key

    nir = f"1850575{n % 1_000_000:06d}"
    return f"{nir}{ins_key(nir):02d}"


def _cli(prog: str, config: Path | None, *args: str) -> None:
    """Run one of the project's command lines in this process (one subprocess each would
    cost ~0.5 s of imports); its output is swallowed, a failure stops the benchmark."""
    from gateway.admin import main as policy_main
    from gateway.cli import main as gateway_main

    main = gateway_main if prog == "mssante-gateway" else policy_main
    argv = ([] if config is None else ["--config", str(config)]) + list(args)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"{prog} {' '.join(args)} failed ({code}): {err.getvalue()}")


def set_key(config: Path, section: str, key: str, value: str) -> None:
    """Set ``key = "value"`` (or a bare integer) in ``[section]`` of the written TOML."""
    text = config.read_text(encoding="utf-8")
    literal = value if value.isdigit() else f'"{value}"'
    pattern = rf'(?ms)^(\[{re.escape(section)}\]\n(?:(?!^\[).)*?^{key} = )("[^"\n]*"|\d+)'
    text, n = re.subn(pattern, lambda m: m.group(1) + literal, text, count=1)
    if n == 0:  # key absent: add it (a new section when needed)
        if re.search(rf"(?m)^\[{re.escape(section)}\]$", text):
            text = re.sub(rf"(?m)^(\[{re.escape(section)}\]\n)",
                          lambda m: f"{m.group(1)}{key} = {literal}\n", text, count=1)
        else:
            text += f"\n[{section}]\n{key} = {literal}\n"
    config.write_text(text, encoding="utf-8")


@dataclass
class Professional:
    address: str
    cert: Path
    key: Path


@dataclass
class GatewayDir:
    directory: Path
    storage_url: str
    professionals: list[Professional] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)  # INS
    smtp_port: int = 0
    pg_schema: str | None = None

    @property
    def config(self) -> Path:
        return self.directory / "gateway.toml"

    @property
    def certs(self) -> Path:
        return self.directory / "certs"

    def patient_address(self, i: int) -> str:
        return f"{self.patients[i % len(self.patients)]}@{PATIENT_DOMAIN}"


def pg_url_with_schema() -> tuple[str, str]:
    schema = "bench_" + secrets.token_hex(4)
    return f"{PG_URL}?schema={schema}", schema


async def _pg_exec(sql: str) -> None:
    import asyncpg

    parsed = urlparse(PG_URL)
    conn = await asyncpg.connect(host=parsed.hostname, port=parsed.port or 5432,
                                 user=parsed.username or "postgres",
                                 database=(parsed.path or "/test").lstrip("/"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def drop_pg_schema(schema: str) -> None:
    asyncio.run(_pg_exec(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def cleanup(base: Path, pg_schema: str | None, keep: bool) -> None:
    """Drop the benchmark's PostgreSQL schema and its directory (unless ``--keep``)."""
    if pg_schema:
        try:
            drop_pg_schema(pg_schema)
        except Exception as exc:  # the result line matters more than the clean-up
            print(f"could not drop schema {pg_schema}: {exc}", file=sys.stderr)
    if keep:
        print(f"kept {base}", file=sys.stderr)
    else:
        shutil.rmtree(base, ignore_errors=True)


def make_gateway_dir(base: Path, db: str, professionals: int, patients: int,
                     limits: dict[str, int] | None = None) -> GatewayDir:
    """``mssante-gateway init``, the SMTP intake on a free port (every other listener off),
    one trusted domain, ``professionals`` directory entries with client certificates from the
    dev CA and ``patients`` patients (no passwords: nothing here logs in as a patient)."""
    directory = base / "gw"
    _cli("mssante-gateway", None, "init", "--dir", str(directory), "--domain", SERVICE_DOMAIN)
    schema = None
    if db == "postgresql":
        url, schema = pg_url_with_schema()
    else:
        url = f"sqlite:///{directory / 'gateway.db'}"
    gw = GatewayDir(directory, url, pg_schema=schema)
    cfg = gw.config
    set_key(cfg, "storage", "url", url)
    gw.smtp_port = free_port()
    set_key(cfg, "smtp", "listen", f"127.0.0.1:{gw.smtp_port}")
    for name in ("submission", "submissions", "imap", "imaps", "web"):
        set_key(cfg, name, "listen", "")
    for key, value in (limits or {}).items():
        set_key(cfg, "limits", key, str(value))
    _cli("mssante-policy", cfg, "domain", "add", PRO_DOMAIN)
    for i in range(professionals):
        address = f"dr.bench{i:03d}@{PRO_DOMAIN}"
        _cli("mssante-policy", cfg, "professional", "add", address, "--name",
             f"Dr Bench {i:03d}")
        out = directory / "clients" / address
        _cli("mssante-gateway", cfg, "certs", "professional", address, "--out", str(out))
        gw.professionals.append(Professional(address, out / "cert.pem", out / "key.pem"))
    for i in range(patients):
        ins = make_ins(i + 1)
        _cli("mssante-policy", cfg, "patient", "add", ins, "--name", f"Patient Bench {i:03d}",
             "--notify-email", f"patient{i:03d}@example.org")
        gw.patients.append(ins)
    return gw


# --- server processes ---------------------------------------------------------------------


class ServerProcess:
    """A server subprocess that prints ``ready_marker`` (on stdout or stderr) when listening;
    its output goes to ``log_path``."""

    def __init__(self, argv: list[str], log_path: Path, ready_marker: bytes,
                 env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.ready_marker = ready_marker
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> ServerProcess:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited {self.proc.returncode}:\n"
                                   f"{self.log()[-3000:]}")
            if self.ready_marker in self.log_path.read_bytes():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"{self.argv[0]} did not start:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM (the gateway drains and exits 0), SIGKILL if it does not."""
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=30)
        self.proc = None
        return code


def start_gateway(gw: GatewayDir, *, env: dict[str, str] | None = None) -> ServerProcess:
    """``mssante-gateway serve`` on ``gw``'s config (``env``: extra environment)."""
    argv = [str(BIN / "mssante-gateway"), "--config", str(gw.config), "serve"]
    return ServerProcess(argv, gw.directory / "serve.log", b"mssante-gateway ready",
                         dict(env or {})).start()


def start_sink(gw: GatewayDir, port: int) -> ServerProcess:
    certs = gw.certs
    return ServerProcess(
        [sys.executable, str(Path(__file__).with_name("smtp_sink.py")), "--port", str(port),
         "--cert", str(certs / "server.pem"), "--key", str(certs / "server.key"),
         "--ca", str(certs / "ca.pem")],
        gw.directory / "sink.log", b"sink ready").start()


# --- messages -----------------------------------------------------------------------------

_WORDS = ("patient", "consultation", "résultats", "bilan", "sanguin", "rendez-vous", "suivi",
          "traitement", "ordonnance", "examen", "cardiologie", "tension", "artérielle",
          "normale", "contrôle", "dans", "trois", "mois", "merci", "de", "confirmer", "le",
          "la", "les", "votre", "prochain", "cabinet", "docteur", "analyse", "glycémie")


def _text_lines(target: int, seed: int) -> bytes:
    """French-looking quoted-printable-free 8-bit text of about ``target`` bytes, CRLF lines
    of at most ~72 characters, none starting with a dot."""
    lines: list[str] = []
    size = 0
    i = seed
    while size < target:
        words: list[str] = []
        length = 0
        while length < 66:
            w = _WORDS[(i * 7 + length) % len(_WORDS)]
            i += 1
            words.append(w)
            length += len(w) + 1
        line = " ".join(words).capitalize() + "."
        lines.append(line)
        size += len(line.encode()) + 2
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def headers(sender: str, recipient: str, subject: str, message_id: str,
            extra: str = "") -> bytes:
    return (
        f"From: Dr Bench <{sender}>\r\n"
        f"To: <{recipient}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {formatdate(localtime=True)}\r\n"
        f"Message-ID: <{message_id}>\r\n"
        "MIME-Version: 1.0\r\n"
        "User-Agent: bench/1.0\r\n"
        f"{extra}"
    ).encode()


def text_message(sender: str, recipient: str, size: int, seq: int) -> bytes:
    """A single-part text/plain message of about ``size`` bytes."""
    head = headers(sender, recipient, f"Résultats de votre bilan n°{seq}",
                   f"{seq}.{secrets.token_hex(6)}.bench@{PRO_DOMAIN}",
                   "Content-Type: text/plain; charset=utf-8\r\n"
                   "Content-Transfer-Encoding: 8bit\r\n")
    body = _text_lines(max(size - len(head) - 2, 64), seq)
    return head + b"\r\n" + body


def base64_lines(n_bytes: int) -> bytes:
    """``n_bytes`` of base64 text in 76-character CRLF lines (RFC 2045 §6.8)."""
    import base64

    raw = os.urandom(n_bytes * 3 // 4 // 57 * 57 + 57)
    return base64.encodebytes(raw).replace(b"\n", b"\r\n")[:n_bytes]


def attachment_message(sender: str, recipient: str, size: int, seq: int,
                       attachment: bytes) -> bytes:
    """multipart/mixed: a short text part and a PDF attachment whose base64 body is the
    (shared, pre-built) ``attachment``, cut so that the message is about ``size`` bytes."""
    boundary = f"=_bench_{secrets.token_hex(8)}"
    head = headers(sender, recipient, f"Compte rendu d'imagerie n°{seq}",
                   f"{seq}.{secrets.token_hex(6)}.bench@{PRO_DOMAIN}",
                   f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n')
    text = _text_lines(600, seq)
    parts = (
        b"\r\nThis is a multi-part message in MIME format.\r\n"
        + f"--{boundary}\r\n".encode()
        + b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + text
        + f"--{boundary}\r\n".encode()
        + b'Content-Type: application/pdf; name="compte-rendu.pdf"\r\n'
        + b"Content-Transfer-Encoding: base64\r\n"
        + b'Content-Disposition: attachment; filename="compte-rendu.pdf"\r\n\r\n'
    )
    tail = f"--{boundary}--\r\n".encode()
    room = size - len(head) - len(parts) - len(tail)
    room -= room % 78  # whole 76-character lines
    assert 0 < room <= len(attachment), (room, len(attachment))
    return head + parts + attachment[:room] + tail


# --- client -------------------------------------------------------------------------------


def client_context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


class SmtpError(Exception):
    pass


class SmtpClient:
    """ESMTP over asyncio streams: EHLO, STARTTLS, then transactions with PIPELINING
    (RFC 2920: MAIL, RCPT and DATA in one write, as Postfix does)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int, ctx: ssl.SSLContext,
                      helo: str = "client.bench.test") -> SmtpClient:
        reader, writer = await asyncio.open_connection(host, port, limit=MiB)
        client = cls(reader, writer)
        await client.expect(220)
        await client.command(f"EHLO {helo}", 250)
        await client.command("STARTTLS", 220)
        await writer.start_tls(ctx, server_hostname="localhost")
        await client.command(f"EHLO {helo}", 250)
        return client

    async def reply(self) -> tuple[int, bytes]:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise SmtpError("connection closed")
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"".join(lines)

    async def expect(self, code: int) -> bytes:
        got, text = await self.reply()
        if got != code:
            raise SmtpError(f"expected {code}, got {text!r}")
        return text

    async def command(self, line: str, code: int) -> bytes:
        self.writer.write(line.encode() + b"\r\n")
        return await self.expect(code)

    async def send(self, sender: str, recipients: list[str], data: bytes,
                   pipelining: bool = True, chunk: int = 256 * 1024) -> tuple[int, bytes]:
        """One transaction (MAIL with SIZE=); ``data`` is CRLF text with no line starting
        with a dot. Returns the reply to the end of DATA (or the first refusal)."""
        # SIZE (RFC 1870) as Postfix sends it when the server advertises SIZE.
        cmds = [f"MAIL FROM:<{sender}> SIZE={len(data)}".encode(),
                *(f"RCPT TO:<{r}>".encode() for r in recipients), b"DATA"]
        replies: list[tuple[int, bytes]] = []
        if pipelining:
            self.writer.write(b"\r\n".join(cmds) + b"\r\n")
            for _ in cmds:
                replies.append(await self.reply())
        else:
            for cmd in cmds:
                self.writer.write(cmd + b"\r\n")
                replies.append(await self.reply())
                if replies[-1][0] >= 400:
                    break
        if replies[-1][0] != 354:
            bad = next((r for r in replies if r[0] >= 400), replies[-1])
            if replies[-1][0] < 400 or len(replies) < len(cmds):
                await self.command("RSET", 250)
            return bad
        for i in range(0, len(data), chunk):
            self.writer.write(data[i:i + chunk])
            await self.writer.drain()
        self.writer.write(b".\r\n")
        return await self.reply()

    async def quit(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 10)
        except (SmtpError, OSError, TimeoutError):
            pass
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


def tree_state() -> str:
    """The commit measured, and a digest of uncommitted changes to the product packages
    (figures are only comparable on the same tree)."""
    import hashlib

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    head = f"{head}"
    paths = ("gateway", "smtp_in", "imap_store", "policy")
    diff = git("diff", "HEAD", "--", *paths)
    untracked = git("ls-files", "--others", "--exclude-standard", "--", *paths)
    for name in untracked.splitlines():
        with contextlib.suppress(OSError):
            diff += name + (ROOT / name).read_text(errors="replace")
    state = "clean" if not diff else "dirty:" + hashlib.sha256(diff.encode()).hexdigest()[:10]
    return f"{head} {state}; {os.cpu_count()} cpus, loadavg {load} before the run"


# --- figures ------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``serve`` with ``[server] workers`` > 1 is a supervisor
    and its workers: the figures are theirs together)."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        try:
            todo += [int(c) for c in
                     Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except OSError:
            pass
    return out


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its descendants (all their threads), from
    /proc/PID/stat."""
    user = system = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat", encoding="ascii") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        user += int(fields[11])
        system += int(fields[12])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process and its descendants (summed), in MiB, from /proc."""
    rss = hwm = 0.0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) / 1024
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1]) / 1024
        except OSError:
            if member == pid:
                raise
    return rss, hwm


async def count_stored(url: str, like: str = "%.bench@%") -> tuple[int, list[int]]:
    """Messages stored by the benchmark (their Message-ID) and their sizes."""
    from sqlalchemy import select

    from imap_store.store import schema as t
    from imap_store.store.directory import Store

    store = Store.from_url(url)
    try:
        async with store.read() as conn:
            rows = (await conn.execute(
                select(t.message.c.size).where(t.message.c.message_id.like(like))
            )).all()
    finally:
        await store.close()
    return len(rows), [int(r[0]) for r in rows]
