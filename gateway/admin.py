"""``mssante-policy``: the admin command line (SPEC §7). It parses arguments and calls the
store and the rules; every change is audited with the operator's login as actor."""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway.cliutil import (
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    CliError,
    actor,
    common_options,
    emit,
    load,
    open_store,
    read_password_stdin,
    run,
    table,
)
from gateway.config import Config
from gateway.wiring import notices
from imap_store.store import ops
from imap_store.store.directory import Contact, Patient, Professional, Store
from imap_store.store.documents import counts as document_counts
from policy.addresses import (
    domain_of,
    normalize_address,
    normalize_domain,
    normalize_phone,
    patient_address,
    validate_ins,
    validate_rpps,
)
from policy.engine import judge
from policy.passwords import hash_password

PROG = "mssante-policy"


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(prog=PROG, parents=[common_options(top=True)],
                                     description="Administer the health mail gateway policy.")
    sub = parser.add_subparsers(dest="group", required=True)

    pro = sub.add_parser("professional", parents=[common], help="directory of professionals")
    pro_sub = pro.add_subparsers(dest="action", required=True)
    p = pro_sub.add_parser("add", parents=[common])
    p.add_argument("address")
    p.add_argument("--name", required=True)
    p.add_argument("--rpps")
    p.add_argument("--password-stdin", action="store_true")
    for action in ("suspend", "reinstate", "show"):
        pro_sub.add_parser(action, parents=[common]).add_argument("address")
    pro_sub.add_parser("list", parents=[common])

    pat = sub.add_parser("patient", parents=[common], help="patients and their mailboxes")
    pat_sub = pat.add_subparsers(dest="action", required=True)
    p = pat_sub.add_parser("add", parents=[common])
    p.add_argument("ins")
    p.add_argument("--name", required=True)
    p.add_argument("--notify-email", required=True)
    p.add_argument("--phone", help="mobile number for the portal's one-time code by SMS")
    p.add_argument("--password-stdin", action="store_true")
    for action in ("close", "reopen", "show"):
        pat_sub.add_parser(action, parents=[common]).add_argument("ins")
    pat_sub.add_parser("list", parents=[common])
    p = pat_sub.add_parser("set-password", parents=[common])
    p.add_argument("ins")
    p.add_argument("--password-stdin", action="store_true", required=True)

    exc = sub.add_parser("exchange", parents=[common], help="exchanges between patients and "
                         "professionals")
    exc_sub = exc.add_subparsers(dest="action", required=True)
    exc_sub.add_parser("list", parents=[common]).add_argument("--patient", required=True)
    for action in ("end", "reopen"):
        p = exc_sub.add_parser(action, parents=[common])
        p.add_argument("--patient", required=True)
        p.add_argument("--professional", required=True)

    dom = sub.add_parser("domain", parents=[common], help="trusted domains")
    dom_sub = dom.add_subparsers(dest="action", required=True)
    for action in ("add", "remove"):
        dom_sub.add_parser(action, parents=[common]).add_argument("domain")
    dom_sub.add_parser("list", parents=[common])
    dom_sub.add_parser("import", parents=[common]).add_argument("whitelist", type=Path)

    chk = sub.add_parser("check", parents=[common], help="what the rules decide for an "
                         "envelope; exit 0 allow, 1 refuse")
    chk.add_argument("--from", dest="sender", required=True)
    chk.add_argument("--to", dest="recipient", required=True)

    aud = sub.add_parser("audit", parents=[common], help="the audit chain")
    aud.add_argument("--limit", type=int, default=50)
    aud_sub = aud.add_subparsers(dest="action")
    aud_sub.add_parser("verify", parents=[common])
    return parser


def _pro_text(p: Professional) -> str:
    return "\n".join([
        f"address      {p.address}", f"name         {p.name}", f"rpps         {p.rpps or '-'}",
        f"state        {p.state}", f"password     {'set' if p.has_password else 'none'}",
        f"certificate  {p.cert_fingerprint or '-'}", f"created      {p.created_at.isoformat()}",
    ])


def _patient_text(p: Patient, address: str) -> str:
    return "\n".join([
        f"ins          {p.ins}", f"address      {address}", f"name         {p.name}",
        f"notify       {p.notify_email}", f"state        {p.state}",
        f"password     {'set' if p.has_password else 'none'}",
        f"created      {p.created_at.isoformat()}",
    ])


