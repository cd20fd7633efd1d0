"""``mssante-gateway``: the service command line (SPEC §7): init, serve, certs, queue."""

from __future__ import annotations

import argparse
import importlib.metadata
import socket
import sqlite3
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from gateway.cliutil import (
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    common_options,
    emit,
    open_store,
    run,
    sqlite_file,
)
from gateway.config import (
    DEFAULT_CONFIG_NAME,
    Config,
    ConfigError,
    build_config,
    config_path,
    load_config,
    parse_listen,
    render_default_config,
)
from gateway.pki import PkiError, create_dev_pki, issue_operator_cert, issue_professional_cert
from imap_store.store.db import async_url, describe_target, migrate
from policy.addresses import InvalidIdentity, normalize_address, normalize_domain

PROG = "mssante-gateway"
DEFAULT_STORAGE_URL = "sqlite:///gateway.db"
#: Pages copied per step of SQLite's online backup (other connections may write in between).
BACKUP_PAGES_PER_STEP = 1024


def version() -> str:
    try:
        return importlib.metadata.version("mssante-gateway")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(prog=PROG, parents=[common_options(top=True)],
                                     description="Secure health mail gateway service.")
    parser.add_argument("--version", action="version", version=f"{PROG} {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", parents=[common], help="write gateway.toml, a dev PKI and "
                          "an empty database")
    init.add_argument("--dir", type=Path, default=Path("."))
    init.add_argument("--domain", default="mssante.example",
                      help="service domain (system sender, DKIM)")
    init.add_argument("--storage-url", default=DEFAULT_STORAGE_URL,
                      help="database: sqlite:///PATH (relative to --dir) or "
                      "postgresql://USER@HOST/DB[?schema=NAME] (default: %(default)s)")
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

    backup = sub.add_parser("backup", parents=[common], help="copy the SQLite database while "
                            "the gateway runs (PostgreSQL: use pg_dump)")
    backup.add_argument("dest", type=Path, metavar="DEST")
    backup.add_argument("--force", action="store_true", help="overwrite DEST")
    restore = sub.add_parser("restore", parents=[common], help="put a backup in place of the "
                             "SQLite database (stop serve first)")
    restore.add_argument("source", type=Path, metavar="BACKUP")
    restore.add_argument("--force", action="store_true",
                         help="replace an existing database")

    demo = sub.add_parser("demo-operator", parents=[common], help="development: a "
                          "professionals' operator that prints the mail relayed to it")
    demo.add_argument("--listen", default="127.0.0.1:2626", help="host:port (%(default)s)")
    demo.add_argument("--cert-dir", type=Path, required=True,
                      help="its certificate (cert.pem, key.pem, ca.pem), from 'certs operator'")
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
    cfg_path = directory / DEFAULT_CONFIG_NAME
    if cfg_path.exists() and not args.force:
        raise CliError(f"{cfg_path} exists (use --force to overwrite)")
    try:
        domain = normalize_domain(args.domain)
    except InvalidIdentity as exc:
        raise CliError(f"--domain: {exc}", EXIT_USAGE) from None
    storage_url: str = args.storage_url
    async_url(storage_url)  # a bad URL is refused before anything is written
    # The URL as the configuration will resolve it (a relative SQLite path is relative to it).
    resolved = render_and_resolve(directory, domain, storage_url)
    db_path = sqlite_file(resolved)
    if db_path is not None:
        directory.mkdir(parents=True, exist_ok=True)
    if args.force and db_path is not None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    await migrate(resolved)  # the database first: nothing is written when it is unreachable
    directory.mkdir(parents=True, exist_ok=True)
    hostname = socket.gethostname()
    try:
        pki = create_dev_pki(directory / "certs", domain=domain,
                             hostnames=[hostname] if hostname else [], dkim_selector="mssante",
                             force=args.force)
    except PkiError as exc:
        raise CliError(str(exc)) from None
    cfg_path.write_text(render_default_config(domain=domain, hostname=hostname or "localhost",
                                              storage_url=storage_url), encoding="utf-8")
    config = load_config(cfg_path)
    emit({"config": str(cfg_path), "certs": str(pki.ca_cert.parent),
          "database": describe_target(config.storage_url), "dkim_record": pki.dkim_record},
         args.json, lambda _: f"wrote {cfg_path} and {directory / 'certs'}/; database: "
         f"{describe_target(config.storage_url)}\npublish this DKIM record: {pki.dkim_record}")
    return EXIT_OK


def render_and_resolve(directory: Path, domain: str, storage_url: str) -> str:
    """The storage URL a configuration in ``directory`` with this URL will use."""
    text = render_default_config(domain=domain, hostname="localhost", storage_url=storage_url)
    return build_config(tomllib.loads(text), (directory / DEFAULT_CONFIG_NAME).resolve()
                        ).storage_url


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


def _serve_config(args: argparse.Namespace) -> Config:
    config = load_config(config_path(args.config))
    # Configuration errors are refused here, in one line, before serve logs anything.
    config.tls  # noqa: B018 - the listeners need [tls]
    async_url(config.storage_url)
    path = sqlite_file(config.storage_url)
    if path is not None and not path.parent.is_dir():
        raise CliError(f"storage.url: directory {path.parent} does not exist", EXIT_USAGE)
    return config


async def cmd_serve(args: argparse.Namespace) -> int:
    from gateway.service import serve

    code: int = await serve(_serve_config(args))
    return code


