"""Commands of any state and of the not-authenticated state (RFC 3501 §6.1, §6.2): CAPABILITY,
NOOP (and CHECK, §6.4.1), LOGOUT, ID (RFC 2971), STARTTLS, LOGIN, AUTHENTICATE PLAIN
(RFC 4616, SASL-IR), ENABLE (RFC 5161)."""

from __future__ import annotations

import base64
import binascii
import logging
from typing import TYPE_CHECKING

from imap_store.imap import responses as r
from imap_store.imap.commands import (
    Authenticate,
    Capability,
    Check,
    Enable,
    Id,
    Login,
    Logout,
    Noop,
    StartTls,
)
from imap_store.imap.session.selected import sync
from imap_store.imap.session.state import Action, State

if TYPE_CHECKING:
    from imap_store.imap.session.core import Session

log = logging.getLogger("imap_store.imap.session")


async def capability(s: Session, cmd: Capability) -> Action:
    await s.emit(b"* CAPABILITY " + s.capabilities() + b"\r\n")
    return await s.complete(cmd)


async def noop(s: Session, cmd: Noop | Check) -> Action:
    """NOOP and CHECK: every change of the selected mailbox, EXPUNGEs included, even those
    the watcher has not seen yet."""
    await sync(s, allow_expunge=True, force=True)
    await s.emit(r.Reply("OK", f"{cmd.name} completed").tagged(cmd.tag))
    return Action.NONE


async def logout(s: Session, cmd: Logout) -> Action:
    await s.emit(r.BYE_LOGOUT.untagged())
    await s.emit(r.Reply("OK", "LOGOUT completed").tagged(cmd.tag))
    s.close_quietly()
    return Action.CLOSE


async def id_(s: Session, cmd: Id) -> Action:
    await s.emit(b'* ID ("name" "mssante-gateway")\r\n')
    return await s.complete(cmd)


async def enable(s: Session, cmd: Enable) -> Action:
    """ENABLE (RFC 5161 §3.1): CONDSTORE and QRESYNC (RFC 7162 §3.1, §3.2; QRESYNC implies
    CONDSTORE), IMAP4rev2 (RFC 9051 §6.3.1); ENABLED lists what this command newly enabled,
    unknown names are ignored."""
    newly: list[str] = []
    for name in cmd.capabilities:
        if name == "IMAP4REV2" and r.IMAP4REV2 and not s.rev2:
            s.rev2 = True
            newly.append("IMAP4rev2")
        elif name == "CONDSTORE" and not s.condstore:
            s.condstore = True
            newly.append(name)
        elif name == "QRESYNC" and not s.qresync:
            s.qresync = True
            if not s.condstore:
                s.condstore = True
                newly.append("CONDSTORE")
            newly.append(name)
    await s.emit(b"* ENABLED" + b"".join(b" " + n.encode() for n in newly) + b"\r\n")
    return await s.complete(cmd)


async def starttls(s: Session, cmd: StartTls) -> Action:
    if s.tls or not s.starttls_available:
        return await s.bad_reply(cmd.tag, r.BAD_STARTTLS)
    await s.emit(r.Reply("OK", "Begin TLS negotiation now").tagged(cmd.tag))
    return Action.STARTTLS


async def login(s: Session, cmd: Login) -> Action:
    if not s.tls:
        await s.emit(r.NO_LOGIN_DISABLED.tagged(cmd.tag))
        return Action.NONE
    try:
        password = cmd.password.decode("utf-8")
    except UnicodeDecodeError:
        await s.emit(r.NO_AUTH_FAILED.tagged(cmd.tag))
        return Action.NONE
    await _log_in(s, cmd.tag, cmd.user, password)
    return Action.NONE


async def authenticate(s: Session, cmd: Authenticate) -> Action:
    if not s.tls:
        await s.emit(r.NO_LOGIN_DISABLED.tagged(cmd.tag))
        return Action.NONE
    if cmd.mechanism != "PLAIN":
        await s.emit(r.NO_MECHANISM.tagged(cmd.tag))
        return Action.NONE
    if cmd.initial_response is None:
        await s.emit(b"+ \r\n")
        s.sasl_tag = cmd.tag
        return Action.EXPECT_LINE
    await _sasl_plain(s, cmd.tag, cmd.initial_response)
    return Action.NONE


async def sasl_response(s: Session, tag: str, line: bytes) -> Action:
    """The client's line after ``+`` (RFC 3501 §6.2.2): base64, or ``*`` to cancel."""
    if line.strip() == b"*":
        return await s.bad_reply(tag, r.BAD_AUTH_CANCELLED)
    try:
        decoded = base64.b64decode(line.strip(), validate=True)
    except (binascii.Error, ValueError):
        return await s.bad_reply(tag, r.BAD_AUTH_SYNTAX)
    await _sasl_plain(s, tag, decoded)
    return Action.NONE


async def _sasl_plain(s: Session, tag: str, response: bytes) -> None:
    """RFC 4616: ``[authzid] NUL authcid NUL passwd``; authzid empty or equal to authcid."""
    parts = response.split(b"\x00")
    if len(parts) != 3 or (parts[0] and parts[0] != parts[1]):
        await s.bad_reply(tag, r.BAD_AUTH_SYNTAX)
        return
    try:
        user, password = parts[1].decode("utf-8"), parts[2].decode("utf-8")
    except UnicodeDecodeError:
        await s.emit(r.NO_AUTH_FAILED.tagged(tag))
        return
    await _log_in(s, tag, user, password)


async def _log_in(s: Session, tag: str, user: str, password: str) -> None:
    result = await s.login_fn(user, password)
    if result.throttled:
        await s.emit(r.NO_AUTH_THROTTLED.tagged(tag))
        return
    identity = result.identity
    if identity is None:
        await s.emit(r.NO_AUTH_FAILED.tagged(tag))
        return
    s.state = State.AUTHENTICATED
    s.address = identity.address or ""
    s.mail = s.mail_factory(identity.account_id)
    log.info("conn=%s patient logged in", s.conn_id)
    await s.emit(f"{tag} OK [CAPABILITY ".encode() + s.capabilities() + b"] Logged in\r\n")
