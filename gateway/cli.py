"""``mssante-gateway``: the service command line (SPEC §7): init, serve, certs, queue."""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.cliutil import EXIT_OK, CliError, common_options, emit, run
from gateway.config import (
    DEFAULT_CONFIG_NAME,
    ConfigError,
    config_path,
    load_config,
    render_default_config,
)
from gateway.pki import PkiError, create_dev_pki, issue_operator_cert, issue_professional_cert
from imap_store.store.db import migrate
from policy.addresses import InvalidIdentity, normalize_address, normalize_domain

PROG = "mssante-gateway"


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(prog=PROG, parents=[common_options(top=True)],
                                     description="Secure health mail gateway service.")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", parents=[common], help="write gateway.toml, a dev PKI and "
                          "an empty database")
    init.add_argument("--dir", type=Path, default=Path("."))
    init.add_argument("--domain", default="mssante.example",
                      help="service domain (system sender, DKIM)")
    init.add_argument("--force", action="store_true", help="overwrite existing files")

    sub.add_parser("serve", parents=[common], help="run all listeners and the queue worker")

    certs = sub.add_parser("certs", parents=[common], help="issue client certificates from "
                           "the dev CA")
    certs_sub = certs.add_subparsers(dest="kind", required=True)
    for kind, what in (("professional", "ADDRESS"), ("operator", "DOMAIN")):
        p = certs_sub.add_parser(kind, parents=[common])
        p.add_argument("subject", metavar=what)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--force", action="store_true")
    queue = sub.add_parser("queue", parents=[common], help="the outbound queue")
    queue_sub = queue.add_subparsers(dest="action", required=True)
    p = queue_sub.add_parser("list", parents=[common])
    p.add_argument("--all", action="store_true", help="include sent, bounced and merged rows")
    p = queue_sub.add_parser("retry", parents=[common], help="make queued items due now")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", type=int)
    target.add_argument("--all", action="store_true")
    queue_sub.add_parser("drop", parents=[common]).add_argument("id", type=int)
    return parser


async def cmd_queue(args: argparse.Namespace) -> int:
    from gateway.cliutil import open_store, table
    from imap_store.store.outbound import drop_item, list_items, retry_items

    config = load_config(config_path(args.config))
    store = await open_store(config)
    try:
        if args.action == "list":
            items = await list_items(store, include_done=args.all)
            emit([i.as_dict() for i in items], args.json, lambda _: table(
                [(i.id, i.kind, i.state, i.recipient, i.attempts,
                  i.next_attempt_at.strftime("%Y-%m-%d %H:%M:%S"), (i.last_error or "")[:60])
                 for i in items],
                ("ID", "KIND", "STATE", "RECIPIENT", "TRIES", "NEXT (UTC)", "LAST ERROR")))
        elif args.action == "retry":
            count = await retry_items(store, None if args.all else args.id)
            emit({"retried": count}, args.json, lambda _: f"{count} item(s) due now")
        else:
            item = await drop_item(store, args.id)
            emit(item.as_dict(), args.json, lambda _: f"dropped queue item {item.id}")
    finally:
        await store.close()
    return EXIT_OK


async def cmd_init(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    directory.mkdir(parents=True, exist_ok=True)
    cfg_path = directory / DEFAULT_CONFIG_NAME
    if cfg_path.exists() and not args.force:
        raise CliError(f"{cfg_path} exists (use --force to overwrite)")
    try:
        domain = normalize_domain(args.domain)
    except InvalidIdentity as exc:
        raise CliError(f"--domain: {exc}", 2) from None
    hostname = socket.gethostname()
    try:
        pki = create_dev_pki(directory / "certs", domain=domain,
                             hostnames=[hostname] if hostname else [], dkim_selector="mssante",
                             force=args.force)
    except PkiError as exc:
        raise CliError(str(exc)) from None
    db_path = directory / "gateway.db"
    if args.force:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    cfg_path.write_text(render_default_config(domain=domain, hostname=hostname or "localhost"),
                        encoding="utf-8")
    config = load_config(cfg_path)
    await migrate(config.storage_url)
    emit({"config": str(cfg_path), "certs": str(pki.ca_cert.parent),
          "database": config.storage_url, "dkim_record": pki.dkim_record},
         args.json, lambda _: f"wrote {cfg_path}, {directory / 'certs'}/ and {db_path}\n"
         f"publish this DKIM record: {pki.dkim_record}")
    return EXIT_OK


async def cmd_certs(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    ca_dir = config.tls.client_ca.parent
    try:
        if args.kind == "professional":
            issued = issue_professional_cert(ca_dir, normalize_address(args.subject), args.out,
                                             force=args.force)
        else:
            issued = issue_operator_cert(ca_dir, normalize_domain(args.subject), args.out,
                                         force=args.force)
    except PkiError as exc:
        raise CliError(str(exc)) from None
    emit({"cert": str(issued.cert), "key": str(issued.key), "ca": str(issued.ca),
          "subject": issued.subject, "fingerprint": issued.fingerprint}, args.json,
         lambda _: f"wrote {issued.cert}, {issued.key}, {issued.ca}")
    return EXIT_OK


async def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.service import serve

    config = load_config(config_path(args.config))
    code: int = await serve(config)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"init": cmd_init, "certs": cmd_certs, "serve": cmd_serve, "queue": cmd_queue}
    return run(PROG, lambda: handlers[args.command](args))


__all__ = ["ConfigError", "main"]

if __name__ == "__main__":
    sys.exit(main())
