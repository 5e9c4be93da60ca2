"""The ceiling for webhook benchmarks: a FastAPI endpoint that only answers 202."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

app = FastAPI()


@app.post("/webhooks/{queue}")
async def webhook(queue: str, request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"status": "accepted"}, status_code=202)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