def parse_whitelist(path: Path) -> tuple[list[str], str | None]:
    """Domain names under ``//Domaine/Nom`` and the ``DateDeGeneration`` of a whitelist."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise CliError(f"{path}: DTDs and entities are not accepted in a whitelist")
    try:
        root = ET.fromstring(data)  # noqa: S314 - no DTD/entities (checked above)
    except ET.ParseError as exc:
        raise CliError(f"{path}: not a whitelist XML file ({exc})") from None

    def local(tag: str) -> str:
        return tag.rpartition("}")[2]

    names: list[str] = []
    generated: str | None = None
    for element in root.iter():
        if local(element.tag) == "DateDeGeneration" and element.text:
            generated = element.text.strip()
        if local(element.tag) == "Domaine":
            for child in element:
                if local(child.tag) == "Nom" and child.text:
                    names.append(normalize_domain(child.text))
    if not names:
        raise CliError(f"{path}: no //Domaine/Nom entries found")
    return names, generated


async def dispatch(args: argparse.Namespace, config: Config, store: Store) -> int:
    who = actor()
    as_json: bool = args.json
    group, action = args.group, getattr(args, "action", None)

    if group == "professional":
        if action == "add":
            address = normalize_address(args.address)
            rpps = validate_rpps(args.rpps) if args.rpps else None
            pw = hash_password(read_password_stdin()) if args.password_stdin else None
            pro = await store.add_professional(who, address, args.name.strip(), rpps, pw)
            emit(pro.as_dict(), as_json, lambda _: f"added professional {pro.address}")
        elif action in ("suspend", "reinstate"):
            state = "suspended" if action == "suspend" else "active"
            pro = await store.set_professional_state(who, normalize_address(args.address), state)
            emit(pro.as_dict(), as_json, lambda _: f"{pro.address} is {pro.state}")
        elif action == "show":
            pro = await store.get_professional(normalize_address(args.address))
            emit(pro.as_dict(), as_json, lambda _: _pro_text(pro))
        else:
            pros = await store.list_professionals()
            emit([p.as_dict() for p in pros], as_json, lambda _: table(
                [(p.address, p.name, p.rpps, p.state) for p in pros],
                ("ADDRESS", "NAME", "RPPS", "STATE")))
        return EXIT_OK

    if group == "patient":
        domain = config.domains.patient
        if action == "add":
            ins = validate_ins(args.ins)
            email = normalize_address(args.notify_email)
            if domain_of(email) == domain:
                raise CliError(f"--notify-email: {email} is a mailbox of this gateway; the "
                               "notifications go to the patient's personal address")
            pw = hash_password(read_password_stdin()) if args.password_stdin else None
            address = patient_address(ins, domain)
            welcome = notices(config).welcome(patient_name=args.name.strip(),
                                              address=address)
            phone = normalize_phone(args.phone) if args.phone else None
            pat = await store.add_patient(who, ins, args.name.strip(), email, pw, welcome,
                                          phone)
            emit(_patient_record(pat, domain), as_json,
                 lambda _: f"added patient {pat.ins} ({address})")
        elif action in ("close", "reopen"):
            state = "closed" if action == "close" else "open"
            pat = await store.set_patient_state(who, validate_ins(args.ins), state)
            emit(_patient_record(pat, domain), as_json,
                 lambda _: f"mailbox of {pat.ins} is {pat.state}")
        elif action == "show":
            pat = await store.get_patient(validate_ins(args.ins))
            counts = await store.mailbox_counts(pat.id)
            record = _patient_record(pat, domain)
            record["mailboxes"] = [
                {"name": c.name, "messages": c.messages, "unseen": c.unseen} for c in counts
            ]
            docs = await store.run_read(document_counts, pat.id)  # counts, never content
            record["documents"] = {"health": docs.documents, "administrative":
                                   docs.administrative, "bytes": docs.bytes}
            emit(record, as_json, lambda _: _patient_text(pat, record["address"]) + "\n\n"
                 + table([(c.name, c.messages, c.unseen) for c in counts],
                         ("MAILBOX", "MESSAGES", "UNSEEN"))
                 + f"\n\ndocuments: {docs.documents} health, {docs.administrative} "
                 f"administrative, {docs.bytes} bytes")
        elif action == "set-password":
            ins = validate_ins(args.ins)
            await store.set_patient_password(who, ins, hash_password(read_password_stdin()))
            emit({"ins": ins, "password": "set"}, as_json, lambda _: f"password set for {ins}")
        else:
            pats = await store.list_patients()
            emit([_patient_record(p, domain) for p in pats], as_json, lambda _: table(
                [(p.ins, p.name, p.state, p.notify_email) for p in pats],
                ("INS", "NAME", "STATE", "NOTIFY")))
        return EXIT_OK

    if group == "exchange":
        ins = validate_ins(args.patient)
        if action == "list":
            contacts = await store.list_contacts(ins)
            emit([c.as_dict() for c in contacts], as_json, lambda _: _contacts_text(contacts))
        else:
            state = "ended" if action == "end" else "open"
            contact = await store.set_exchange_state(
                who, ins, normalize_address(args.professional), state)
            emit(contact.as_dict(), as_json,
                 lambda _: f"exchange of {ins} with {contact.address} is {contact.state}")
        return EXIT_OK

    if group == "domain":
        if action == "add":
            name = normalize_domain(args.domain)
            added = await store.add_domains(who, [name], "admin")
            if not added:
                raise CliError(f"domain {name} is already trusted")
            emit({"domain": name}, as_json, lambda _: f"added trusted domain {name}")
        elif action == "remove":
            name = normalize_domain(args.domain)
            await store.remove_domain(who, name)
            emit({"domain": name, "removed": True}, as_json,
                 lambda _: f"removed trusted domain {name}")
        elif action == "import":
            names, generated = parse_whitelist(args.whitelist)
            added = await store.add_domains(who, names, f"whitelist {generated or ''}".strip())
            result = {"file": str(args.whitelist), "generated": generated, "domains": len(names),
                      "added": added}
            emit(result, as_json, lambda _: f"imported {len(names)} domains "
                 f"(generated {generated or 'unknown'}), {len(added)} new")
        else:
            names = await store.trusted_domains()
            emit([{"domain": n} for n in names], as_json,
                 lambda _: "\n".join(names) if names else "(none)")
        return EXIT_OK

    if group == "check":
        sender = normalize_address(args.sender)
        recipient = normalize_address(args.recipient)
        async with store.write() as conn:
            verdict = await conn.run_sync(ops.with_facts, judge, sender, recipient,
                                          config.domains.patient)
            await store.audit(conn, who, "check", f"{sender} -> {recipient}",
                              verdict.decision.as_dict())
        d = verdict.decision
        record = {"from": sender, "to": recipient, **d.as_dict()}
        emit(record, as_json, lambda _: f"{'ALLOW' if d.allowed else 'REFUSE'} {d.rule}: "
             f"{d.smtp_code} {d.enhanced_code} {d.text}")
        return EXIT_OK if d.allowed else EXIT_REFUSED

    if group == "audit":
        if action == "verify":
            count, broken = await store.audit_verify()
            if broken is not None:
                row, reason = broken
                emit({"ok": False, "rows": count, "first_broken_row": row, "reason": reason},
                     as_json, lambda _: f"audit chain BROKEN at row {row}: {reason}")
                if not as_json:
                    print(f"{PROG}: error: audit chain broken at row {row}", file=sys.stderr)
                return EXIT_REFUSED
            emit({"ok": True, "rows": count, "first_broken_row": None, "reason": None}, as_json,
                 lambda _: f"audit chain intact ({count} rows)")
            return EXIT_OK
        if args.limit < 1:
            raise CliError("--limit must be at least 1", EXIT_USAGE)
        records = await store.audit_records(args.limit)
        emit([{"id": r.id, "at": r.at.isoformat(), "actor": r.actor, "action": r.action,
               "subject": r.subject, "detail": r.detail} for r in records], as_json,
             lambda _: table([(r.id, r.at.strftime("%Y-%m-%d %H:%M:%S"), r.actor, r.action,
                               r.subject) for r in records],
                             ("ID", "AT (UTC)", "ACTOR", "ACTION", "SUBJECT")))
        return EXIT_OK
    raise CliError(f"unknown command {group}", EXIT_USAGE)  # pragma: no cover


def _patient_record(p: Patient, domain: str) -> dict[str, Any]:
    return {**p.as_dict(), "address": patient_address(p.ins, domain)}


def _contacts_text(contacts: list[Contact]) -> str:
    return table(
        [(c.name, c.address, c.state, c.since.strftime("%Y-%m-%d %H:%M"), c.via or "")
         for c in contacts],
        ("NAME", "ADDRESS", "STATE", "SINCE (UTC)", "VIA"))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    async def _main() -> int:
        config = load(args)
        store = await open_store(config)
        try:
            return await dispatch(args, config, store)
        finally:
            await store.close()

    return run(PROG, _main)


if __name__ == "__main__":
    sys.exit(main())
