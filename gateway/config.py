"""The one typed configuration object (SPEC §8), built and validated once from TOML.

Unknown keys and bad values are refused at start with the key named. Relative paths are
relative to the configuration file. ``--config``, else ``$MSSANTE_CONFIG``, else
``./gateway.toml``.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policy.addresses import InvalidIdentity, normalize_domain
from policy.throttle import DEFAULT_MAX_DELAY, DEFAULT_PER_IP

DEFAULT_CONFIG_NAME = "gateway.toml"


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the key."""


class ListenError(Exception):
    """A listener could not be opened (port in use, no permission, bad address)."""


@dataclass(frozen=True)
class Listen:
    """``"host:port"``; an empty string turns the listener off."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsConfig:
    cert: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class DomainsConfig:
    patient: str = "patient.mssante.fr"
    service: str = "mssante.example"


@dataclass(frozen=True)
class NotifierConfig:
    relay: Listen | None = None
    sender: str = ""  # [notifier] from
    dkim_selector: str = "mssante"
    dkim_key: Path | None = None
    service_name: str = "Messagerie sécurisée de santé"
    login_url: str = "https://localhost/"


@dataclass(frozen=True)
class OutboundConfig:
    default_relay: Listen | None = None
    routes: Mapping[str, Listen] = field(default_factory=dict)
    cert: Path | None = None  # our operator client certificate for relaying
    key: Path | None = None
    #: Seconds to wait before each new try after a temporary failure; the last one repeats
    #: until ``max_age``. Jitter of +/-10 % is added.
    retry_schedule: tuple[int, ...] = (60, 300, 900, 1800, 3600, 7200, 14400)
    #: Seconds after which an undelivered message bounces (5 days, RFC 5321 §4.5.4.1).
    max_age: int = 5 * 24 * 3600


@dataclass(frozen=True)
class LimitsConfig:
    #: RFC 5321 §4.5.3.1.6: 1000 octets per text line including CRLF.
    smtp_line_length: int = 1000
    #: Total DATA bytes buffered across all SMTP sessions before 452 (memory budget).
    data_in_flight: int = 256 * 1024 * 1024
    #: Failed logins of one account before each further try waits 2^(n - login_failures) s
    #: (at most ``login_max_delay``); forgotten ``login_window`` s after the wait
    #: (policy/throttle.py).
    login_failures: int = 5
    login_window: int = 300
    login_max_delay: int = DEFAULT_MAX_DELAY
    #: Failed logins from one client address in ``login_window`` s before it is slowed.
    login_failures_per_ip: int = DEFAULT_PER_IP
    #: Concurrent connections per client IP, per listener.
    connections_per_ip: int = 50
    #: Idle seconds before a session is closed (IMAP IDLE renews it; RFC 3501 §5.4).
    idle_timeout: int = 1800


@dataclass(frozen=True)
class WebConfig:
    """The patient portal (SPEC §11); ``listen`` None = off."""

    listen: Listen | None = None
    #: Seconds without a request before a portal session ends.
    session_idle: int = 900
    #: Program run as ``PROGRAM NUMBER TEXT`` to send the one-time code by SMS.
    sms_command: str = ""
    #: File the SMS are appended to instead (development).
    sms_outbox: Path | None = None
    #: Days deleted conversations stay in Trash.
    trash_days: int = 30


@dataclass(frozen=True)
class DocumentsConfig:
    """The patients' health documents in the portal (issue 12)."""

    #: Bytes of documents one patient may keep.
    quota_bytes: int = 200_000_000


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics, ``/healthz`` and ``/readyz`` over plain HTTP; ``listen`` None = off."""

    listen: Listen | None = None


#: ``[logging] format``: one line of ``key=value`` text, or one JSON object per line.
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "text"
    level: str = "info"


@dataclass(frozen=True)
class Config:
    path: Path
    storage_url: str
    hostname: str
    smtp: Listen | None
    submission: Listen | None
    submissions: Listen | None
    imap: Listen | None
    imaps: Listen | None
    #: None when the file has no ``[tls]`` keys: enough for the admin commands; ``tls``
    #: refuses then (the listeners and relays need it).
    tls_keys: TlsConfig | None
    domains: DomainsConfig
    notifier: NotifierConfig
    outbound: OutboundConfig
    limits: LimitsConfig
    templates_dir: Path | None
    web: WebConfig = field(default_factory=WebConfig)
    documents: DocumentsConfig = field(default_factory=DocumentsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    #: ``[smtp] bare_newline``: ``normalize`` (bare LF taken as CRLF) or ``reject``.
    smtp_bare_newline: str = "normalize"
    #: ``[imap] poll_interval``: seconds between two looks for changes besides the signals.
    imap_poll_interval: int = 1
    #: ``[server] workers``: processes of ``serve``; 0 = one per core (``gateway/workers.py``).
    workers: int = 0

    @property
    def tls(self) -> TlsConfig:
        if self.tls_keys is None:
            raise ConfigError(f"{self.path}: {_TLS_REQUIRED}")
        return self.tls_keys

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def system_sender(self) -> str:
        return self.notifier.sender or f"ne-pas-repondre@{self.domains.service}"


def config_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get("MSSANTE_CONFIG")
    if env:
        return Path(env)
    return Path(DEFAULT_CONFIG_NAME)


class _Section:
    """Reads one TOML table, remembering which keys were consumed to refuse the rest."""

    def __init__(self, name: str, data: Any, base: Path) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"[{name}] must be a table")
        self.name = name
        self.data: dict[str, Any] = data
        self.base = base
        self.used: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def _get(self, key: str, kind: type, default: Any) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if kind is int and isinstance(value, bool):
            raise ConfigError(f"{self.key(key)}: expected an integer")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.key(key)}: expected {kind.__name__}, got {value!r}")
        return value

    def text(self, key: str, default: str = "") -> str:
        return str(self._get(key, str, default))

    def integer(self, key: str, default: int, minimum: int = 1) -> int:
        value = int(self._get(key, int, default))
        if value < minimum:
            raise ConfigError(f"{self.key(key)}: must be at least {minimum}")
        return value

    def path(self, key: str, default: str = "") -> Path | None:
        value = self.text(key, default)
        if not value:
            return None
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def listen(self, key: str, default: str = "") -> Listen | None:
        return parse_listen(self.text(key, default), self.key(key))

    def table(self, key: str) -> dict[str, Any]:
        self.used.add(key)
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.key(key)} must be a table")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"unknown key {self.key(unknown[0])}")


def parse_listen(value: str, key: str) -> Listen | None:
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    digits = port.isascii() and port.isdigit() and len(port) <= 5
    if not sep or not host or not digits or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected \"host:port\", got {value!r}")
    return Listen(host.strip("[]"), int(port))


_LISTENERS = ("smtp", "submission", "submissions", "imap", "imaps")
_TLS_REQUIRED = "tls.cert, tls.key and tls.client_ca are required (TLS is mandatory)"
_SECTIONS = {"server", "storage", "tls", "domains", "notifier", "outbound", "limits", "documents",
             "templates", "web", "metrics", "logging", *_LISTENERS}


def load_config(path: Path) -> Config:
    """Read and validate ``path``; raise ConfigError naming the offending key."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {path} not found (run 'mssante-gateway init' or pass --config)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc.__class__.__name__}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    return build_config(raw, path.resolve())


