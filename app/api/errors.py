"""The one shape of every error the API returns: `{"error": code, "message": text}`."""

from __future__ import annotations

from fastapi import HTTPException


class ApiError(HTTPException):
    """An HTTP error with a short machine code and a human sentence."""

    def __init__(
        self, status_code: int, error: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code, detail={"error": error, "message": message}, headers=headers)
