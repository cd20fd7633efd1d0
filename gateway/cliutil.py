"""What both command lines share: config loading, one-line errors, text or JSON output.

Exit codes (SPEC §7): 0 success, 1 refused or not found, 2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from gateway.config import Config, ConfigError, ListenError, config_path, load_config
from gateway.tls import TlsConfigError
from imap_store.store.db import StorageConfigError, StorageError, describe_target, migrate
from imap_store.store.directory import Conflict, NotFound, Store
from policy.addresses import InvalidIdentity
from policy.passwords import WeakPassword

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


def common_options(top: bool = False) -> argparse.ArgumentParser:
    """``--config`` and ``--json``, accepted before or after the sub-command."""
    parser = argparse.ArgumentParser(add_help=False)
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--config", default=default,
                        help="configuration file (default: $MSSANTE_CONFIG, then ./gateway.toml)")
    parser.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                        help="machine-readable output")
    return parser


def fail(prog: str, message: str, code: int) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def actor() -> str:
    try:
        return f"admin:{getpass.getuser()}"
    except (KeyError, OSError):
        return "admin"


def load(args: argparse.Namespace) -> Config:
    return load_config(config_path(getattr(args, "config", None)))


def sqlite_file(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, None for another database."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


async def open_store(config: Config, create: bool = False) -> Store:
    """Apply pending migrations (safe when several processes start at once), then open.

    A SQLite file is created only when ``create`` (``init``, ``serve``, ``restore``): an admin
    command on a mistyped path must not leave an empty database behind and list nothing."""
    path = sqlite_file(config.storage_url)
    if path is not None and not create and not path.exists():
        raise CliError(f"{describe_target(config.storage_url)} does not exist ([storage] url in "
                       f"{config.path}; 'mssante-gateway init' creates it)", EXIT_USAGE)
    await migrate(config.storage_url)
    return Store.from_url(config.storage_url)


def read_password_stdin() -> str:
    line = sys.stdin.readline()
    password = line.rstrip("\r\n")
    if not password:
        raise CliError("--password-stdin: no password on standard input", EXIT_USAGE)
    return password


def emit(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    if as_json:
        print(json.dumps(data, ensure_ascii=False, indent=2, default=str))
    else:
        out = text(data)
        if out:
            print(out)


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells
    )


def run(prog: str, main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run an async command and map known failures to one stderr line and an exit code."""
    try:
        return asyncio.run(main())
    except CliError as exc:
        fail(prog, str(exc), exc.code)
    except (NotFound, Conflict, InvalidIdentity, WeakPassword) as exc:
        fail(prog, str(exc), EXIT_REFUSED)
    except ConfigError as exc:
        fail(prog, f"configuration: {exc}", EXIT_USAGE)
    except StorageConfigError as exc:
        fail(prog, f"storage: {exc}", EXIT_USAGE)
    except StorageError as exc:
        fail(prog, f"storage: {exc}", EXIT_REFUSED)
    except ListenError as exc:
        fail(prog, str(exc), EXIT_REFUSED)
    except TlsConfigError as exc:
        fail(prog, f"tls: {exc}", EXIT_USAGE)
    except SQLAlchemyError as exc:
        fail(prog, f"storage: database unavailable or failing ({exc.__class__.__name__})",
             EXIT_REFUSED)
    except OSError as exc:  # a file or a socket, not the database (that is StorageError)
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        fail(prog, f"{where}{exc.strerror or exc.__class__.__name__}", EXIT_REFUSED)
    except KeyboardInterrupt:
        fail(prog, "interrupted", 130)