def build_config(raw: Mapping[str, Any], path: Path) -> Config:
    base = path.parent
    for name in raw:
        if name not in _SECTIONS:
            raise ConfigError(f"unknown section [{name}]")

    server = _Section("server", raw.get("server"), base)
    hostname = server.text("hostname", "localhost")
    workers = server.integer("workers", Config.workers, minimum=0)
    server.finish()

    storage = _Section("storage", raw.get("storage"), base)
    url = storage.text("url", "")
    if not url:
        raise ConfigError("storage.url: required")
    url = _resolve_sqlite_path(url, base)
    storage.finish()

    listeners: dict[str, Listen | None] = {}
    bare_newline = "normalize"
    poll_interval = Config.imap_poll_interval
    for name in _LISTENERS:
        section = _Section(name, raw.get(name), base)
        listeners[name] = section.listen("listen")
        if name == "smtp":  # how every SMTP listener reads DATA (smtp_in.settings)
            bare_newline = section.text("bare_newline", bare_newline)
            if bare_newline not in ("normalize", "reject"):
                raise ConfigError(f"smtp.bare_newline: expected \"normalize\" or \"reject\", "
                                  f"got {bare_newline!r}")
        if name == "imap":
            poll_interval = section.integer("poll_interval", poll_interval)
        section.finish()

    tls = _Section("tls", raw.get("tls"), base)
    cert, key, ca = tls.path("cert"), tls.path("key"), tls.path("client_ca")
    tls.finish()
    tls_keys = None
    if cert is not None and key is not None and ca is not None:
        tls_keys = TlsConfig(cert=cert, key=key, client_ca=ca)
    elif cert is not None or key is not None or ca is not None:
        raise ConfigError(_TLS_REQUIRED)

    domains = _Section("domains", raw.get("domains"), base)
    try:
        patient_domain = normalize_domain(domains.text("patient", DomainsConfig.patient))
        service_domain = normalize_domain(domains.text("service", DomainsConfig.service))
    except InvalidIdentity as exc:
        raise ConfigError(f"[domains]: {exc}") from None
    domains.finish()

    notifier = _Section("notifier", raw.get("notifier"), base)
    notifier_cfg = NotifierConfig(
        relay=notifier.listen("relay"),
        sender=notifier.text("from", ""),
        dkim_selector=notifier.text("dkim_selector", NotifierConfig.dkim_selector),
        dkim_key=notifier.path("dkim_key"),
        service_name=notifier.text("service_name", NotifierConfig.service_name),
        login_url=notifier.text("login_url", NotifierConfig.login_url),
    )
    notifier.finish()

    outbound = _Section("outbound", raw.get("outbound"), base)
    routes: dict[str, Listen] = {}
    for domain, target in outbound.table("routes").items():
        if not isinstance(target, str):
            raise ConfigError(f"outbound.routes.{domain}: expected \"host:port\"")
        listen = parse_listen(target, f"outbound.routes.{domain}")
        if listen is not None:
            routes[domain.lower()] = listen
    outbound.used.add("retry_schedule")
    schedule = outbound.data.get("retry_schedule", list(OutboundConfig.retry_schedule))
    if (not isinstance(schedule, list) or not schedule
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                       for x in schedule)):
        raise ConfigError("outbound.retry_schedule: expected a non-empty list of seconds > 0")
    outbound_cfg = OutboundConfig(
        default_relay=outbound.listen("default_relay"),
        routes=routes,
        cert=outbound.path("cert"),
        key=outbound.path("key"),
        retry_schedule=tuple(schedule),
        max_age=outbound.integer("max_age", OutboundConfig.max_age),
    )
    outbound.finish()

    limits = _Section("limits", raw.get("limits"), base)
    d = LimitsConfig()
    limits_cfg = LimitsConfig(
        smtp_line_length=limits.integer("smtp_line_length", d.smtp_line_length, minimum=1000),
        data_in_flight=limits.integer("data_in_flight", d.data_in_flight, minimum=1024 * 1024),
        login_failures=limits.integer("login_failures", d.login_failures),
        login_window=limits.integer("login_window", d.login_window),
        login_max_delay=limits.integer("login_max_delay", d.login_max_delay),
        login_failures_per_ip=limits.integer("login_failures_per_ip", d.login_failures_per_ip),
        connections_per_ip=limits.integer("connections_per_ip", d.connections_per_ip),
        idle_timeout=limits.integer("idle_timeout", d.idle_timeout, minimum=60),
    )
    limits.finish()

    templates = _Section("templates", raw.get("templates"), base)
    templates_dir = templates.path("dir")
    templates.finish()
    if templates_dir is not None and not templates_dir.is_dir():
        raise ConfigError(f"templates.dir: {templates_dir} is not a directory")

    web = _Section("web", raw.get("web"), base)
    w = WebConfig()
    web_cfg = WebConfig(
        listen=web.listen("listen"),
        session_idle=web.integer("session_idle", w.session_idle, minimum=60),
        sms_command=web.text("sms_command", ""),
        sms_outbox=web.path("sms_outbox"),
        trash_days=web.integer("trash_days", w.trash_days, minimum=1),
    )
    web.finish()

    documents = _Section("documents", raw.get("documents"), base)
    documents_cfg = DocumentsConfig(quota_bytes=documents.integer(
        "quota_bytes", DocumentsConfig.quota_bytes, minimum=1_000_000))
    documents.finish()

    metrics = _Section("metrics", raw.get("metrics"), base)
    metrics_cfg = MetricsConfig(listen=metrics.listen("listen"))
    metrics.finish()

    logging_ = _Section("logging", raw.get("logging"), base)
    log_format = logging_.text("format", LoggingConfig.format)
    log_level = logging_.text("level", LoggingConfig.level)
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"logging.format: expected one of {', '.join(LOG_FORMATS)}, "
                          f"got {log_format!r}")
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"logging.level: expected one of {', '.join(LOG_LEVELS)}, "
                          f"got {log_level!r}")
    logging_.finish()

    return Config(
        path=path,
        storage_url=url,
        hostname=hostname,
        smtp=listeners["smtp"],
        submission=listeners["submission"],
        submissions=listeners["submissions"],
        imap=listeners["imap"],
        imaps=listeners["imaps"],
        tls_keys=tls_keys,
        domains=DomainsConfig(patient=patient_domain, service=service_domain),
        notifier=notifier_cfg,
        outbound=outbound_cfg,
        limits=limits_cfg,
        templates_dir=templates_dir,
        web=web_cfg,
        documents=documents_cfg,
        metrics=metrics_cfg,
        logging=LoggingConfig(format=log_format, level=log_level),
        smtp_bare_newline=bare_newline,
        imap_poll_interval=poll_interval,
        workers=workers,
    )


