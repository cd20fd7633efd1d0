"""SMTP listeners on aiosmtpd (SPEC §4): TLS, who is sending, the rules at MAIL/RCPT/DATA,
the hand-off to the store through group commit.

aiosmtpd parses commands; this subclass replaces what the gateway needs to own: DATA (a
sans-IO reader that drains instead of buffering), AUTH (async, argon2 in a thread, throttled),
the EHLO keywords, enhanced codes on every reply, per-IP connection limits, and errors that
never put exception text on the wire. What it needs of aiosmtpd beyond the documented API is
reached through ``smtp_in/aiosmtpd_adapter.py`` only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import logging
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from aiosmtpd.smtp import MISSING, AuthResult, Envelope, Session, TLSSetupException, syntax

from imap_store.mime import MessageInfo, parse_message_async
from imap_store.store import ops
from imap_store.store.directory import Store
from imap_store.store.fields import utcnow
from imap_store.store.notices import Notices
from imap_store.store.submission import check_patient_message, patient_job
from imap_store.store.writer import GroupWriter, SyncJob
from policy.addresses import domain_of
from policy.authn import Authenticator
from policy.engine import judge_patient_recipient, judge_professional_recipient
from policy.rules import (
    MAX_INBOUND_SIZE,
    Decision,
    Identity,
    ProfessionalFacts,
    Role,
    allow,
    decide_from_header,
    decide_mail_from,
    decide_professional_to_patient,
    decide_relay_denied,
    decide_size,
    decide_unique_fields,
)
from smtp_in import metrics, replies
from smtp_in.aiosmtpd_adapter import AdaptedSMTP
from smtp_in.data import DataReader, DataState, max_line_for
from smtp_in.delivery import (
    Delivery,
    IncomingMessage,
    incoming_from_info,
    unique_field_names,
)
from smtp_in.identity import PeerIdentity, describe_tls, peer_identity
from smtp_in.settings import SmtpSettings

log = logging.getLogger(__name__)

#: RFC 5321 §4.5.3.1.8 asks servers to take at least 100 recipients; we take many more.
MAX_RECIPIENTS = 1000
#: RFC 5321 §4.5.3.2.7: a server should wait at least 5 minutes for the next command.
COMMAND_TIMEOUT = 300
#: Grace period for transactions in flight when the service stops (SIGTERM).
DRAIN_SECONDS = 30.0
#: Replies after which a session gives the event loop to the others (and sends held replies).
YIELD_EVERY = 64
#: How long MAIL may use a cached copy of the trusted-domain list (R10 for operators).
TRUSTED_CACHE_SECONDS = 2.0
#: How long the identity a client certificate names (looked up in the directory by its
#: rfc822Name, checked against a pinned fingerprint) is reused for that certificate's next
#: connections. Suspension (R9) is not part of it: it is read afresh at every transaction's
#: first RCPT, so ``professional suspend``/``reinstate`` act at once; a removed professional or
#: a newly pinned certificate is seen by new connections after at most this long.
CERT_IDENTITY_SECONDS = 5.0
#: Certificates remembered at most (the cache is emptied when full).
CERT_IDENTITY_ENTRIES = 10_000


_date_cache: tuple[int, str] = (0, "")

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
#: ``<dot-atom@dot-atom>`` then the end or blanks before a parameter: what nearly every client
#: sends in MAIL and RCPT. Anything else (quoted local parts, comments, routes, UTF-8) goes to
#: aiosmtpd's full RFC 5322 parser, which gives the same answer for these, at ten times the cost.
_SIMPLE_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*)>"
                          r"(?:[ \t]+(?=[^ \t(])|\Z)")


def _now_rfc5322() -> str:
    """The current time as an RFC 5322 date, formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, formatdate(now, usegmt=True))
    return _date_cache[1]


