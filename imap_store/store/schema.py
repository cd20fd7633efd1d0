"""Database tables (SQLAlchemy Core), created by the Alembic migrations in ``migrations/``.

UIDs, UIDVALIDITY, MODSEQ, flags and keywords live here and are allocated atomically in the
database (RFC 3501 §2.3.1.1, RFC 7162 §3), so several ``serve`` processes can share one
PostgreSQL database.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Bits of message.flags (system flags, RFC 3501 §2.3.2); keywords are a separate column.
FLAG_SEEN = 1
FLAG_ANSWERED = 2
FLAG_FLAGGED = 4
FLAG_DELETED = 8
FLAG_DRAFT = 16

trusted_domain = Table(
    "trusted_domain",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(253), nullable=False, unique=True),
    Column("source", String(40), nullable=False, default="admin"),
    Column("added_at", DateTime(timezone=True), nullable=False),
)

professional = Table(
    "professional",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("address", String(254), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("rpps", String(11), nullable=True),
    Column("state", String(12), nullable=False, default="active"),
    Column("password_hash", String(200), nullable=True),
    Column("cert_fingerprint", String(64), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

patient = Table(
    "patient",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("ins", String(15), nullable=False, unique=True),
    Column("name", String(200), nullable=False),
    Column("notify_email", String(254), nullable=False),
    Column("state", String(12), nullable=False, default="open"),
    Column("password_hash", String(200), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # Where the portal's one-time code may go by SMS (migration 0004).
    Column("phone", String(20), nullable=True),
)

# One row per (patient, professional) who wrote to them (R2); ended by R5 or an admin.
exchange = Table(
    "exchange",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", Integer, ForeignKey("patient.id", ondelete="CASCADE"), nullable=False),
    Column("professional_address", String(254), nullable=False),
    Column("professional_name", String(200), nullable=False, default=""),
    Column("state", String(12), nullable=False, default="open"),
    Column("since", DateTime(timezone=True), nullable=False),
    UniqueConstraint("patient_id", "professional_address", name="uq_exchange_patient_pro"),
)

# R4: a Reply-To address named in a professional's message, reachable within that exchange.
exchange_alias = Table(
    "exchange_alias",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("exchange_id", Integer, ForeignKey("exchange.id", ondelete="CASCADE"), nullable=False),
    Column("address", String(254), nullable=False),
    Column("name", String(200), nullable=False, default=""),
    Column("since", DateTime(timezone=True), nullable=False),
    UniqueConstraint("exchange_id", "address", name="uq_exchange_alias_exchange_address"),
)
Index("ix_exchange_alias_address", exchange_alias.c.address)

mailbox = Table(
    "mailbox",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", Integer, ForeignKey("patient.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(255), nullable=False),
    Column("special_use", String(20), nullable=True),
    Column("uidvalidity", BigInteger, nullable=False),
    Column("uidnext", BigInteger, nullable=False, default=1),
    Column("highestmodseq", BigInteger, nullable=False, default=1),
    # Highest UID already announced as \Recent to one session (RFC 3501 §2.3.2; migration 0002).
    Column("recent_uid", BigInteger, nullable=False, default=0, server_default="0"),
    # Highest MODSEQ of the ``expunged`` rows the housekeeping deleted (migration 0009): below
    # it, VANISHED (EARLIER) is a superset (RFC 7162 §3.2.5.2).
    Column("vanished_modseq", BigInteger, nullable=False, default=0, server_default="0"),
    UniqueConstraint("patient_id", "name", name="uq_mailbox_patient_name"),
)

# The names a patient subscribed to (RFC 3501 §6.3.6-7, RFC 9051 §6.3.7-8; migration 0010):
# names, not mailboxes, so a subscription outlives DELETE and stays on its name across RENAME.
subscription = Table(
    "subscription",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", Integer, ForeignKey("patient.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(255), nullable=False),
    UniqueConstraint("patient_id", "name", name="uq_subscription_patient_name"),
)

blob = Table(
    "blob",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
)
Index("ix_blob_sha256", blob.c.sha256)

message = Table(
    "message",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("mailbox_id", Integer, ForeignKey("mailbox.id", ondelete="CASCADE"), nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("modseq", BigInteger, nullable=False),
    Column("flags", Integer, nullable=False, default=0),
    Column("keywords", Text, nullable=False, default=""),
    Column("internal_date", DateTime(timezone=True), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("blob_id", Integer, ForeignKey("blob.id"), nullable=False),
    # Derived once at delivery (ARCHITECTURE "compute once"): rules, SEARCH, threads.
    Column("message_id", String(998), nullable=True),
    Column("in_reply_to", String(998), nullable=True),
    Column("references", Text, nullable=True),
    Column("subject", Text, nullable=True),
    Column("from_addr", String(254), nullable=True),
    Column("sent_date", DateTime(timezone=True), nullable=True),
    Column("thread_id", String(998), nullable=True),
    # Migration 0004: 1 when the message has attachments (the portal's list reads it in SQL).
    Column("has_attachments", Integer, nullable=False, default=0, server_default="0"),
    # Migration 0004: the decoded display name of the first From: address (the portal's list).
    Column("from_name", String(200), nullable=True),
    Column("meta", Text, nullable=True),  # JSON: envelope, bodystructure, search headers
    # Migration 0008: when the message entered the \\Trash mailbox (COPY/MOVE into it; NULL
    # elsewhere); the purge (housekeeping.py) removes it ``[web] trash_days`` later.
    Column("trashed_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("mailbox_id", "uid", name="uq_message_mailbox_uid"),
)
Index("ix_message_mailbox_modseq", message.c.mailbox_id, message.c.modseq)
Index("ix_message_message_id", message.c.message_id)
# Migration 0003: (uid, flags) of a mailbox without reading the wide rows; the few messages
# with keywords; blob references (expunged bodies are deleted when no longer referenced).
Index("ix_message_mailbox_uid_flags", message.c.mailbox_id, message.c.uid, message.c.flags,
      message.c.blob_id)
Index("ix_message_mailbox_keywords", message.c.mailbox_id, message.c.uid,
      sqlite_where=message.c.keywords != "", postgresql_where=message.c.keywords != "")
Index("ix_message_blob_id", message.c.blob_id)
# Migration 0004: a conversation's messages within one mailbox (the portal asks the patient's
# three). A plain index on thread_id slowed IMAP EXPUNGE twofold (bench/imap.py uid_expunge).
Index("ix_message_mailbox_thread", message.c.mailbox_id, message.c.thread_id)
# Migration 0008: the few rows in Trash, oldest first, for the purge.
Index("ix_message_trashed_at", message.c.trashed_at,
      sqlite_where=message.c.trashed_at.isnot(None),
      postgresql_where=message.c.trashed_at.isnot(None))

# SEARCH FROM/TO/CC/BCC/SUBJECT (migration 0003): a body's decoded header fields, case-folded
# (``str.casefold``; NULL when the message has no such field), in narrow rows. Written at APPEND
# and by SEARCH for bodies stored without one (the way Dovecot fills its cache file).
blob_search = Table(
    "blob_search",
    metadata,
    Column("blob_id", Integer, ForeignKey("blob.id", ondelete="CASCADE"), primary_key=True,
           autoincrement=False),
    Column("from_text", Text, nullable=True),
    Column("to_text", Text, nullable=True),
    Column("cc_text", Text, nullable=True),
    Column("bcc_text", Text, nullable=True),
    Column("subject_text", Text, nullable=True),
)

# Expunged UIDs with the MODSEQ of their removal, so other sessions learn of EXPUNGEs; the
# newest few thousand per mailbox are kept (housekeeping.py, ``mailbox.vanished_modseq``).
expunged = Table(
    "expunged",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("mailbox_id", Integer, ForeignKey("mailbox.id", ondelete="CASCADE"), nullable=False),
    Column("uid", BigInteger, nullable=False),
    Column("modseq", BigInteger, nullable=False),
)
Index("ix_expunged_mailbox_modseq", expunged.c.mailbox_id, expunged.c.modseq)

# The one durable outbound queue (SPEC §6.1, §6.2): relayed patient mail and notifications.
outbound = Table(
    "outbound",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("kind", String(20), nullable=False),  # relay | notification
    Column("patient_id", Integer, ForeignKey("patient.id", ondelete="SET NULL"), nullable=True),
    Column("sender", String(254), nullable=False),
    Column("recipient", String(254), nullable=False),
    Column("blob_id", Integer, ForeignKey("blob.id"), nullable=True),
    Column("state", String(12), nullable=False, default="queued"),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text, nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
)
Index("ix_outbound_state_next", outbound.c.state, outbound.c.next_attempt_at)
Index("ix_outbound_blob_id", outbound.c.blob_id)

# Append-only, hash-chained (SPEC §9).
audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(300), nullable=False),
    Column("action", String(60), nullable=False),
    Column("subject", String(300), nullable=False, default=""),
    Column("detail", Text, nullable=False, default="{}"),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
)

# Portal sessions (migration 0004): the cookie's token is never stored, only its SHA-256.
# ``stage``: "password" (identifier and password checked), "code" (a one-time code was sent),
# "ok" (logged in). The code is kept as its SHA-256 with its expiry and the tries left.
web_session = Table(
    "web_session",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("patient_id", Integer, ForeignKey("patient.id", ondelete="CASCADE"), nullable=False),
    Column("stage", String(12), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("code_hash", String(64), nullable=True),
    Column("code_channel", String(10), nullable=True),
    Column("code_expires", DateTime(timezone=True), nullable=True),
    Column("code_tries", Integer, nullable=False, default=0, server_default="0"),
    Column("codes_sent", Integer, nullable=False, default=0, server_default="0"),
    Column("ip", String(64), nullable=False, default="", server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_seen", DateTime(timezone=True), nullable=False),
)
Index("ix_web_session_patient_id", web_session.c.patient_id)

# Failed logins (migration 0005), shared by every ``serve`` process (policy/throttle.py): one row
# per account (resolved identity) or client address, keyed by the SHA-256 of its name (a login
# typed by mistake, a password in the user field, is never stored). Times are Unix seconds; rows
# past ``expires_at`` are forgotten and deleted from time to time.
login_failure = Table(
    "login_failure",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("first_at", Float, nullable=False),
    Column("last_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)
Index("ix_login_failure_expires_at", login_failure.c.expires_at)
# Migration 0004: a patient's own access history (portal) and the code-sending limit.
Index("ix_audit_actor_action", audit.c.actor, audit.c.action)

# A patient's health documents (migration 0006, issue 12). ``blob_id`` is the message's blob for
# a document kept from an attachment (``part``: the attachment's MIME part path as JSON, decoded
# when read; the bytes are never copied) or a blob of its own for an upload (``part`` NULL).
# ``source_message_id`` is informative only (no foreign key: deleting the message keeps the
# document, whose blob the mailbox code then keeps too).
document = Table(
    "document",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", Integer, ForeignKey("patient.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(100), nullable=False),
    Column("doc_date", Date, nullable=False),
    Column("category", String(12), nullable=False),
    Column("visibility", String(10), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("media", String(60), nullable=False),
    Column("blob_id", Integer, ForeignKey("blob.id"), nullable=False),
    Column("part", String(200), nullable=True),
    Column("source_message_id", Integer, nullable=True),
    Column("added_by", String(200), nullable=False),
    Column("added_at", DateTime(timezone=True), nullable=False),
)
Index("ix_document_patient_category_date", document.c.patient_id, document.c.category,
      document.c.doc_date)
Index("ix_document_blob_id", document.c.blob_id)

# The patient's medical profile (migration 0006): typed entries with an optional date.
# ``section``: maladie | traitement | allergie | vaccination | mesure.
profile_entry = Table(
    "profile_entry",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("patient_id", Integer, ForeignKey("patient.id", ondelete="CASCADE"), nullable=False),
    Column("section", String(20), nullable=False),
    Column("label", String(200), nullable=False),
    Column("detail", Text, nullable=False, default=""),
    Column("entry_date", Date, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)
Index("ix_profile_entry_patient_id", profile_entry.c.patient_id)
