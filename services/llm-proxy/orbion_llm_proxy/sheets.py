"""Google Sheets export: drains the ``sheet_exports`` queue into one row per phone, via gspread.

The consumer (consumers.py) queues each ``LeadChanged`` snapshot, keyed by phone (latest
version wins), in Postgres. The exporter writes batches: it reads the phone column once,
updates the rows it finds and appends the others, all in two API calls per batch, then pauses
``sheets_flush_seconds`` (Sheets allows about 60 writes per minute per user). gspread is
synchronous: every call runs in a worker thread (``asyncio.to_thread``), behind the Sheets
breaker. When Sheets is down, the queue simply grows and drains once it is back; a row is
dequeued (and ``LeadExported`` appended) only after the write succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import gspread
from google.auth.transport.requests import AuthorizedSession
from google.oauth2.service_account import Credentials
from gspread.utils import ValueInputOption
from prometheus_client import Counter, Gauge

from orbion_common.breakers import Breaker, BreakerOpen
from orbion_common.events import LeadExported, stable_event_id
from orbion_common.events.lead import LeadSnapshot
from orbion_common.events.operations import LeadExportedPayload
from orbion_common.eventstore import EventStore

from . import store
from .domain import SHEET_COLUMNS, SheetRow, sheet_row
from .settings import Settings

log = logging.getLogger(__name__)

EXPORTED = Counter("orbion_llm_proxy_sheet_rows_total", "Lead rows written to Google Sheets", ["op"])
EXPORT_ERRORS = Counter("orbion_llm_proxy_sheet_errors_total", "Failed Google Sheets batches")
EXPORT_QUEUE = Gauge("orbion_llm_proxy_sheet_queue", "Leads waiting to be exported (last batch)")

SCOPES = ("https://www.googleapis.com/auth/spreadsheets",)
GOOGLE_SHEETS = "https://sheets.googleapis.com"


class _RebasedSession(AuthorizedSession):
    """An authorized session that sends Sheets calls to ``base_url`` (tests: the fake server)."""

    def __init__(self, credentials: Credentials, base_url: str) -> None:
        super().__init__(credentials)  # type: ignore[no-untyped-call]
        self._base = base_url.rstrip("/")

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        if url.startswith(GOOGLE_SHEETS):
            url = self._base + url[len(GOOGLE_SHEETS) :]
        return super().request(method, url, *args, **kwargs)  # type: ignore[no-untyped-call]


def _last_column() -> str:
    return chr(ord("A") + len(SHEET_COLUMNS) - 1)


class SheetWriter:
    """Synchronous gspread work (run in a thread): upsert rows keyed by the phone column."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._worksheet: gspread.Worksheet | None = None

    def _open(self) -> gspread.Worksheet:
        if self._worksheet is not None:
            return self._worksheet
        assert self.settings.sheets_credentials_file is not None
        credentials = Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
            str(self.settings.sheets_credentials_file), scopes=list(SCOPES)
        )
        session = _RebasedSession(credentials, self.settings.sheets_base_url)
        client = gspread.Client(auth=credentials, session=session)
        client.set_timeout(30.0)
        spreadsheet = client.open_by_key(self.settings.sheets_spreadsheet_id)
        try:
            worksheet = spreadsheet.worksheet(self.settings.sheets_worksheet)
        except gspread.WorksheetNotFound:
            worksheet = spreadsheet.add_worksheet(
                self.settings.sheets_worksheet, rows=1000, cols=len(SHEET_COLUMNS)
            )
        self._worksheet = worksheet
        return worksheet

    def upsert(self, rows: Sequence[SheetRow]) -> tuple[int, int]:
        """Write ``rows``; returns (updated, appended)."""
        try:
            worksheet = self._open()
            phones = worksheet.col_values(SHEET_COLUMNS.index("phone") + 1)
        except Exception:
            self._worksheet = None  # reopen next time (token, sheet renamed, ...)
            raise
        if not phones:
            worksheet.append_rows([list(SHEET_COLUMNS)], value_input_option=ValueInputOption.raw)
            phones = ["phone"]
        where = {str(p): i + 1 for i, p in enumerate(phones) if p}
        last = _last_column()
        updates = [
            {"range": f"A{where[r.phone]}:{last}{where[r.phone]}", "values": [r.values]}
            for r in rows
            if r.phone in where
        ]
        appends = [r.values for r in rows if r.phone not in where]
        if updates:
            worksheet.batch_update(updates, value_input_option=ValueInputOption.raw)
        if appends:
            worksheet.append_rows(appends, value_input_option=ValueInputOption.raw)
        return len(updates), len(appends)


class Exporter:
    def __init__(
        self,
        pool: asyncpg.Pool,
        events: EventStore,
        settings: Settings,
        breaker: Breaker,
        *,
        writer: SheetWriter | None = None,
        on_appended: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.events = events
        self.settings = settings
        self.breaker = breaker
        self.writer = writer or SheetWriter(settings)
        self.on_appended = on_appended
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.last_export_at: float | None = None
        self.queued = 0

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def info(self) -> dict[str, object]:
        return {
            "worksheet": self.settings.sheets_worksheet,
            "queued": self.queued,
            "last_export_s_ago": None
            if self.last_export_at is None
            else round(time.monotonic() - self.last_export_at, 1),
        }

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                written = await self.export_batch()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("sheets export paused: %r", exc)
                written = 0
            # Pace writes for the Sheets quota; wait longer when idle or failing.
            pause = (
                self.settings.sheets_flush_seconds
                if written
                else max(self.settings.sheets_flush_seconds, 1.0)
            )
            if not written and self.breaker.retry_after() > 0:
                pause = max(pause, self.breaker.retry_after())
            if written:
                await asyncio.sleep(pause)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=pause)
                self._wake.clear()

    async def export_batch(self) -> int:
        """Write one batch of queued leads; returns how many rows were written (0 on failure)."""
        async with self.pool.acquire() as conn:
            batch = await store.take_exports(conn, self.settings.sheets_batch_size)
            self.queued = await store.pending_exports(conn)
        EXPORT_QUEUE.set(self.queued)
        if not batch:
            return 0
        now = datetime.now(UTC)
        rows = [sheet_row(LeadSnapshot(**item["snapshot"]), now) for item in batch]
        try:
            updated, appended = await self.breaker.call(asyncio.to_thread, self.writer.upsert, rows)
        except BreakerOpen:
            return 0
        except Exception as exc:
            EXPORT_ERRORS.inc()
            log.warning("sheets export of %d leads failed, kept queued: %r", len(batch), exc)
            async with self.pool.acquire() as conn:
                await store.export_attempt_failed(conn, [item["phone"] for item in batch])
            return 0
        EXPORTED.labels("update").inc(updated)
        EXPORTED.labels("append").inc(appended)
        exported = [
            LeadExported(
                event_id=stable_event_id("LeadExported", item["phone"], str(item["lead_version"])),
                type="LeadExported",
                stream_id=item["phone"],
                correlation_id=item["correlation_id"],
                causation_id=item["causation_id"] or None,
                payload=LeadExportedPayload(
                    phone=item["phone"],
                    worksheet=self.settings.sheets_worksheet,
                    lead_version=item["lead_version"],
                ),
            )
            for item in batch
        ]
        async with self.pool.acquire() as conn, conn.transaction():
            await store.exports_done(conn, [(item["phone"], item["lead_version"]) for item in batch])
            for event in exported:
                await self.events.append(conn, event.stream_id, [event])
        self.last_export_at = time.monotonic()
        self.on_appended()
        return len(batch)
