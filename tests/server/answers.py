"""Reading the server's answers in tests: its JSON errors, and the store's head."""

from __future__ import annotations

import httpx


def json_error(response: httpx.Response, status: int, kind: str) -> str:
    """Assert that ``response`` is the JSON error ``kind`` with ``status``; its message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == kind, error
    message: str = error["message"]
    return message


async def head_rev(client: httpx.AsyncClient) -> int:
    """The store's head revision, as ``GET /api/v1/head`` says."""
    rev: int = (await client.get("/api/v1/head")).json()["rev"]
    return rev
