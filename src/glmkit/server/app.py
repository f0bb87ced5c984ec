"""The OpenAI-compatible HTTP API (FastAPI) plus the web chat page at `/`: `create_app` wires the server's own
engine (built from the LLM's public settings, run by one worker thread), the routes (routes.py,
completions.py), error handlers and the Guard middleware (API key, body size). Every route but /health
and the static page needs the API key when one is set; bad input gets OpenAI's error shape and the server
keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from glmkit.engine.threads import serial
from glmkit.errors import GlmkitError
from glmkit.server import completions, routes
from glmkit.server.access import AccessLog
from glmkit.server.schema import error_body
from glmkit.server.state import ApiError, ServerState
from glmkit.server.worker import EngineWorker


def create_app(llm, *, model_name: str, api_keys: list[str] | None = None, cors_origins: list[str] | None = None,
               max_batch: int = 8, max_queue: int = 64, max_body_bytes: int = 4 << 20,
               request_timeout: float = 600.0, access_log: str | None = None, prefill_chunk: int = 256) -> FastAPI:
    """access_log: 'text' or 'json' lines on the 'glmkit.access' logger (one per request), None for none;
    prefill_chunk: the prompt tokens a step prefills at most (longer prompts take several, between decode steps)."""
    if any(not k.strip() for k in api_keys or []):
        raise GlmkitError("an API key is empty; give non-empty keys (or none, for an open server).")
    worker = EngineWorker(llm.make_engine(max_batch=max_batch, prefill_chunk=prefill_chunk), max_queue=max_queue)
    llm.image_limits = replace(llm.image_limits, allow_files=False)  # clients send images, never name server files

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # helpers (tokenizing, chat templates, images, grammars) run torch single-threaded (engine/threads.py)
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(4, "glmkit-helper", initializer=serial))
        yield
        worker.stop()  # graceful shutdown: in-flight sequences are cancelled and their clients told

    app = FastAPI(title="glmkit", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.glmkit = ServerState(llm, model_name, worker, request_timeout)
    app.state.worker, app.state.llm = worker, llm
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _http_error)  # FastAPI's own: unknown route, wrong method, bad body
    app.add_exception_handler(Exception, _internal)
    app.add_middleware(Guard, keys={k.strip() for k in api_keys or []}, max_body_bytes=max_body_bytes)
    if cors_origins:  # added last, so it wraps the Guard: a 401 carries CORS headers too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    if access_log is not None:  # outermost: refused and oversized requests are logged too
        app.add_middleware(AccessLog, fmt=access_log)
    app.include_router(routes.router)
    app.include_router(completions.router)
    return app


async def _api_error(request: Request, e: ApiError):
    return JSONResponse(error_body(e.message, e.kind), status_code=e.status, headers=e.headers)


async def _http_error(request: Request, e: HTTPException):
    kinds = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}
    message = {404: f"there is no route {request.url.path}; see /v1/models, /v1/chat/completions, "
                    "/v1/completions.",
               405: f"{request.method} is not allowed on {request.url.path}."}.get(e.status_code, str(e.detail))
    return JSONResponse(error_body(message, kinds.get(e.status_code, "invalid_request_error")), e.status_code,
                        headers=getattr(e, "headers", None))


async def _internal(request: Request, e: Exception):
    """Anything unforeseen still answers in OpenAI's shape (and is a bug to fix: client input gets a 4xx)."""
    return JSONResponse(error_body(f"internal error ({type(e).__name__}); the server keeps serving.",
                                   "server_error"), 500)


async def _invalid(request: Request, e: RequestValidationError):
    first = e.errors()[0] if e.errors() else {}
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body(f"the request body is not valid JSON ({first.get('msg', '')})."), 400)
    where = ".".join(str(p) for p in first.get("loc", ())[1:])
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")  # pydantic's prefix
    return JSONResponse(error_body(f"{where}: {message}" if where else f"{message}.", param=where or None), 400)


class _TooLarge(Exception):
    pass


class Guard:
    """Plain ASGI middleware: the API key on every route but /health and the page, and the body size limit
    (by Content-Length, and counted for bodies sent without one)."""

    OPEN = ("/health", "/", "/index.html", "/page.js")

    def __init__(self, app, keys: set[str], max_body_bytes: int):
        self.app, self.keys, self.limit = app, keys, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.keys and scope["path"] not in self.OPEN and not scope["path"].startswith("/vendor/") \
                and scope["method"] != "OPTIONS":
            scheme, _, key = headers.get("authorization", "").partition(" ")
            # the scheme is case-insensitive (RFC 7235); keys are compared in constant time
            if scheme.lower() != "bearer" or not any(hmac.compare_digest(key.strip().encode(), k.encode())
                                                     for k in self.keys):
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