class DataBudget:
    """Bytes of DATA held in memory by all sessions of the process (SPEC §9)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0

    def reserve(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


@dataclass
class IntakeContext:
    """What every SMTP session of one ``serve`` process shares."""

    settings: SmtpSettings
    store: Store
    writer: GroupWriter
    authenticator: Authenticator
    notices: Notices
    tls: ssl.SSLContext
    budget: DataBudget
    sessions: set[GatewaySMTP] = field(default_factory=set)
    per_ip: collections.Counter[str] = field(default_factory=collections.Counter)
    stopping: bool = False
    #: Wakes the outbound worker up when something was queued.
    queue_wakeup: Callable[[], None] = lambda: None
    _trusted: tuple[float, frozenset[str]] | None = None
    #: SHA-256 of a client certificate -> (expiry, its identity or None, what it names).
    _cert_identities: dict[bytes, tuple[float, Identity | None, PeerIdentity]] = field(
        default_factory=dict)

    def cached_certificate(self, der: bytes) -> tuple[Identity | None, PeerIdentity] | None:
        """The identity found for this certificate less than ``CERT_IDENTITY_SECONDS`` ago."""
        entry = self._cert_identities.get(hashlib.sha256(der).digest())
        if entry is None or entry[0] < time.monotonic():
            return None
        return entry[1], entry[2]

    def remember_certificate(self, der: bytes, identity: Identity | None,
                             peer: PeerIdentity) -> None:
        if len(self._cert_identities) >= CERT_IDENTITY_ENTRIES:
            self._cert_identities.clear()
        self._cert_identities[hashlib.sha256(der).digest()] = (
            time.monotonic() + CERT_IDENTITY_SECONDS, identity, peer)

    async def trusted_domains(self) -> frozenset[str]:
        """The whitelist, re-read at most every ``TRUSTED_CACHE_SECONDS``."""
        now = time.monotonic()
        if self._trusted is None or now - self._trusted[0] > TRUSTED_CACHE_SECONDS:
            names = await self.store.run_read(ops.trusted_domains)
            self._trusted = (now, frozenset(names))
        return self._trusted[1]


class GatewaySMTP(AdaptedSMTP):
    # Our DataReader enforces the line limit (settings.line_length); the stream buffer may hold
    # more so that DATA is read in large chunks (memory stays bounded by this per connection).
    line_length_limit = 64 * 1024

    def __init__(self, ctx: IntakeContext, listener: str, implicit_tls: bool) -> None:
        self.ctx = ctx
        self.listener = listener
        self.implicit_tls = implicit_tls
        self.conn_id = secrets.token_hex(4)
        self.identity: Identity | None = None
        self.busy = False  # inside a DATA transaction
        #: Accepted recipients of the transaction, (address, patient id, INS), keyed by
        #: mailbox (patient id, or the address a patient writes to) so each gets one copy.
        self.accepted: dict[str | int, tuple[str, int, str]] = {}
        self._greeted = False
        self._in_ehlo = False
        self._peer_ip = ""
        self._reserved = 0  # DATA budget held for the declared SIZE (RFC 1870)
        self._refused_early = False  # turned away at connect (limits, shutdown)
        #: A verified client certificate that names no directory professional and no operator
        #: (SPEC §4.2): authenticated but not allowed; its RCPTs are refused (R1, relay).
        self.unlisted: PeerIdentity | None = None
        self._cert_read = False  # the certificate was looked at (once per session)
        #: The sending professional's directory facts, read at the transaction's first RCPT.
        self.sender_facts: ProfessionalFacts | None = None
        #: Accepted RCPT decisions not yet audited: written with the delivery, in its
        #: transaction, or on their own when the transaction ends without one.
        self.pending_audit: list[ops.AuditEntry] = []
        #: Replies held back while the client's next pipelined command is already here
        #: (RFC 2920 §3.1): sent together, in one TLS record, with the next reply.
        self._held: list[bytes] = []
        self._may_hold = False
        self._replies = 0  # to give other sessions a turn during long pipelined groups
        super().__init__(
            Handler(),
            data_size_limit=None,  # SIZE is ours (R7), advertised in handle_EHLO
            enable_SMTPUTF8=True,
            hostname=ctx.settings.hostname,
            ident="mssante-gateway ESMTP",
            tls_context=None if implicit_tls else ctx.tls,
            require_starttls=not implicit_tls,
            timeout=COMMAND_TIMEOUT,
            auth_require_tls=not implicit_tls,
            loop=asyncio.get_running_loop(),
        )

    # --- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        if first:
            peer = transport.get_extra_info("peername")
            self._peer_ip = str(peer[0]) if peer else "?"
            self.ctx.per_ip[self._peer_ip] += 1
            self.ctx.sessions.add(self)
            if self.ctx.stopping or (
                self.ctx.per_ip[self._peer_ip] > self.ctx.settings.connections_per_ip
            ):
                reply = replies.SHUTTING_DOWN if self.ctx.stopping else \
                    replies.TOO_MANY_CONNECTIONS
                transport.write(f"{reply}\r\n".encode())  # type: ignore[attr-defined]
                transport.close()
                self._refused_early = True
                return
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.release_reservation()
        self.flush_audit()
        if self in self.ctx.sessions:
            self.ctx.sessions.discard(self)
            self.ctx.per_ip[self._peer_ip] -= 1
            if self.ctx.per_ip[self._peer_ip] <= 0:
                del self.ctx.per_ip[self._peer_ip]
        if self._refused_early:
            return
        super().connection_lost(error)

    def eof_received(self) -> bool | None:
        if self._refused_early:
            return False
        result: bool | None = super().eof_received()
        return result

    def new_transaction(self) -> None:
        """Forget the recipients and sender facts of the transaction that ended."""
        self.accepted = {}
        self.sender_facts = None

    def flush_audit(self) -> None:
        """Write the pending RCPT audit entries on their own (no delivery will carry them)."""
        entries, self.pending_audit = self.pending_audit, []
        self.ctx.writer.audit_many_later(entries)

    def reserve(self, size: int) -> bool:
        """Hold ``size`` bytes of the DATA budget for the declared SIZE of this transaction."""
        if not self.ctx.budget.reserve(size):
            return False
        self._reserved = size
        return True

    def take_reservation(self) -> int:
        size, self._reserved = self._reserved, 0
        return size

    def release_reservation(self) -> None:
        self.ctx.budget.release(self.take_reservation())

    def refuse_unlisted(self, recipient: str) -> str:
        """RCPT from a certificate that names no directory professional and no operator:
        ``550 5.7.1`` naming R1 to a patient (SPEC §4.2), no relay elsewhere; audited."""
        assert self.unlisted is not None  # MAIL was accepted for no one else
        if domain_of(recipient) == self.ctx.settings.patient_domain.lower():
            nobody = ProfessionalFacts(self.envelope.mail_from or "" if self.envelope else "",
                                       in_directory=False, active=False, trusted_domain=False)
            decision = decide_professional_to_patient(nobody, None)
        else:
            decision = decide_relay_denied()
        self.ctx.writer.audit_many_later([(
            f"certificate {self.unlisted.subject[:200]} sha256:{self.unlisted.fingerprint}",
            "rcpt", recipient, decision.as_dict())])
        return decision.reply

    def parse_path(self, arg: str) -> tuple[str | None, str | None]:
        match = _SIMPLE_PATH.match(arg)
        if match is None:
            return self.full_parse_path(arg)
        address = match.group(1)
        if self.local_part_limit and address.rindex("@") > self.local_part_limit:
            return None, None
        return address, arg[match.end():]

    @property
    def tls_active(self) -> bool:
        return self.implicit_tls or self.starttls_done

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            if not self._greeted:
                self._greeted = True
            elif not self._in_ehlo:
                status = replies.with_enhanced(status)
            metrics.replied(self.listener, status)
            status = status.encode("utf-8")
        response = status + b"\r\n"
        self._replies += 1
        if self._replies % YIELD_EVERY == 0:
            # RCPT lookups do not suspend on SQLite and buffered commands are read without
            # waiting: a long pipelined group would otherwise hold the loop to itself.
            await asyncio.sleep(0)
        # MAIL, RCPT and RSET may stand inside a pipelined group: if the client's next
        # command is already buffered, its reply will follow at once, so hold this one.
        if self._may_hold and len(self._held) < YIELD_EVERY and self.has_buffered_line():
            self._held.append(response)
            return
        if self._held:
            response = b"".join(self._held) + response
            self._held.clear()
        await self.send_raw(response)

    async def _holding(self, command: Callable[[str], Awaitable[None]], arg: str) -> None:
        """Run an aiosmtpd command whose reply may be held (see ``push``)."""
        self._may_hold = True
        try:
            await command(arg)
        finally:
            self._may_hold = False

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str) -> None:
        await self._holding(super().smtp_MAIL, arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str) -> None:
        await self._holding(super().smtp_RCPT, arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        await self._holding(super().smtp_RSET, arg)

    async def _greeting(self, command: Callable[[str], Awaitable[None]], hostname: str) -> None:
        """Run aiosmtpd's EHLO or HELO: its replies get no enhanced status code (see
        ``push``)."""
        self._in_ehlo = True
        try:
            await command(hostname)
        finally:
            self._in_ehlo = False

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        await self._greeting(super().smtp_EHLO, hostname)

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        await self._greeting(super().smtp_HELO, hostname)

    # --- who is sending (SPEC §4.2) ----------------------------------------------------------

    async def _first_response(self, args: list[str], prompt: str) -> bytes | AuthResult:
        """The client's first SASL response: the initial response of the AUTH line (RFC 4954
        §4), else its answer to a ``prompt`` challenge; an AuthResult when there is none."""
        if len(args) == 1:
            response = await self.challenge_auth(prompt)
            if response is MISSING:
                return AuthResult(success=False, handled=True)
            return bytes(response)
        try:
            return base64.b64decode(args[1], validate=True)
        except (binascii.Error, ValueError):
            return AuthResult(success=False, handled=False, message=str(replies.AUTH_BAD_BASE64))

    async def auth_PLAIN(self, _server: Any, args: list[str]) -> AuthResult:
        """RFC 4616 SASL PLAIN: ``authzid NUL authcid NUL passwd``."""
        response = await self._first_response(args, "")
        if isinstance(response, AuthResult):
            return response
        parts = response.split(b"\x00")
        if len(parts) != 3:
            return AuthResult(success=False, handled=False, message=str(replies.AUTH_BAD_PLAIN))
        return await self._login(parts[1], parts[2])

    async def auth_LOGIN(self, _server: Any, args: list[str]) -> AuthResult:
        user = await self._first_response(args, "Username:")
        if isinstance(user, AuthResult):
            return user
        password = await self.challenge_auth("Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._login(user, bytes(password))

    async def _login(self, user: bytes, password: bytes) -> AuthResult:
        try:
            username = user.decode("utf-8")
            secret = password.decode("utf-8")
        except UnicodeDecodeError:
            return AuthResult(success=False, handled=False, message=str(replies.AUTH_FAILED))
        result = await self.ctx.authenticator.login(username, secret, self._peer_ip, "smtp")
        if result.throttled:
            return AuthResult(success=False, handled=False, message=str(replies.AUTH_THROTTLED))
        if result.identity is None:
            return AuthResult(success=False, handled=False, message=str(replies.AUTH_FAILED))
        self.identity = result.identity
        log.info("conn=%s authenticated %s by password", self.conn_id, result.identity.role.value)
        return AuthResult(success=True, auth_data=result.identity, message=str(replies.AUTH_OK))

    async def certificate_identity(self) -> Identity | None:
        """The professional (rfc822Name) or operator (dNSName) named by a client certificate
        that chained to ``[tls] client_ca`` during the handshake."""
        if not self.tls_active or self.transport is None:
            return None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            return None
        cached = self.ctx.cached_certificate(der)
        if cached is not None:
            identity, peer = cached
            self.unlisted = peer if identity is None else None
            return identity
        named = peer_identity(ssl_object)
        if named is None:
            return None
        identity = await self._directory_identity(named)
        self.ctx.remember_certificate(der, identity, named)
        return identity

    async def _directory_identity(self, peer: PeerIdentity) -> Identity | None:
        """Who the directory says ``peer`` is; sets ``unlisted`` when nobody."""
        self.unlisted = peer  # until the directory names it below
        async with self.ctx.store.read() as conn:
            for email in peer.emails:
                row = await self.ctx.store.professional_by_address(conn, email)
                if row is None:
                    continue
                if row.cert_fingerprint and row.cert_fingerprint != peer.fingerprint:
                    continue
                self.unlisted = None
                return Identity(Role.PROFESSIONAL, address=email, account_id=row.id,
                                name=row.name)
        if peer.dns_names:
            self.unlisted = None
            return Identity(Role.OPERATOR, domains=frozenset(peer.dns_names))
        return None

    # --- DATA --------------------------------------------------------------------------------

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(str(replies.NO_VALID_RECIPIENTS))
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        self.busy = True
        reader = DataReader(MAX_INBOUND_SIZE, reserve=self.ctx.budget.reserve,
                            max_line=max_line_for(self.ctx.settings.line_length),
                            reserved=self.take_reservation(),
                            normalize_lf=self.ctx.settings.bare_newline == "normalize")
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            while not reader.done:
                chunk = await self.read_chunk(256 * 1024)
                if not chunk:  # the client vanished mid-DATA: nothing is stored
                    log.info("conn=%s connection lost during DATA", self.conn_id)
                    if self.transport is not None:
                        self.transport.close()
                    return
                reader.feed(chunk)
            if reader.rest:
                # Pipelined commands after the end-of-data go back to the command reader.
                self.unread(reader.rest)
            try:
                reply = await self._finish_data(reader)
            except Exception:
                # Unexpected (a store read, the parse): the transaction ends as after any
                # other reply to the data, with 451 and no detail on the wire.
                log.exception("conn=%s end of DATA failed", self.conn_id)
                reply = str(replies.INTERNAL_ERROR)
        finally:
            self.ctx.budget.release(reader.reserved)
            self.busy = False
            self.flush_audit()  # what the delivery did not carry (refused, failed, vanished)
        self.set_post_data_state()
        self.new_transaction()
        metrics.data_answered(self.listener, reply)
        await self.push(reply)

    async def _finish_data(self, reader: DataReader) -> str:
        state = reader.state
        if state is DataState.TOO_BIG:
            return decide_size(reader.size).reply
        if state is DataState.LINE_TOO_LONG:
            return str(replies.line_too_long(self.ctx.settings.line_length))
        if state is DataState.BARE_NEWLINE:
            return str(replies.BARE_CR if reader.normalize_lf else replies.BARE_NEWLINE)
        if state is DataState.DOT_AFTER_BARE_LF:
            return str(replies.DOT_AFTER_BARE_LF)
        if state is DataState.NO_MEMORY:
            return str(replies.NO_MEMORY)
        identity = self.identity
        assert identity is not None and self.envelope is not None
        mail_from = self.envelope.mail_from or ""
        # The stored bytes: our trace field, then the message byte-exact; built once.
        stored = reader.message(prefix=self._received_header())
        if b"\x00" in stored:  # RFC 5322 and 8BITMIME text: no NUL (there is no BINARYMIME)
            return str(replies.NUL_BYTE)
        info = await parse_message_async(stored)
        # RFC 5322 §3.6: a second From: (To:, Subject: ...) would escape the rules below.
        decision = decide_unique_fields(unique_field_names(stored, info))
        if not decision.allowed:
            self.ctx.writer.audit_later(identity.describe(), "refuse", mail_from,
                                        decision.as_dict())
            return decision.reply
        message = incoming_from_info(info)
        if identity.role is Role.PATIENT:
            return await self._finish_patient(identity, mail_from, stored, message, info)
        delivery = Delivery(self.ctx.store, self.ctx.settings, self.ctx.notices)
        decision = decide_from_header(mail_from, message.from_addrs)  # R10 at DATA
        if not decision.allowed:
            self.ctx.writer.audit_later(identity.describe(), "refuse", mail_from,
                                        decision.as_dict())
            return decision.reply
        trusted = await self.ctx.trusted_domains()
        if not await self._commit("delivery", len(stored), lambda audit: delivery.job(
                identity, mail_from, list(self.accepted.values()), stored, message, info,
                self.sender_facts.name if self.sender_facts else "", trusted, audit)):
            return str(replies.INTERNAL_ERROR)
        log.info("conn=%s stored a message for %d recipient(s)", self.conn_id,
                 len(self.accepted))
        if self.ctx.settings.notify:  # notifications were queued
            self.ctx.queue_wakeup()
        return str(replies.QUEUED)

    async def _commit(self, what: str, size: int,
                      job: Callable[[list[ops.AuditEntry]], SyncJob]) -> bool:
        """Commit the message's ``job`` with the audit rows this connection has waiting; False
        when it failed (rolled back: those rows are kept, to be written on their own)."""
        audit, self.pending_audit = self.pending_audit, []
        try:
            await self.ctx.writer.submit_sync(job(audit), size=size)
        except Exception:
            self.pending_audit = audit + self.pending_audit
            log.exception("conn=%s %s failed", self.conn_id, what)
            return False
        return True

    async def _finish_patient(self, identity: Identity, mail_from: str, stored: bytes,
                              message: IncomingMessage, info: MessageInfo) -> str:
        """A patient's message (R6, R10): copy in Sent, relays queued, one transaction."""
        decision = await check_patient_message(self.ctx.store, identity.account_id, mail_from,
                                               message.from_addrs, info)
        if not decision.allowed:
            self.ctx.writer.audit_later(identity.describe(), "refuse", mail_from,
                                        decision.as_dict())
            return decision.reply
        recipients = [address for address, _pid, _ins in self.accepted.values()]
        if not await self._commit("submission", len(stored), lambda audit: patient_job(
                identity, mail_from, recipients, stored, info, audit)):
            return str(replies.INTERNAL_ERROR)
        log.info("conn=%s queued a patient message for %d recipient(s)", self.conn_id,
                 len(recipients))
        self.ctx.queue_wakeup()
        return str(replies.QUEUED_OUT)

    def _received_header(self) -> bytes:
        """RFC 5321 §4.4 trace field naming TLS version, cipher and the identity."""
        assert self.session is not None and self.identity is not None
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        tls = describe_tls(ssl_object) if ssl_object is not None else "no TLS"
        helo = (self.session.host_name or "unknown").encode("ascii", "replace").decode()
        method = "ESMTPSA" if self.session.authenticated else "ESMTPS"
        how = "password" if self.session.authenticated else "certificate"
        who = self.identity.describe()
        lines = [
            f"Received: from {helo[:200]} ([{self._peer_ip}])",
            f"\tby {self.ctx.settings.hostname} (mssante-gateway) with {method} id {self.conn_id}",
            f"\t({tls})",
            f"\t(authenticated {who[:300]} by {how});",
            f"\t{_now_rfc5322()}",
        ]
        return ("\r\n".join(lines) + "\r\n").encode("utf-8", "replace")


