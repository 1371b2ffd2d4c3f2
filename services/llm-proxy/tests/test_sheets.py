"""Google Sheets export through gspread against the fake Sheets API: one row per phone, latest
version wins, exports queued while Sheets is down and drained when it is back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg

from orbion_common.events import LeadChanged, LeadExported
from orbion_common.events.lead import LeadChangedPayload, LeadSnapshot
from orbion_llm_proxy.domain import SHEET_COLUMNS
from tests.fakes.sheets import FakeSheets

from .conftest import make_settings
from .helpers import build_deps, new_phone


def _changed(phone: str, version: int, **fields: Any) -> LeadChanged:
    snapshot = LeadSnapshot(phone=phone, version=version, **fields)
    return LeadChanged.create(phone, LeadChangedPayload(snapshot=snapshot))


def _settings(urls: dict[str, str], tag: str, fake: FakeSheets, tmp_path: Path) -> Any:
    return make_settings(
        urls, tag, sheets_spreadsheet_id="sheet-" + tag, sheets_base_url=fake.base_url,
        sheets_credentials_file=fake.write_service_account(tmp_path / "sa.json"),
        sheets_breaker_fail_max=2, sheets_breaker_reset_seconds=0.3,
    )  # fmt: skip


def _rows_by_phone(fake: FakeSheets) -> dict[str, list[str]]:
    grid = fake.values("FUNIL-BANT")
    assert grid[0] == list(SHEET_COLUMNS)
    phone_col = SHEET_COLUMNS.index("phone")
    phones = [row[phone_col] for row in grid[1:]]
    assert len(phones) == len(set(phones)), "one row per phone"
    return {row[phone_col]: row for row in grid[1:]}


async def test_latest_lead_state_is_upserted_one_row_per_phone(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str, tmp_path: Path
) -> None:
    fake = FakeSheets()
    async with fake:
        deps = build_deps(_settings(urls, tag, fake, tmp_path), pool, schema=schema)
        assert deps.exporter is not None
        a, b = new_phone(), new_phone()
        events = [_changed(a, 1, stage="need"), _changed(a, 2, stage="budget", name="Ana"), _changed(b, 1)]
        for event in events:
            await deps.handlers.queue_lead_export(event)
        await deps.handlers.queue_lead_export(_changed(a, 1, stage="stale"))  # late and old: ignored
        assert await deps.exporter.export_batch() == 2
        await deps.handlers.queue_lead_export(_changed(a, 3, stage="qualified", name="Ana", score=80))
        await deps.handlers.queue_lead_export(_changed(a, 2, stage="stale"))  # older than written
        assert await deps.exporter.export_batch() == 1
        assert await deps.exporter.export_batch() == 0
    rows = _rows_by_phone(fake)
    assert set(rows) == {a, b}
    assert rows[a][SHEET_COLUMNS.index("stage")] == "qualified"
    assert rows[a][SHEET_COLUMNS.index("name")] == "Ana"
    assert rows[a][SHEET_COLUMNS.index("score")] == "80"
    async with pool.acquire() as conn:
        exported = [s.event for s in await deps.events.load_stream(conn, a)]
    assert [e.payload.lead_version for e in exported if isinstance(e, LeadExported)] == [2, 3]


async def test_exports_queue_while_sheets_is_down_and_drain_later(
    pool: asyncpg.Pool, schema: str, urls: dict[str, str], tag: str, tmp_path: Path
) -> None:
    fake = FakeSheets()
    async with fake:
        deps = build_deps(_settings(urls, tag, fake, tmp_path), pool, schema=schema)
        assert deps.exporter is not None
        fake.fail_status = 503
        phones = [new_phone() for _ in range(5)]
        for phone in phones:
            await deps.handlers.queue_lead_export(_changed(phone, 1, stage="need"))
        for _ in range(4):
            assert await deps.exporter.export_batch() == 0
        assert deps.breakers["sheets"].state == "open"
        await deps.handlers.queue_lead_export(_changed(phones[0], 2, stage="timing"))  # while down
        fake.fail_status = 0
        await asyncio.sleep(deps.breakers["sheets"].reset_timeout + 0.05)
        assert await deps.exporter.export_batch() == 5
        assert deps.breakers["sheets"].state == "closed"
    rows = _rows_by_phone(fake)
    assert set(rows) == set(phones)
    assert rows[phones[0]][SHEET_COLUMNS.index("stage")] == "timing"
