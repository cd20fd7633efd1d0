"""SELECT/EXAMINE, STATUS and the change poll run statements built once (issue 13): after the
first call no statement of theirs is built again, so SQLAlchemy computes no cache key for
them (built per call, that and the construction cost more CPU than running them)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy.sql import cache_key

from imap_store.store import schema as t
from imap_store.store.db import migrate
from imap_store.store.directory import Store
from imap_store.store.mailboxes import PatientMailStore, SqlMailStores

MESSAGE = (b"From: a@pro.mssante.fr\r\nTo: p@patient.mssante.fr\r\nSubject: n%d\r\n"
           b"Message-ID: <%d@select-cost>\r\n\r\nbody\r\n")


@pytest.fixture
def cache_keys(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The statements SQLAlchemy computes a cache key for (memoized per statement object)."""
    computed: list[str] = []
    original = cache_key.HasCacheKey._generate_cache_key

    def counting(self):  # type: ignore[no-untyped-def]
        computed.append(type(self).__name__)
        return original(self)
    monkeypatch.setattr(cache_key.HasCacheKey, "_generate_cache_key", counting)
    yield computed


async def _patient(store: Store, ins: str) -> PatientMailStore:
    async with store.write() as conn:
        patient_id = (await conn.execute(t.patient.insert().values(
            ins=ins, name="Select Cost", notify_email="s@example.org",
            created_at=datetime.now(UTC)).returning(t.patient.c.id))).scalar_one()
    return SqlMailStores(store).for_patient(patient_id)


async def test_select_status_and_changes_build_no_statement_again(
        db_url: str, cache_keys: list[str]) -> None:
    await migrate(db_url)
    store = Store.from_url(db_url)
    try:
        mail = await _patient(store, "100000000000002")
        other = await _patient(store, "100000000000003")
        await mail.create("INBOX")
        await other.create("INBOX")
        for i in range(3):
            await mail.append("INBOX", MESSAGE % (i, i), 0, ["$label"] if i == 1 else [], None)

        async def select_round(seen: int) -> tuple[int, int]:
            view = await mail.open("INBOX")
            assert view is not None
            info = view.mailbox
            claimed = await mail.claim_recent(info.id, seen, view.uids[-1])
            await mail.status("INBOX")
            await mail.changes(info.id, info.highestmodseq - 1)
            await mail.changes(info.id, info.highestmodseq)
            await SqlMailStores(store).highestmodseqs([info.id])
            return info.id, int(claimed)

        await select_round(0)  # the first round may compute each statement's key once
        cache_keys.clear()
        box, claimed = await select_round(0)
        assert claimed == 0  # \Recent already claimed in the first round
        assert cache_keys == []

        # the same statements still answer correctly with other parameters
        view = await mail.open("INBOX")
        assert view is not None and list(view.uids) == [1, 2, 3]
        assert view.keywords == ("$label",)
        status = await mail.status("INBOX")
        assert (status.messages, status.unseen, status.recent) == (3, 3, 0)
        assert await mail.claim_recent(box, 3, 3)
        assert not await other.claim_recent(box, 3, 3)  # not the other patient's mailbox
        assert (await other.changes(box, 0)).exists is False
        changes = await mail.changes(box, 0)
        assert [c.uid for c in changes.changed] == [1, 2, 3]
        assert await other.open("INBOX") is not None
        assert list((await other.open("INBOX")).uids) == []  # type: ignore[union-attr]
    finally:
        await store.close()