class Handler:
    """aiosmtpd hooks: MAIL and RCPT decisions, EHLO keywords, exceptions."""

    async def handle_EHLO(self, server: GatewaySMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        lines = [responses[0], f"250-SIZE {MAX_INBOUND_SIZE}", "250-8BITMIME", "250-SMTPUTF8",
                 "250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        if not server.tls_active:
            lines.append("250-STARTTLS")
        else:
            lines.append("250-AUTH PLAIN LOGIN")
        lines.append("250 HELP")
        return lines

    async def handle_MAIL(self, server: GatewaySMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        ctx = server.ctx
        if server.identity is None and not server._cert_read:
            server.identity = await server.certificate_identity()
            server._cert_read = server.tls_active  # a certificate comes with TLS only
        server.release_reservation()
        server.flush_audit()
        declared = 0
        for option in mail_options:
            key, _, value = option.partition("=")
            if key == "SIZE" and value.isascii() and value.isdigit() and len(value) < 20:
                declared = int(value)
                decision = decide_size(declared)
                if not decision.allowed:
                    return decision.reply
        if server.identity is None and server.unlisted is not None:
            # Authenticated by a certificate of the trust CA that names nobody allowed here:
            # no sender to align (R10); every RCPT is refused (R1, or no relay).
            decision = allow("R10", "sender accepted")
        else:
            decision = decide_mail_from(server.identity, address, await ctx.trusted_domains())
        if not decision.allowed:
            if server.identity is not None:
                ctx.writer.audit_later(server.identity.describe(), "refuse", address,
                                decision.as_dict())
            return decision.reply
        if declared and not server.reserve(declared):
            # RFC 1870 §6.2: refuse a declared size we cannot hold now, before the data.
            return str(replies.NO_MEMORY)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        server.new_transaction()
        return str(replies.SENDER_OK)

    async def handle_RCPT(self, server: GatewaySMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        ctx = server.ctx
        identity = server.identity
        if identity is None:
            return server.refuse_unlisted(address.strip())
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 too many recipients"
        domain = ctx.settings.patient_domain
        recipient = address.strip()
        if identity.role is Role.PATIENT:
            verdict = await ctx.store.read_inline(
                ops.with_facts, judge_patient_recipient, identity.account_id, recipient.lower(),
                domain)
        else:
            verdict = await ctx.store.read_inline(
                ops.with_facts, judge_professional_recipient, (envelope.mail_from or "").lower(),
                recipient, domain, server.sender_facts)
            server.sender_facts = verdict.sender_facts or server.sender_facts
        decision: Decision = verdict.decision
        entry = (identity.describe(), "rcpt", recipient, decision.as_dict())
        if not decision.allowed:
            ctx.writer.audit_many_later([entry])
            return decision.reply
        # Written later, with the delivery: the row's own time will be the commit's.
        server.pending_audit.append(
            (entry[0], entry[1], entry[2], {**entry[3], "decided_at": utcnow().isoformat()}))
        envelope.rcpt_tos.append(recipient)
        # The same mailbox named twice (or in two spellings) gets the message once.
        key = recipient.lower() if identity.role is Role.PATIENT else verdict.patient_id
        server.accepted.setdefault(key, (recipient, verdict.patient_id, verdict.ins or ""))
        return f"250 2.1.5 {decision.text}"

    async def handle_RSET(self, server: GatewaySMTP, session: Session,
                          envelope: Envelope) -> str:
        server.new_transaction()
        server.release_reservation()
        server.flush_audit()
        return "250 2.0.0 reset"

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):  # aiosmtpd closes the connection
            if not isinstance(error.__cause__, ssl.SSLError):  # else logged by the context
                log.info("STARTTLS handshake failed (%s)", error.__cause__.__class__.__name__)
            return str(replies.INTERNAL_ERROR)
        log.error("SMTP session error: %s", error.__class__.__name__, exc_info=error)
        return str(replies.INTERNAL_ERROR)


async def start_listener(ctx: IntakeContext, name: str, host: str, port: int,
                         implicit_tls: bool, *, reuse_port: bool = False) -> asyncio.Server:
    """Listen on ``host:port``; OSError when the address cannot be bound. ``reuse_port``:
    other processes (the workers of one ``serve``) listen on the same port."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: GatewaySMTP(ctx, name, implicit_tls), host, port,
        ssl=ctx.tls if implicit_tls else None, reuse_address=True, reuse_port=reuse_port or None,
    )
    log.info("%s listening on %s:%d", name, host, port)
    return server


async def drain_sessions(ctx: IntakeContext, grace: float = DRAIN_SECONDS) -> None:
    """SIGTERM: let transactions in flight finish, then close every session with 421."""
    ctx.stopping = True
    deadline = asyncio.get_running_loop().time() + grace
    # Polling keeps the sessions free of shutdown bookkeeping; 50 ms is plenty at shutdown.

    def busy() -> bool:
        return any(s.busy for s in ctx.sessions)

    while busy() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    for session in list(ctx.sessions):
        session.flush_audit()  # before the writer stops
        transport = session.transport
        if transport is not None and not transport.is_closing():
            try:
                transport.write(f"{replies.SHUTTING_DOWN}\r\n".encode())  # type: ignore[attr-defined]
            except (RuntimeError, OSError):
                pass
            transport.close()
