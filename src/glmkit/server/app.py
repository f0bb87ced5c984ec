"""The OpenAI-compatible HTTP API (FastAPI) plus the web chat page at `/`: `create_app` wires the server's own
engine (built from the LLM's public settings, run by one worker thread), the routes (routes.py,
completions.py), error handlers and the Guard middleware (API key, body size). Every route but /health
and the static page needs the API key when one is set; bad input gets OpenAI's error shape and the server
keeps serving.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from glmkit.server import completions, routes
from glmkit.server.schema import error_body
from glmkit.server.state import ApiError, ServerState
from glmkit.server.worker import EngineWorker


def create_app(llm, *, model_name: str, api_keys: list[str] | None = None, cors_origins: list[str] | None = None,
               max_batch: int = 8, max_queue: int = 64, max_body_bytes: int = 4 << 20,
               request_timeout: float = 600.0) -> FastAPI:
    worker = EngineWorker(llm.make_engine(max_batch=max_batch), max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.stop()  # graceful shutdown: in-flight sequences are cancelled and their clients told

    app = FastAPI(title="glmkit", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.glmkit = ServerState(llm, model_name, worker, request_timeout)
    app.state.worker, app.state.llm = worker, llm
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_middleware(Guard, keys=set(api_keys or []), max_body_bytes=max_body_bytes)
    app.include_router(routes.router)
    app.include_router(completions.router)
    return app


async def _api_error(request: Request, e: ApiError):
    return JSONResponse(error_body(e.message, e.kind), status_code=e.status, headers=e.headers)


async def _invalid(request: Request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body(f"the request body is not valid JSON ({first.get('msg', '')})."), 400)
    where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
    return JSONResponse(error_body(f"{where}: {first.get('msg', 'invalid value')}", param=where), 400)


class _TooLarge(Exception):
    pass


class Guard:
    """Plain ASGI middleware: the API key on every route but /health and the page, and the body size limit
    (by Content-Length, and counted for bodies sent without one)."""

    OPEN = ("/health", "/", "/index.html")

    def __init__(self, app, keys: set[str], max_body_bytes: int):
        self.app, self.keys, self.limit = app, keys, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.keys and scope["path"] not in self.OPEN and scope["method"] != "OPTIONS":
            auth = headers.get("authorization", "")
            if not auth.startswith("Bearer ") or auth[7:].strip() not in self.keys:
                return await JSONResponse(error_body("invalid or missing API key; send 'Authorization: Bearer <key>'.",
                                                     "authentication_error", code="invalid_api_key"), 401)(
                    scope, receive, send)
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > self.limit:
            return await self._too_large(int(size), scope, receive, send)
        seen, started = 0, False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._too_large(seen, scope, receive, send)

    async def _too_large(self, size, scope, receive, send):
        await JSONResponse(error_body(f"the request body ({size} bytes) is over the {self.limit}-byte limit; "
                                      "send a smaller request."), 413)(scope, receive, send)
