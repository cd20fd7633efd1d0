"""How soon an idling IMAP session hears of a new message (issue 13's target: IDLE gets
``EXISTS`` within 100 ms of the commit, across ``serve`` processes too).

Two ``serve`` processes on one database (the second a copy of the first's directory on other
ports). A patient's IMAPS session on process A selects INBOX and IDLEs; a professional sends
``--messages`` messages one after another by SMTP through process B (``--same-process``: through
A). For each, the time from the gateway's ``250`` to the end of DATA (sent after the commit) to
the ``* n EXISTS`` line reaching the idler. The gateways poll once an hour
(``[imap] poll_interval = 3600``), so only the change signals can be measured.

    .venv/bin/python bench/imap_wakeup.py [--db sqlite|postgresql] [--messages 200]
                                          [--same-process] [--keep]

Last line: ``p50_ms=… p99_ms=… max_ms=… target_ms=100 mode=<cross-process|same-process>``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchlib import (
    BIN,
    GatewayDir,
    cleanup,
    free_port,
    make_gateway_dir,
    percentile,
    set_key,
    start_gateway,
)

PASSWORD = "bench wake-up"


def second_dir(gw: GatewayDir) -> GatewayDir:
    directory = gw.directory.parent / "gw2"
    shutil.copytree(gw.directory, directory, ignore=shutil.ignore_patterns("*.log", "*.db*"))
    other = GatewayDir(directory, gw.storage_url, gw.professionals, gw.patients,
                       free_port(), None)
    set_key(other.config, "smtp", "listen", f"127.0.0.1:{other.smtp_port}")
    set_key(other.config, "imaps", "listen", f"127.0.0.1:{free_port()}")
    return other


def imaps_port(gw: GatewayDir) -> int:
    match = re.search(r'(?m)^\[imaps\]\nlisten = "127\.0\.0\.1:(\d+)"',
                      gw.config.read_text(encoding="utf-8"))
    assert match
    return int(match[1])


class Idler(threading.Thread):
    """Reads the idling session and records when each EXISTS arrives."""

    def __init__(self, port: int, ctx: ssl.SSLContext, login: str) -> None:
        super().__init__(daemon=True)
        raw = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self._command(b"l", f'LOGIN {login} "{PASSWORD}"'.encode())
        lines = self._command(b"s", b"SELECT INBOX")
        self.exists = next(int(m[1]) for line in lines
                           if (m := re.match(rb"\* (\d+) EXISTS", line)))
        self.sock.sendall(b"i IDLE\r\n")
        assert self.file.readline().startswith(b"+ ")
        self.seen: dict[int, float] = {}
        self.event = threading.Condition()

    def _command(self, tag: bytes, text: bytes) -> list[bytes]:
        self.sock.sendall(tag + b" " + text + b"\r\n")
        lines = [self.file.readline()]
        while not lines[-1].startswith(tag + b" "):
            lines.append(self.file.readline())
        assert lines[-1].startswith(tag + b" OK"), lines
        return lines

    def run(self) -> None:
        for line in self.file:
            match = re.match(rb"\* (\d+) EXISTS", line)
            if match:
                with self.event:
                    self.seen[int(match[1])] = time.perf_counter()
                    self.event.notify_all()

    def wait_for(self, n: int, timeout: float) -> float | None:
        with self.event:
            self.event.wait_for(lambda: any(k >= n for k in self.seen), timeout)
            found = [t for k, t in self.seen.items() if k >= n]
        return min(found) if found else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--same-process", action="store_true")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="imap-wakeup-"))
    gw = make_gateway_dir(base, args.db, professionals=1, patients=1)
    servers = []
    try:
        set_key(gw.config, "imaps", "listen", f"127.0.0.1:{free_port()}")
        text = gw.config.read_text(encoding="utf-8")
        gw.config.write_text(re.sub(r'(?m)^(\[imap\]\nlisten = "[^"]*")',
                                    r"\1\npoll_interval = 3600", text), encoding="utf-8")
        subprocess.run([str(BIN / "mssante-policy"), "--config", str(gw.config), "patient",
                        "set-password", gw.patients[0], "--password-stdin"],
                       input=PASSWORD + "\n", text=True, check=True, capture_output=True)
        other = second_dir(gw)
        servers.append(start_gateway(gw))
        sender = gw
        if not args.same_process:
            servers.append(start_gateway(other))
            sender = other
        ctx = ssl.create_default_context(cafile=str(gw.certs / "ca.pem"))
        pro = gw.professionals[0]
        pro_ctx = ssl.create_default_context(cafile=str(gw.certs / "ca.pem"))
        pro_ctx.load_cert_chain(str(pro.cert), str(pro.key))
        idler = Idler(imaps_port(gw), ctx, gw.patients[0])
        idler.start()
        delays: list[float] = []
        missed = 0
        with smtplib.SMTP("127.0.0.1", sender.smtp_port, timeout=60) as smtp:
            smtp.starttls(context=pro_ctx)
            rcpt = gw.patient_address(0)
            for i in range(args.messages):
                message = (f"From: {pro.address}\r\nTo: {rcpt}\r\nSubject: wake {i}\r\n"
                           f"Message-ID: <wake{i}.bench@test>\r\n\r\nx\r\n").encode()
                smtp.sendmail(pro.address, [rcpt], message)
                accepted = time.perf_counter()
                seen = idler.wait_for(idler.exists + i + 1, 10.0)
                if seen is None:
                    missed += 1
                    continue
                delays.append(max(0.0, seen - accepted))
                time.sleep(0.01)
        ms = [d * 1000 for d in delays]
        mode = "same-process" if args.same_process else "cross-process"
        print(f"messages={args.messages} heard={len(ms)} missed={missed} db={args.db}")
        print(f"p50_ms={percentile(ms, 50):.1f} p99_ms={percentile(ms, 99):.1f} "
              f"max_ms={max(ms):.1f} target_ms=100 mode={mode}")
    finally:
        for server in servers:
            server.stop()
        cleanup(base, gw.pg_schema, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
