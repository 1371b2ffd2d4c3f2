"""Fake Google Sheets API (v4) server, enough for gspread: spreadsheet metadata, addSheet,
values get / batchUpdate / append, and an OAuth token endpoint for service-account logins.

``write_service_account(path)`` writes a service-account JSON whose ``token_uri`` points here,
so real google-auth credentials log in against the fake. Faults: latency, ``error_rate``
(500), ``fail_status`` (every call, e.g. 503 while "Sheets is down"). ``values(sheet)`` gives
the grid of a worksheet.

    python -m tests.fakes.sheets --port 9004
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.server import FakeServer, cli

_CELL = re.compile(r"^([A-Z]*)(\d*)$")


def _col_index(letters: str) -> int:
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - 64)
    return n - 1


def _split_range(a1: str) -> tuple[str, str]:
    a1 = unquote(a1)
    if "!" in a1:
        sheet, cells = a1.rsplit("!", 1)
    else:
        sheet, cells = a1, ""
    return sheet.strip("'").replace("''", "'"), cells


def _bounds(cells: str) -> tuple[int, int, int | None, int | None]:
    """(first_row, first_col, last_row, last_col), 0-based, None = open-ended."""
    if not cells:
        return 0, 0, None, None
    start, _, end = cells.partition(":")
    m1, m2 = _CELL.match(start), _CELL.match(end or start)
    if not m1 or not m2:
        raise ValueError(f"bad range {cells!r}")
    r1 = int(m1.group(2)) - 1 if m1.group(2) else 0
    c1 = _col_index(m1.group(1)) if m1.group(1) else 0
    r2 = int(m2.group(2)) - 1 if m2.group(2) else None
    c2 = _col_index(m2.group(1)) if m2.group(1) else None
    return r1, c1, r2, c2


class FakeSheets(FakeServer):
    """Fake Google Sheets API."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.fail_status: int = 0
        self.sheets: dict[str, list[list[str]]] = {}
        self.sheet_ids: dict[str, int] = {}
        self.writes = 0  # value write requests (batchUpdate + append)
        self.tokens_issued = 0

    def values(self, sheet: str) -> list[list[str]]:
        return self.sheets.get(sheet, [])

    def add_sheet(self, title: str) -> dict[str, Any]:
        if title not in self.sheets:
            self.sheets[title] = []
            self.sheet_ids[title] = len(self.sheet_ids) + 1
        return self._props(title)

    def _props(self, title: str) -> dict[str, Any]:
        return {
            "sheetId": self.sheet_ids[title], "title": title, "index": self.sheet_ids[title] - 1,
            "sheetType": "GRID", "gridProperties": {"rowCount": 1000, "columnCount": 26},
        }  # fmt: skip

    def write_service_account(self, path: Path) -> Path:
        """A service-account key file that logs in against this fake (its token_uri)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        info = {
            "type": "service_account", "project_id": "orbion-test", "private_key_id": "fake",
            "private_key": pem, "client_email": "orbion@orbion-test.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": f"http://{self.host}:{self.port}/token",
        }  # fmt: skip
        path.write_text(json.dumps(info))
        return path

    def routes(self) -> list[Route]:
        return [
            Route("/token", self.token, methods=["POST"]),
            Route("/v4/spreadsheets/{rest:path}", self.spreadsheets, methods=["GET", "POST", "PUT"]),
        ]

    async def token(self, request: Request) -> JSONResponse:
        self.tokens_issued += 1
        return JSONResponse({"access_token": "fake-token", "expires_in": 3600, "token_type": "Bearer"})

    async def spreadsheets(self, request: Request) -> JSONResponse:
        error = await self.disturb()
        if error is not None:
            return error
        if self.fail_status:
            return JSONResponse(
                {"error": {"code": self.fail_status, "message": "injected", "status": "UNAVAILABLE"}},
                status_code=self.fail_status,
            )
        if request.headers.get("authorization") != "Bearer fake-token":
            return JSONResponse({"error": {"code": 401, "message": "unauthenticated"}}, status_code=401)
        rest = request.path_params["rest"]
        body = await request.json() if request.method in ("POST", "PUT") else {}
        spreadsheet_id, _, tail = rest.partition("/")
        if spreadsheet_id.endswith(":batchUpdate"):
            return self._batch_update(spreadsheet_id.removesuffix(":batchUpdate"), body)
        if not tail:
            return JSONResponse({
                "spreadsheetId": spreadsheet_id,
                "properties": {"title": "ORBION leads", "locale": "pt_BR", "timeZone": "America/Sao_Paulo"},
                "sheets": [{"properties": self._props(t)} for t in self.sheets],
            })  # fmt: skip
        if tail == "values:batchUpdate":
            self.writes += 1
            for item in body.get("data", []):
                self._write(item["range"], item["values"])
            updated = len(body.get("data", []))
            return JSONResponse({"spreadsheetId": spreadsheet_id, "totalUpdatedRows": updated})
        if tail.startswith("values/") and tail.endswith(":append"):
            self.writes += 1
            sheet, _ = _split_range(tail.removeprefix("values/").removesuffix(":append"))
            grid = self.sheets.setdefault(sheet, [])
            start = len(grid)
            grid.extend([[str(v) for v in row] for row in body.get("values", [])])
            updates = {"updatedRows": len(grid) - start}
            return JSONResponse({"spreadsheetId": spreadsheet_id, "updates": updates})
        if tail.startswith("values/") and request.method == "GET":
            a1 = tail.removeprefix("values/")
            sheet, cells = _split_range(a1)
            if sheet not in self.sheets:
                return JSONResponse({"error": {"code": 400, "message": f"Unable to parse range: {a1}"}}, 400)
            return JSONResponse(self._read(sheet, cells, request.query_params.get("majorDimension", "ROWS")))
        return JSONResponse({"error": {"code": 404, "message": f"not faked: {rest}"}}, status_code=404)

    def _batch_update(self, spreadsheet_id: str, body: dict[str, Any]) -> JSONResponse:
        replies: list[dict[str, Any]] = []
        for req in body.get("requests", []):
            if "addSheet" in req:
                props = self.add_sheet(req["addSheet"]["properties"]["title"])
                replies.append({"addSheet": {"properties": props}})
            else:
                replies.append({})
        return JSONResponse({"spreadsheetId": spreadsheet_id, "replies": replies})

    def _read(self, sheet: str, cells: str, major: str) -> dict[str, Any]:
        grid = self.sheets[sheet]
        r1, c1, r2, c2 = _bounds(cells)
        rows = grid[r1 : (r2 + 1 if r2 is not None else None)]
        rows = [row[c1 : (c2 + 1 if c2 is not None else None)] for row in rows]
        if major == "COLUMNS":
            width = max((len(r) for r in rows), default=0)
            values = [[r[i] if i < len(r) else "" for r in rows] for i in range(width)]
        else:
            values = rows
        answer: dict[str, Any] = {"range": f"'{sheet}'!{cells}", "majorDimension": major}
        if values:  # like the real API: no "values" key for an empty range
            answer["values"] = values
        return answer

    def _write(self, a1: str, values: list[list[Any]]) -> None:
        sheet, cells = _split_range(a1)
        grid = self.sheets.setdefault(sheet, [])
        r1, c1, _, _ = _bounds(cells)
        for i, row in enumerate(values):
            while len(grid) <= r1 + i:
                grid.append([])
            target = grid[r1 + i]
            while len(target) < c1 + len(row):
                target.append("")
            for j, v in enumerate(row):
                target[c1 + j] = str(v)


def main(argv: list[str] | None = None) -> None:
    cli(FakeSheets, argv)


if __name__ == "__main__":
    main()
