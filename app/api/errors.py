"""The one shape of every error the API returns: `{"error": code, "message": text}`."""

from __future__ import annotations

from http import HTTPStatus

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


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


async def http_error(request: Request, error: Exception) -> JSONResponse:
    """Starlette's own answers (404 for an unknown path, 405 for a wrong method) in the
    shape above, with their headers (405 says `Allow`). ApiError keeps its own handler."""
    assert isinstance(error, StarletteHTTPException)
    detail = error.detail
    if isinstance(detail, dict) and {"error", "message"} <= detail.keys():
        body = detail
    else:
        try:
            phrase = HTTPStatus(error.status_code).phrase
        except ValueError:
            phrase = "Error"
        code = phrase.lower().replace(" ", "_").replace("-", "_")
        message = detail if isinstance(detail, str) and detail != phrase else None
        body = {"error": code, "message": message or _MESSAGES.get(error.status_code, phrase)}
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


async def internal_error(request: Request, error: Exception) -> JSONResponse:
    """An unexpected exception: the shape above, no details (they go to the log)."""
    return JSONResponse(
        {"error": "internal_error", "message": "the service failed to answer; see its log"},
        status_code=500,
    )


_MESSAGES = {
    404: "no such path on this service",
    405: "this path does not take that method",
}