def serve_command(args: argparse.Namespace) -> int:
    """``serve``: one process, or a supervisor of ``[server] workers`` processes (forked
    outside any event loop: ``gateway/workers.py``)."""
    from gateway.workers import supervise, worker_count

    holder: list[Config] = []

    async def check() -> int:
        holder.append(_serve_config(args))
        return EXIT_OK

    run(PROG, check)
    config = holder[0]
    count = worker_count(config.workers)
    if count == 1:
        return run(PROG, lambda: cmd_serve(args))

    from gateway.service import preflight, serve, serve_ops

    async def migrate_once() -> int:
        preflight(config)
        await migrate(config.storage_url)
        return EXIT_OK

    run(PROG, migrate_once)
    return supervise(config, count,
                     lambda role: run(PROG, lambda: serve(config, role)),
                     lambda runtime, n: run(PROG, lambda: serve_ops(config, runtime, n)))


def _sqlite_of(config_url: str, what: str) -> Path:
    path = sqlite_file(config_url)
    if path is None:
        raise CliError(f"{what} works on SQLite only; for PostgreSQL use pg_dump and "
                       "pg_restore (README, 'Backup')", EXIT_USAGE)
    return path


def _open_backup_source(path: Path) -> sqlite3.Connection:
    """A read-only connection to an existing SQLite file (never creates one)."""
    if not path.is_file():
        raise CliError(f"{path}: no such file", EXIT_USAGE)
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise CliError(f"{path}: not a SQLite database ({exc})") from None
    return conn


def _copy(source: sqlite3.Connection, dest: Path) -> int:
    """SQLite's online backup API into ``dest`` (a new file); returns its page count. The
    copy is checked with ``PRAGMA integrity_check`` and made a rollback-journal file (no
    -wal companion to forget when it is moved)."""
    target = sqlite3.connect(dest)
    try:
        source.backup(target, pages=BACKUP_PAGES_PER_STEP)
        target.execute("PRAGMA journal_mode = DELETE")
        check = target.execute("PRAGMA integrity_check").fetchone()
        if check is None or check[0] != "ok":
            raise CliError(f"{dest}: the copy fails its integrity check ({check})")
        pages = int(target.execute("PRAGMA page_count").fetchone()[0])
    finally:
        target.close()
    return pages


async def cmd_backup(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    path = _sqlite_of(config.storage_url, "backup")
    dest: Path = args.dest
    if dest.is_dir():
        raise CliError(f"{dest} is a directory: give the backup file's name", EXIT_USAGE)
    if dest.exists() and not args.force:
        raise CliError(f"{dest} exists (use --force to overwrite)")
    if not dest.parent.is_dir():
        raise CliError(f"{dest.parent}: no such directory", EXIT_USAGE)
    if dest.resolve() == path.resolve():
        raise CliError("the backup cannot be the database itself", EXIT_USAGE)
    source = _open_backup_source(path)
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        pages = _copy(source, partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        source.close()
    partial.replace(dest)
    size = dest.stat().st_size
    emit({"database": str(path), "backup": str(dest), "bytes": size, "pages": pages},
         args.json, lambda _: f"backed up {path} to {dest} ({size} bytes)")
    return EXIT_OK


async def cmd_restore(args: argparse.Namespace) -> int:
    config = load_config(config_path(args.config))
    path = _sqlite_of(config.storage_url, "restore")
    if args.source.resolve() == path.resolve():
        raise CliError("the backup is the database itself", EXIT_USAGE)
    source = _open_backup_source(args.source)
    try:
        tables = {r[0] for r in source.execute("SELECT name FROM sqlite_master "
                                                "WHERE type = 'table'")}
        if "alembic_version" not in tables or "audit" not in tables:
            raise CliError(f"{args.source}: not a mssante-gateway database")
        if path.exists() and not args.force:
            raise CliError(f"{path} exists (stop serve, then use --force to replace it)")
        if not path.parent.is_dir():
            raise CliError(f"{path.parent}: no such directory", EXIT_USAGE)
        partial = path.with_name(path.name + ".restoring")
        partial.unlink(missing_ok=True)
        try:
            _copy(source, partial)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    finally:
        source.close()
    for suffix in ("-wal", "-shm"):  # the old database's companions would be replayed on it
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    partial.replace(path)
    store = await open_store(config)  # migrates a backup taken by an older version
    try:
        rows, broken = await store.audit_verify()
    finally:
        await store.close()
    record = {"backup": str(args.source), "database": str(path), "audit_rows": rows,
              "audit_ok": broken is None}
    emit(record, args.json, lambda _: f"restored {args.source} to {path}; audit chain "
         + (f"intact ({rows} rows)" if broken is None else f"BROKEN at row {broken[0]}"))
    return EXIT_OK if broken is None else 1


async def cmd_demo_operator(args: argparse.Namespace) -> int:
    """Blocks this (otherwise idle) loop: the SMTP server runs its own loop in a thread and
    the main thread waits for SIGTERM/SIGINT, whose handlers only the main thread may set."""
    from gateway.demo import run_operator

    listen = parse_listen(args.listen, "--listen")
    if listen is None:
        raise CliError("--listen: expected host:port", EXIT_USAGE)
    d: Path = args.cert_dir
    for name in ("cert.pem", "key.pem", "ca.pem"):
        if not (d / name).is_file():
            raise CliError(f"--cert-dir: {d / name} missing (mssante-gateway certs operator "
                           f"DOMAIN --out {d})", EXIT_USAGE)
    return run_operator(listen.host, listen.port, d / "cert.pem", d / "key.pem", d / "ca.pem")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve_command(args)
    handlers = {"init": cmd_init, "certs": cmd_certs, "queue": cmd_queue,
                "backup": cmd_backup, "restore": cmd_restore,
                "demo-operator": cmd_demo_operator}
    return run(PROG, lambda: handlers[args.command](args))


__all__ = ["ConfigError", "main"]

if __name__ == "__main__":
    sys.exit(main())
