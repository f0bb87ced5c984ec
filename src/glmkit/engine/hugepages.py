"""Weights on 2 MiB pages: a decode step streams every weight once per token, and with 4 KiB pages the CPU's
prefetchers stop at each page boundary and its TLB misses every few kilobytes. On this project's 2-core
machine a plain read of 256 MiB ran at 26.5 GB/s on 4 KiB pages and 33.3 GB/s on huge pages, and the int8
compiled decode step (memory-bound) took 5.7-6.4 ms on 4 KiB pages, 4.9-5.8 ms on huge ones (alternating runs).

Linux gives a process huge pages only where it asks (transparent huge pages in "madvise" mode, the common
default), and glibc's malloc does not ask. `loaded(load)` runs a load (a compiled package, whose weights are
copied into memory malloc gives it) and tells which large anonymous mappings appeared meanwhile; `collapse`
moves them onto huge pages (madvise MADV_HUGEPAGE, then MADV_COLLAPSE, Linux 6.1+). Anywhere else, or when the kernel
refuses, nothing changes: this is only speed. GLMKIT_HUGE_PAGES=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any, Callable

HUGE = 2 << 20  # bytes in a huge page (x86-64 and arm64 with 4 KiB base pages)
MIN_BYTES = 8 << 20  # smaller mappings are left alone: the gain is in streaming big weights
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25


def _anonymous_mappings() -> set[tuple[int, int]]:
    """The process's private writable mappings backed by no file (malloc's large blocks), as (start, end)
    addresses; not the heap, whose growth holds small allocations."""
    spans = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if fields[1].startswith("rw") and len(fields) < 6:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                spans.add((lo, hi))
    return spans


def collapse(spans) -> int:
    """Move the whole 2 MiB pages inside each (start, end) span onto huge pages; -> bytes moved (0 where there
    is no madvise to call)."""
    if not spans:
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # no C library with madvise here: nothing to do
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    moved = 0
    for lo, hi in spans:
        a, b = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE  # the aligned inside of the span
        if b - a < MIN_BYTES:
            continue
        madvise(a, b - a, MADV_HUGEPAGE)  # later faults here take huge pages too
        if madvise(a, b - a, MADV_COLLAPSE) == 0:
            moved += b - a
    return moved


def wanted() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("GLMKIT_HUGE_PAGES", "1") != "0"


def loaded(load: Callable[[], Any]) -> tuple[Any, set[tuple[int, int]]]:
    """load() -> (its result, the anonymous mappings it created: collapse() moves them onto huge pages).
    Collapsing is kept apart so that a caller can start using what it loaded first (~0.9 s per GiB here)."""
    if not wanted():
        return load(), set()
    try:
        before = _anonymous_mappings()
    except OSError:  # no /proc: nothing to do
        return load(), set()
    result = load()
    return result, _anonymous_mappings() - before