def _resolve_sqlite_path(url: str, base: Path) -> str:
    """``sqlite:///relative.db`` is relative to the config file's directory."""
    prefix = "sqlite:///"
    if url.startswith(prefix):
        rest = url[len(prefix):]
        if rest and not rest.startswith("/") and rest != ":memory:":
            return prefix + str(base / rest)
    return url


def render_default_config(*, domain: str, hostname: str,
                          storage_url: str = "sqlite:///gateway.db") -> str:
    """The TOML written by ``mssante-gateway init`` (dev ports of SPEC §4.1 and §5)."""
    url = json.dumps(storage_url)  # a JSON string is a TOML basic string
    return f"""\
# mssante-gateway configuration (see README.md, "Configuration reference").
# Relative paths are relative to this file.

[server]
hostname = "{hostname}"
workers = 0                      # processes serving the listeners; 0 = one per core

[storage]
# sqlite:///PATH (one file, no server) or postgresql://USER@HOST/DB[?schema=NAME]
url = {url}

[smtp]
listen = "127.0.0.1:2525"        # intake from professionals and operators (STARTTLS)

[submission]
listen = "127.0.0.1:5870"        # patients and professionals with a password (STARTTLS)

[submissions]
listen = "127.0.0.1:4650"        # implicit TLS

[imap]
listen = "127.0.0.1:1143"        # STARTTLS

[imaps]
listen = "127.0.0.1:9930"        # implicit TLS

[web]
listen = "127.0.0.1:8443"        # the patient portal (HTTPS); "" = off
session_idle = 900               # seconds without a request before a session ends
sms_command = ""                 # program run as PROGRAM NUMBER TEXT to send the code by SMS
sms_outbox = "sms-outbox.txt"    # development: SMS written to this file instead ("" = none)
trash_days = 30                  # days deleted conversations stay in Trash

[documents]
quota_bytes = 200000000          # bytes of health documents one patient may keep

[tls]
cert = "certs/server.pem"
key = "certs/server.key"
client_ca = "certs/ca.pem"       # trust CA for client certificates and relays

[domains]
patient = "patient.mssante.fr"
service = "{domain}"

[notifier]
relay = ""                       # "host:port" of the relay for notification e-mails
from = "ne-pas-repondre@{domain}"
dkim_selector = "mssante"
dkim_key = "certs/dkim.key"
login_url = "https://{domain}/"

[metrics]
listen = ""                      # "127.0.0.1:9464": Prometheus /metrics, /healthz, /readyz

[logging]
format = "text"                  # "text" (key=value) or "json" (one object per line)
level = "info"

[outbound]
default_relay = ""               # "host:port" for professionals' domains without a route
cert = "certs/server.pem"        # our client certificate presented to relays
key = "certs/server.key"
retry_schedule = {list(OutboundConfig.retry_schedule)}   # seconds between tries
max_age = {OutboundConfig.max_age}                 # bounce after this many seconds

[outbound.routes]
# "medecin.mssante.fr" = "mx.medecin.mssante.fr:25"
"""
