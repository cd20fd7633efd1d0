"""The bare reference of the SMTP benchmarks (SPEC §10): stock aiosmtpd with the gateway's
own TLS settings (``gateway.tls.server_context``: same certificate, key and client CA, client
certificates requested and verified), STARTTLS required before MAIL, the same SIZE limit, and
a handler that accepts every message and stores nothing.

    python bench/smtp_sink.py --port P --cert server.pem --key server.key --ca ca.pem

Prints ``sink ready`` once listening; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiosmtpd.smtp import SMTP

from gateway.tls import server_context
from policy.rules import MAX_INBOUND_SIZE


class DiscardHandler:
    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return "250 2.0.0 OK: discarded"


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--ca", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    tls = server_context(args.cert, args.key, args.ca)
    handler = DiscardHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="sink.bench.test", tls_context=tls,
                     require_starttls=True, data_size_limit=MAX_INBOUND_SIZE,
                     enable_SMTPUTF8=True, loop=loop),
        args.host, args.port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("sink ready", flush=True)
    await stop.wait()
    server.close()
    await server.wait_closed()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
