"""Logging of ``mssante-gateway serve`` (``[logging] format``, ``level``).

``text``: one ``key=value`` line per record (the format the gateway always had). ``json``: one
JSON object per line with ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the
fields passed with ``extra={...}``, and ``exception`` (the formatted traceback) when there is
one. Logs go to stderr (journald and ``docker logs`` collect it).

Logs carry no credentials and no health data: the rooms log connection ids, counts and
reasons, never addresses of patients, subjects or bodies.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

TEXT_FORMAT = "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"

#: The attributes every ``LogRecord`` has: anything else was passed with ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; values JSON cannot hold are written with ``str()``."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii: one line whatever the message holds (a newline is escaped as \n).
        return json.dumps(entry, default=str, ensure_ascii=True)


def formatter(kind: str) -> logging.Formatter:
    if kind == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


class _LoginDataNotice(logging.Filter):
    """aiosmtpd 1.4 itself sets its deprecated ``Session.login_data`` after every successful
    AUTH and warns about it: a warning at each patient login that nobody can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "login_data is deprecated" not in record.getMessage()


def setup_logging(kind: str = "text", level: str = "info",
                  stream: TextIO | None = None) -> None:
    """Send every log record of the process to ``stream`` (stderr) in ``kind`` format.
    aiosmtpd's own logger (which would log envelope addresses, i.e. INS) is kept to
    warnings. Python's warnings (``warnings.warn``) become records of the ``py.warnings``
    logger, so that in ``json`` every line stays an object."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(kind))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    mail_log = logging.getLogger("mail.log")
    mail_log.setLevel(logging.WARNING)
    if not any(isinstance(f, _LoginDataNotice) for f in mail_log.filters):
        mail_log.addFilter(_LoginDataNotice())
    logging.captureWarnings(True)
    # Neither format shows where a record was made, nor its thread, process or task: skip
    # collecting them (the "Optimization" table of Python's logging HOWTO). Collecting them
    # walked the stack at every record: ~2 % of the CPU of SMTP intake (a line per message).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):  # Python >= 3.12
        logging.logAsyncioTasks = False
