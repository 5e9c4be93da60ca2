"""The one shape of every error the API returns: `{"error": code, "message": text}`."""

from __future__ import annotations

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class ApiError(HTTPException):
    """An HTTP error with a short machine code and a human sentence."""

    def __init__(
        self, status_code: int, error: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code, detail={"error": error, "message": message}, headers=headers)


async def invalid_request(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's own validation errors (path, query, body shape) in the shape above.

    Names each field and what is wrong, never the value sent: the default handler
    echoes the input, and fails outright on a body that is not UTF-8.
    """
    assert isinstance(error, RequestValidationError)
    problems = [
        f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}" for item in error.errors()
    ]
    return JSONResponse(
        {"error": "invalid_request", "message": "; ".join(problems)}, status_code=422
    )
