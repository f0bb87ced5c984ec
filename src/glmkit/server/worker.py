"""The engine thread: one thread owns the (single-threaded) engine Scheduler and drives its steps; HTTP handlers
talk to it through a command queue and get chunks back on their own asyncio queues.

Admission is bounded: at most max_batch sequences run and max_queue wait; beyond that `submit`
refuses at once (the server answers 503). A handler that goes away cancels its sequence, which frees
the slot before the next step. No HTTP here.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

from glmkit.engine.scheduler import Scheduler
from glmkit.engine.sampling import SamplingParams
from glmkit.engine.sequence import Chunk, Sequence
from glmkit.parallel import RankLost


class Busy(Exception):
    """The waiting queue is full."""


@dataclass
class Handle:
    """A request's view of its sequence."""
    chunks: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    seq: Sequence | None = None
    done: bool = False


class EngineWorker:
    def __init__(self, engine: Scheduler, max_queue: int = 64):
        self.engine, self.max_queue = engine, max_queue
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.handles: dict[int, Handle] = {}  # id(seq) -> handle
        self.lock = threading.Lock()
        self.admitted = 0  # submitted and not finished
        self.stopping = False
        self.fatal: Exception | None = None  # what ended serving for good (a lost tensor-parallel rank)
        self.on_fatal: Callable[[], None] | None = None  # then called (glmkit serve: the server exits)
        self.thread = threading.Thread(target=self._run, name="glmkit-engine", daemon=True)
        self.thread.start()

    @property
    def capacity(self) -> int:
        return self.engine.max_batch + self.max_queue

    def submit(self, prompt: list[int], params: SamplingParams) -> Handle:
        with self.lock:
            if self.admitted >= self.capacity or self.stopping:
                raise Busy()
            self.admitted += 1
        handle = Handle(asyncio.Queue(), asyncio.get_running_loop())
        self.commands.put(("submit", prompt, params, handle))
        return handle

    def cancel(self, handle: Handle) -> None:
        if not handle.done:
            self.commands.put(("cancel", handle))

    def call(self, fn: Callable[[], Any]) -> "asyncio.Future":
        """Run fn on the engine thread (e.g. a reference forward pass, which sets its own inference mode) and
        await its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.commands.put(("call", fn, future, loop))
        return future

    def stop(self) -> None:
        self.stopping = True
        self.commands.put(("stop",))
        self.thread.join(timeout=10)

    def drain(self) -> None:
        """Shutting down: refuse new requests and end every sequence in flight now, each with a last chunk whose
        finish_reason is 'abort' (its client gets a proper end of stream, not a cut connection)."""
        self.stopping = True
        self.commands.put(("drain",))

    # ------------------------------------------------------------------ engine thread
    def _send(self, handle: Handle, item: Any) -> None:
        handle.loop.call_soon_threadsafe(handle.chunks.put_nowait, item)

    def _finish(self, handle: Handle) -> None:
        if not handle.done:
            handle.done = True
            with self.lock:
                self.admitted -= 1
            if handle.seq is not None:
                self.handles.pop(id(handle.seq), None)

    def _command(self, cmd: tuple) -> bool:
        kind = cmd[0]
        if kind in ("stop", "drain"):
            for handle in list(self.handles.values()):
                self.engine.cancel(handle.seq)
                self._send(handle, Chunk("", [], "abort") if kind == "drain" else
                           RuntimeError("the server is shutting down"))
                self._finish(handle)
            return kind == "drain"
        if kind == "submit":
            _, prompt, params, handle = cmd
            try:
                handle.seq = self.engine.submit(prompt, params)
                self.handles[id(handle.seq)] = handle
            except Exception as e:  # a prompt the engine refuses: report it to the handler
                self._send(handle, e)
                self._finish(handle)
        elif kind == "cancel":
            handle = cmd[1]
            if handle.seq is not None and not handle.done:
                self.engine.cancel(handle.seq)
            self._finish(handle)
        elif kind == "call":
            _, fn, future, loop = cmd
            try:
                result = fn()
                loop.call_soon_threadsafe(lambda: future.done() or future.set_result(result))
            except Exception as e:  # noqa: BLE001 - handed to the awaiting handler
                loop.call_soon_threadsafe(lambda e=e: future.done() or future.set_exception(e))
        return True

    def _run(self) -> None:
        while True:
            block = not self.engine.has_work
            try:
                while True:
                    cmd = self.commands.get(block=block, timeout=None if block else 0)
                    block = False
                    if not self._command(cmd):
                        return
            except queue.Empty:
                pass
            if not self.engine.has_work:
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 - keep serving; fail the sequences in flight
                for handle in list(self.handles.values()):
                    self.engine.cancel(handle.seq)
                    self._send(handle, e)
                    self._finish(handle)
                if isinstance(e, RankLost):  # the model is gone: answer everyone, then the server stops
                    self.fatal, self.stopping = e, True
                    if self.on_fatal is not None:
                        self.on_fatal()
                    return
                continue
            for seq, chunk in events:
                handle = self.handles.get(id(seq))
                if handle is None:
                    continue
                self._send(handle, chunk)
                if chunk.finish_reason is not None:  # (seq.done is already true for earlier chunks of this step)
                    self._finish(handle)
