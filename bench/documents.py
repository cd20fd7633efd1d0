"""Keeping an attachment as a health document against downloading it, and the medical profile's
PDF (issue 12).

    .venv/bin/python bench/documents.py [--clients 20] [--seconds 10] [--size 4900000]
        [--db sqlite|postgresql] [--entries 50]

* Gateway: ``mssante-gateway init`` in a temporary directory, ``--clients`` patients with a
  password and a phone, each with one message in INBOX carrying a PDF of ``--size`` bytes
  (a real PDF padded with a comment: pypdf opens it), written through the store's own
  ``deliver``; then ``mssante-gateway serve`` with only ``[web]`` on a free port and
  ``[documents] quota_bytes`` large enough for the run.
* Load: ``--clients`` threads, one patient each, log in over HTTPS (password, code by SMS
  read from the dev outbox, code), then, all at once, for ``--seconds`` each phase:
  1. download: ``GET .../pieces-jointes/0`` (the 5 MB body read to the end);
  2. add: first the form (``GET .../pieces-jointes/0/documents``, all clients at once, timed
     apart: it reads the message, decodes the attachment and checks its content, pypdf
     included, and keeps the verdict by the body's SHA-256), then ``POST`` the form (name,
     date, category, visibility) in a loop: the patient's message looked up, the verdict
     reused, the document row written in the group writer pointing at the same blob; the
     303 is the end of the request.
  Every reply must be the expected status (and the download the attachment's size); anything
  else is counted as an error.
* Profile: the PDF summary of ``--entries`` entries generated in this process (``--repeat``
  times), the way the reply form does.

Lines: ``download: ...``, ``add: ...``, then
``ratio=<add p50 / download p50> p99_add=<ms>ms p99_download=<ms>ms profile_pdf_p50=<ms>ms
profile_pdf_max=<ms>ms``. Targets (issue): ratio <= 2, add p99 < 300 ms at 20 clients, the
50-entry PDF < 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import io
import os
import re
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "bench"), str(ROOT)):
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

from benchlib import _cli, free_port, make_ins, set_key  # noqa: E402

BIN = Path(sys.executable).parent
PASSWORD = "mot de passe patient"
PG_URL = os.environ.get("MSSANTE_TEST_PG", "postgresql://postgres@127.0.0.1/test")


def log(text: str) -> None:
    print(text, flush=True)


def padded_pdf(size: int) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.set_font("Helvetica", size=12)
    pdf.cell(0, 10, "Compte rendu d'imagerie")
    data = bytes(pdf.output())
    head, sep, tail = data.rpartition(b"startxref")
    pad = max(0, size - len(data) - 2)
    return head + b"%" + b"x" * pad + b"\n" + sep + tail


def message(ins: str, pdf: bytes) -> bytes:
    msg = EmailMessage()
    msg["From"] = "Docteur Dupond <paul.dupond@ch-exemple.mssante.fr>"
    msg["To"] = f"{ins}@patient.mssante.fr"
    msg["Subject"] = "Votre compte rendu d'IRM"
    msg["Date"] = format_datetime(datetime.now().astimezone())
    msg["Message-ID"] = make_msgid(domain="ch-exemple.mssante.fr")
    msg.set_content("Bonjour, voici le compte rendu de votre IRM.")
    msg.add_attachment(pdf, maintype="application", subtype="pdf", filename="IRM_genou.pdf")
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def load(url: str, patients: list[str], pdf: bytes) -> None:
    from imap_store.mime import parse_message
    from imap_store.store.deliver import MailboxName, deliver
    from imap_store.store.directory import Store
    from imap_store.store.writer import GroupWriter

    async def run() -> None:
        store = Store.from_url(url)
        writer = GroupWriter(store)
        writer.start()
        try:
            for ins in patients:
                patient = await store.get_patient(ins)
                raw = message(ins, pdf)
                info = parse_message(raw)
                await writer.submit_sync(
                    lambda conn, pid=patient.id, raw=raw, info=info: deliver(
                        conn, [MailboxName(pid, "INBOX")], raw, info, flags=0),
                    size=len(raw))
        finally:
            await writer.close()
            await store.close()

    asyncio.run(run())


class Client:
    """One patient's browser: a keep-alive HTTPS connection and its cookies."""

    def __init__(self, port: int, ca: Path) -> None:
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.port = port
        self.conn = http.client.HTTPSConnection("localhost", port, context=self.ctx,
                                                timeout=60)
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, fields: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], bytes]:
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        body = None
        if fields is not None:
            body = urlencode(fields).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        for name, value in resp.getheaders():
            if name.lower() == "set-cookie":
                key, _, rest = value.partition("=")
                val = rest.split(";", 1)[0]
                if 'expires=Thu, 01 Jan 1970' in value or val in ('""', ""):
                    self.cookies.pop(key, None)
                else:
                    self.cookies[key] = val
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data

    @staticmethod
    def csrf(page: bytes) -> str:
        match = re.search(rb'name="csrf" value="([^"]+)"', page)
        assert match, page[:500]
        return match.group(1).decode()


