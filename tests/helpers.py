"""Test helpers: real SMTP clients with dev certificates, reading a mailbox back."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from pathlib import Path

from sqlalchemy import select

from gateway.config import load_config
from imap_store.store import schema as t
from imap_store.store.directory import Store
from tests.gateway_proc import Gateway

SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> bytes:
    """A message of tests/samples by its number prefix, e.g. ``sample("01")``."""
    return next(SAMPLES.glob(f"{name}-*.eml")).read_bytes()


def tls_context(gw: Gateway, client: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(gw.ca))
    if client is not None:
        folder = gw.directory / "clients" / client
        ctx.load_cert_chain(str(folder / "cert.pem"), str(folder / "key.pem"))
    return ctx


def smtp(gw: Gateway, client: str | None = None, listener: str = "smtp") -> smtplib.SMTP:
    """An smtplib session after STARTTLS (or implicit TLS on ``submissions``)."""
    ctx = tls_context(gw, client)
    if listener == "submissions":
        conn: smtplib.SMTP = smtplib.SMTP_SSL("127.0.0.1", gw.ports[listener], context=ctx,
                                              timeout=30)
        conn.ehlo("client.test")
        return conn
    conn = smtplib.SMTP("127.0.0.1", gw.ports[listener], timeout=30)
    conn.ehlo("client.test")
    conn.starttls(context=ctx)
    conn.ehlo("client.test")
    return conn


def mailbox(gw_dir: Path, ins: str, name: str = "INBOX") -> list[bytes]:
    """The raw messages of a patient's mailbox, in UID order, read from the database."""

    async def read() -> list[bytes]:
        store = Store.from_url(load_config(gw_dir / "gateway.toml").storage_url)
        try:
            async with store.read() as conn:
                rows = await conn.execute(
                    select(t.blob.c.data)
                    .select_from(t.message.join(t.blob, t.blob.c.id == t.message.c.blob_id)
                                 .join(t.mailbox, t.mailbox.c.id == t.message.c.mailbox_id)
                                 .join(t.patient, t.patient.c.id == t.mailbox.c.patient_id))
                    .where(t.patient.c.ins == ins, t.mailbox.c.name == name)
                    .order_by(t.message.c.uid)
                )
                return [bytes(r[0]) for r in rows]
        finally:
            await store.close()

    return asyncio.run(read())


def body_after_received(stored: bytes) -> bytes:
    """Strip our Received: trace field (first header, folded over several lines)."""
    assert stored.startswith(b"Received: ")
    lines = stored.split(b"\r\n")
    i = 1
    while lines[i][:1] in (b" ", b"\t"):
        i += 1
    return b"\r\n".join(lines[i:])
