"""Driving the engine: one prompt to a Completion, one prompt as a stream of Chunks, many prompts at once.

All three go through the continuous-batching Scheduler, so single requests reuse a cached prefix (the
previous turn of a chat) exactly as batched ones do. Knows nothing about tokenization or chat formats.
"""

from __future__ import annotations

from typing import Iterator

from glmkit.engine.scheduler import Scheduler
from glmkit.engine.sampling import SamplingParams
from glmkit.engine.sequence import Chunk, Completion, Sequence
from glmkit.errors import GlmkitError


def stream(engine: Scheduler, prompt: list[int], params: SamplingParams) -> Iterator[Chunk]:
    """Yield chunks of one sequence until it finishes; closing the iterator cancels it."""
    seq = engine.submit(prompt, params)
    try:
        while not seq.done:
            for owner, chunk in engine.step():
                if owner is seq:
                    _raise_on_error(seq)
                    yield chunk
        _raise_on_error(seq)
    finally:
        if not seq.done:
            engine.cancel(seq)


def complete(engine: Scheduler, prompt: list[int], params: SamplingParams) -> Completion:
    seq = engine.submit(prompt, params)
    try:
        while not seq.done:
            engine.step()
    finally:
        if not seq.done:
            engine.cancel(seq)
    _raise_on_error(seq)
    return seq.completion()


def complete_batch(engine: Scheduler, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
    seqs: list[Sequence] = []
    try:
        seqs = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
        while any(not s.done for s in seqs):
            engine.step()
    finally:
        for s in seqs:
            if not s.done:
                engine.cancel(s)
    for s in seqs:
        _raise_on_error(s)
    return [s.completion() for s in seqs]


def _raise_on_error(seq: Sequence) -> None:
    if seq.error:
        raise GlmkitError(seq.error)