def login(client: Client, ins: str, outbox: Path, lock: threading.Lock) -> None:
    _s, _h, page = client.request("GET", "/connexion")
    status, headers, _ = client.request("POST", "/connexion", {
        "csrf": client.csrf(page), "identifiant": ins, "mot_de_passe": PASSWORD})
    assert status == 303, status
    _s, _h, page = client.request("GET", "/connexion/code")
    with lock:  # the outbox is shared: one code asked and read at a time
        status, _h, _ = client.request("POST", "/connexion/code", {
            "csrf": client.csrf(page), "canal": "sms"})
        assert status == 303, status
        code = re.findall(r"code de connexion est (\d{6})", outbox.read_text("utf-8"))[-1]
    _s, _h, page = client.request("GET", "/connexion/code/saisie")
    status, headers, _ = client.request("POST", "/connexion/code/saisie", {
        "csrf": client.csrf(page), "code": code})
    assert status == 303 and headers["location"] == "/messagerie", status


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--size", type=int, default=4_900_000)
    parser.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--entries", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--profile", default="",
                        help="py-spy of serve during the add phase, written to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-documents-") as tmp:
        directory = Path(tmp) / "gw"
        init = ["init", "--dir", str(directory), "--domain", "bench.test"]
        schema = None
        if args.db == "postgresql":
            schema = "bench_" + os.urandom(4).hex()
            init += ["--storage-url", f"{PG_URL}?schema={schema}"]
        _cli("mssante-gateway", None, *init)
        cfg = directory / "gateway.toml"
        port = free_port()
        for name in ("smtp", "submission", "submissions", "imap", "imaps"):
            set_key(cfg, name, "listen", "")
        set_key(cfg, "web", "listen", f"127.0.0.1:{port}")
        set_key(cfg, "web", "sms_outbox", "sms-outbox.txt")
        set_key(cfg, "documents", "quota_bytes", str(10**12))
        from gateway.config import load_config

        url = load_config(cfg).storage_url
        patients = [make_ins(i + 1) for i in range(args.clients)]
        for i, ins in enumerate(patients):
            _add_patient(cfg, ins, i)
        pdf = padded_pdf(args.size)
        load(url, patients, pdf)
        log(f"gateway: {args.clients} patients, one {len(pdf):,} byte PDF each ({args.db})")
        env = {**os.environ, "MSSANTE_CONFIG": str(cfg), "PYTHONUNBUFFERED": "1"}
        serve_log = (directory / "serve.log").open("wb")
        proc = subprocess.Popen([str(BIN / "mssante-gateway"), "serve"], env=env,
                                stdout=serve_log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while b"mssante-gateway ready" not in (directory / "serve.log").read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((directory / "serve.log").read_text(errors="replace"))
                time.sleep(0.1)
            result = run_load(args, port, directory, patients, len(pdf), proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
            serve_log.close()
            if schema is not None:
                _drop_schema(schema)
    profile = profile_times(args.entries, args.repeat)
    down, add = result["download"], result["add"]
    for name, times, errors in (("download", down, result["download_errors"]),
                                ("add", add, result["add_errors"])):
        log(f"{name}: {len(times)} requests in {args.seconds:.0f}s at {args.clients} clients "
            f"({len(times) / args.seconds:.1f}/s), p50={statistics.median(times) * 1000:.0f}ms "
            f"p99={percentile(times, 99) * 1000:.0f}ms max={max(times) * 1000:.0f}ms "
            f"errors={errors}")
    first = result["form_first_view"]
    log(f"form first view (the attachment decoded and checked, pypdf included; then kept by "
        f"its body's SHA-256): {len(first)} at once, p50={statistics.median(first) * 1000:.0f}ms "
        f"max={max(first) * 1000:.0f}ms")
    log(f"profile pdf: {args.entries} entries, {args.repeat} runs, "
        f"p50={statistics.median(profile) * 1000:.1f}ms max={max(profile) * 1000:.1f}ms")
    ratio = statistics.median(add) / statistics.median(down)
    log(f"ratio={ratio:.2f} p99_add={percentile(add, 99) * 1000:.0f}ms "
        f"p99_download={percentile(down, 99) * 1000:.0f}ms "
        f"profile_pdf_p50={statistics.median(profile) * 1000:.1f}ms "
        f"profile_pdf_max={max(profile) * 1000:.1f}ms")
    return 1 if result["download_errors"] or result["add_errors"] else 0


def _add_patient(cfg: Path, ins: str, i: int) -> None:
    """``mssante-policy patient add ... --password-stdin`` in this process."""
    saved = sys.stdin
    sys.stdin = io.StringIO(PASSWORD + "\n")
    try:
        _cli("mssante-policy", cfg, "patient", "add", ins, "--name", f"Patient {i}",
             "--notify-email", f"p{i}@example.org", "--phone", f"+3361234{i:04d}",
             "--password-stdin")
    finally:
        sys.stdin = saved


def _drop_schema(schema: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    async def run() -> None:
        conn = await asyncpg.connect(PG_URL.replace("postgresql://", "postgres://"))
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(run())


def run_load(args: argparse.Namespace, port: int, directory: Path, patients: list[str],
             size: int, pid: int) -> dict[str, object]:
    ca = directory / "certs" / "ca.pem"
    outbox = directory / "sms-outbox.txt"
    lock = threading.Lock()
    clients = [Client(port, ca) for _ in patients]
    paths: list[str] = []
    for client, ins in zip(clients, patients, strict=True):
        login(client, ins, outbox, lock)
        _s, _h, page = client.request("GET", "/messagerie")
        key = re.findall(rb'href="/messagerie/conversations/(\d+)"', page)[0].decode()
        _s, _h, convo = client.request("GET", f"/messagerie/conversations/{key}")
        link = re.search(rb'href="(/messagerie/conversations/\d+/messages/\d+/pieces-jointes/0)'
                         rb'/documents"', convo)
        assert link, convo[:1000]
        paths.append(link.group(1).decode())
    results: dict[str, list[float]] = {"download": [], "add": [], "form_first_view": []}
    errors = {"download": 0, "add": 0}
    guard = threading.Lock()

    def phase(name: str) -> None:
        start = threading.Barrier(len(clients))
        ready = threading.Barrier(len(clients))
        deadline = [0.0]

        def work(client: Client, path: str) -> None:
            csrf = ""
            if name == "add":
                ready.wait()  # the 20 first views of the form at once
                t0 = time.perf_counter()
                _s, _h, form = client.request("GET", path + "/documents")
                with guard:
                    results["form_first_view"].append(time.perf_counter() - t0)
                csrf = client.csrf(form)
            start.wait()
            if not deadline[0]:
                deadline[0] = time.monotonic() + args.seconds
            times = []
            bad = 0
            while time.monotonic() < deadline[0]:
                t0 = time.perf_counter()
                if name == "download":
                    status, _h, body = client.request("GET", path)
                    ok = status == 200 and len(body) == size
                else:
                    status, headers, _b = client.request("POST", path + "/documents", {
                        "csrf": csrf, "nom": "IRM du genou", "date": date.today().isoformat(),
                        "categorie": "RADIO_SC", "visibilite": "N"})
                    ok = status == 303 and headers.get("location", "").endswith("?document=1")
                times.append(time.perf_counter() - t0)
                bad += not ok
            with guard:
                results[name].extend(times)
                errors[name] += bad

        threads = [threading.Thread(target=work, args=(c, p)) for c, p in zip(clients, paths,
                                                                               strict=True)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    phase("download")
    spy = None
    if args.profile:
        spy = subprocess.Popen([str(BIN / "py-spy"), "record", "--format", "raw", "--output",
                                str(Path(args.profile).resolve()), "--pid", str(pid),
                                "--duration", str(int(args.seconds) + 2)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
    phase("add")
    if spy is not None:
        spy.wait(timeout=60)
    return {"download": results["download"], "add": results["add"],
            "form_first_view": results["form_first_view"],
            "download_errors": errors["download"], "add_errors": errors["add"]}


def profile_times(entries: int, repeat: int) -> list[float]:
    from imap_store.store.documents import PROFILE_SECTIONS, ProfileEntry
    from web.profile_pdf import profile_pdf

    sections = list(PROFILE_SECTIONS)
    rows = [ProfileEntry(i, sections[i % len(sections)], f"Information de santé n°{i}",
                         "Précisions : posologie, circonstances, valeurs mesurées " * 2,
                         date(2020, 1 + i % 12, 1 + i % 28), datetime.now())
            for i in range(entries)]
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        profile_pdf("Inaya Michel", rows, datetime.now())
        times.append(time.perf_counter() - t0)
    return times


if __name__ == "__main__":
    sys.exit(main())
