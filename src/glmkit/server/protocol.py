"""uvicorn, adapted: HTTP protocols with a deadline for request heads (a connection that has not sent a complete
request line and headers within HEADER_TIMEOUT_S of opening, or of its previous response, is closed, so
half-sent requests cannot hold connections open forever; bodies and responses are timed by --timeout), on
httptools' parser when it is installed (a streamed token's chunk costs less to frame than through h11) and
h11's otherwise; and a server whose first Ctrl-C / SIGTERM ends every stream in flight at once (finish_reason
'abort', then [DONE]) before uvicorn's graceful shutdown; a second one exits immediately (uvicorn's own)."""

from __future__ import annotations

import asyncio
import functools

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0


class HeaderDeadline:
    """The deadline, for either protocol: armed when a connection opens and after each response, disarmed once
    a request head has arrived."""
    header_timeout = HEADER_TIMEOUT_S
    _head_timer: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expire(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()  # no request head arrived in time

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class HeaderTimeoutH11(HeaderDeadline, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # a request head arrived: its handling is timed by the app


@functools.cache
def http_protocol() -> type:
    """The protocol `glmkit serve` runs: httptools' when installed, else h11's, each with the head deadline."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return HeaderTimeoutH11

    class HeaderTimeoutHttpTools(HeaderDeadline, HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            self._disarm()  # a request head arrived: its handling is timed by the app

    return HeaderTimeoutHttpTools


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, worker):
        super().__init__(config)
        self.worker = worker
        worker.on_fatal = lambda: setattr(self, "should_exit", True)  # the model is gone (a lost rank): exit

    def handle_exit(self, sig, frame) -> None:
        self.worker.drain()  # thread-safe: a command to the engine thread
        super().handle_exit(sig, frame)
