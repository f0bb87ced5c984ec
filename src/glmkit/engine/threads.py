"""One thread computes in parallel: torch's OpenMP runtime (libgomp) gives every thread that runs a parallel
op a team of worker threads that lives as long as that thread, and once a process holds more such threads
than CPUs, every worker stops spinning between parallel regions and sleeps instead: each of the hundreds
of regions in a decode step then pays a wake-up (measured: the server's one-stream decode at 37 tok/s with
the loading thread's team alive beside the engine thread's, 80 tok/s without it).

So a server loads its model on a thread that ends (`on_own_thread`), and threads that run torch work beside
the engine (helpers for tokenizing, images, grammars; the event loop) run it single-threaded (`serial`).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any, Callable

import torch


def on_own_thread(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """fn(*args, **kwargs) on a new thread, waited for: the OpenMP team it starts ends with it."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            result.append((False, e))

    thread = threading.Thread(target=run, name="glmkit-load", daemon=True)  # Ctrl-C still ends the process
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value


def serial() -> None:
    """The calling thread runs torch ops on itself alone from now on (other threads keep their settings)."""
    torch.get_num_threads()  # torch's once-per-thread setup first, so it does not undo what follows
    try:
        ctypes.CDLL(None).omp_set_num_threads(1)  # OpenMP's thread count is a per-thread setting
    except (AttributeError, OSError):  # no OpenMP runtime in this build: nothing to limit
        pass
