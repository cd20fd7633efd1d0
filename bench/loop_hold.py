"""How long hostile input of at most 1 MB holds the gateway's event loop (issue 16's target:
no input of ≤ 1 MB holds it more than 50 ms).

A patient's IMAP session sends NOOP after NOOP (a 2 ms pause between them) and records how
long each answer takes while, one input at a time, a professional sends a message of that
shape by SMTP, the patient APPENDs it to Drafts, and FETCHes its ENVELOPE and BODYSTRUCTURE.
Any time the loop is held shows as a slow NOOP answer. The shapes are the densest inputs of
each part of the message analysis (address lists, groups, encoded words, parameters, parts,
header fields) at just under 1 MB.

    .venv/bin/python bench/loop_hold.py [--db sqlite|postgresql] [--only SHAPE] [--keep]

Last line: ``max_wait_ms=… worst=<shape> p50_ms=… target_ms=50``.
"""

from __future__ import annotations

import argparse
import imaplib
import smtplib
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import benchlib

from tests.helpers import noop_probe  # the probe of tests/test_security_event_loop.py

PASSWORD = "bench loop hold"
LIMIT = 1_000_000 - 4096  # room for the fixed fields around the hostile one


def _fill(piece: Callable[[int], bytes], sep: bytes) -> bytes:
    out: list[bytes] = []
    size, i = 0, 0
    while size < LIMIT:
        chunk = piece(i)
        out.append(chunk)
        size += len(chunk) + len(sep)
        i += 1
    return sep.join(out)


def shapes(sender: str, rcpt: str) -> dict[str, bytes]:
    head = f"From: {sender}\r\nTo: {rcpt}\r\nSubject: loop hold\r\n".encode()
    return {
        "addresses": head + b"Cc: " + _fill(lambda i: b"n%d <a%d@b.fr>" % (i, i), b",\r\n ")
        + b"\r\n\r\nx\r\n",
        "groups": head + b"Cc: " + _fill(lambda i: b"g%d: a@b.fr;" % i, b",\r\n ")
        + b"\r\n\r\nx\r\n",
        "encoded-words": head.replace(b"Subject: loop hold", b"Subject: " + _fill(
            lambda i: b"=?utf-8?q?caf=C3=A9?=", b"\r\n ")) + b"\r\nx\r\n",
        "header-fields": head + _fill(lambda i: b"X-H%d: v" % i, b"\r\n") + b"\r\n\r\nx\r\n",
        "parameters": head + b"Content-Type: text/plain; " + _fill(
            lambda i: b"p%d=v" % i, b";\r\n ") + b"\r\n\r\nx\r\n",
        "parts": head + b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + _fill(
            lambda i: b"--b\r\nContent-Type: text/plain\r\n\r\nx", b"\r\n")
        + b"\r\n--b--\r\n",
        "blank-from": f"To: {rcpt}\r\nSubject: x\r\n".encode() + b"From: a"
        + b"\r\n".join([b" " * 900] * 1000) + b"\x01\r\n\r\nx\r\n",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", metavar="SHAPE", help="one shape (e.g. to profile it)")
    args = ap.parse_args()
    imaplib._MAXLINE = 50_000_000  # type: ignore[attr-defined]  # ENVELOPEs of 1 MB headers

    base = Path(tempfile.mkdtemp(prefix="loop-hold-"))
    gw = benchlib.make_gateway_dir(base, args.db, professionals=1, patients=2)
    try:
        imaps = benchlib.free_port()
        benchlib.set_key(gw.config, "imaps", "listen", f"127.0.0.1:{imaps}")
        for ins in gw.patients:
            subprocess.run([str(benchlib.BIN / "mssante-policy"), "--config", str(gw.config),
                            "patient", "set-password", ins, "--password-stdin"],
                           input=PASSWORD + "\n", text=True, check=True, capture_output=True)
        server = benchlib.start_gateway(gw)
        try:
            pro = gw.professionals[0]
            ctx = ssl.create_default_context(cafile=str(gw.certs / "ca.pem"))
            pro_ctx = ssl.create_default_context(cafile=str(gw.certs / "ca.pem"))
            pro_ctx.load_cert_chain(str(pro.cert), str(pro.key))
            target, probe = gw.patients
            worst = ("", 0.0)
            all_waits: list[float] = []
            for name, raw in shapes(pro.address, gw.patient_address(0)).items():
                if args.only and name != args.only:
                    continue
                with noop_probe(imaps, ctx, probe, PASSWORD) as waits:
                    with smtplib.SMTP("127.0.0.1", gw.smtp_port, timeout=120) as smtp:
                        smtp.starttls(context=pro_ctx)
                        try:
                            smtp.sendmail(pro.address, [gw.patient_address(0)], raw)
                            smtp_reply = "250"
                        except smtplib.SMTPResponseException as exc:
                            smtp_reply = str(exc.smtp_code)
                    client = imaplib.IMAP4_SSL("127.0.0.1", imaps, ssl_context=ctx, timeout=120)
                    try:
                        client.login(target, PASSWORD)
                        append = client.append("Drafts", None, None, raw)[0]
                        client.select("Drafts")
                        fetch = client.fetch("*", "(ENVELOPE BODYSTRUCTURE)")[0]
                    finally:
                        client.logout()
                hold = max(waits)
                all_waits += waits
                print(f"{name:14s} {len(raw):8d} B  smtp={smtp_reply} append={append} "
                      f"fetch={fetch}  max_wait={hold * 1000:6.1f} ms  "
                      f"p50={benchlib.percentile(waits, 50) * 1000:5.1f} ms  n={len(waits)}")
                if hold > worst[1]:
                    worst = (name, hold)
        finally:
            server.stop()
        print(f"max_wait_ms={worst[1] * 1000:.1f} worst={worst[0]} "
              f"p50_ms={benchlib.percentile(all_waits, 50) * 1000:.1f} target_ms=50")
    finally:
        benchlib.cleanup(base, gw.pg_schema, args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
