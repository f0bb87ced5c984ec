"""Streaming detokenization that never emits half a UTF-8 character.

Each step decodes a short window of ids (from a few tokens back) and emits only the text past what
was already emitted, holding back while the window ends in an incomplete character (U+FFFD). The
window keeps SentencePiece's leading-space marker and byte-fallback pieces in context, so the pieces
concatenate to `decode(all ids)`. Knows nothing about models or sampling.
"""

from __future__ import annotations

from typing import Callable

REPLACEMENT = "\ufffd"


class StreamingDetokenizer:
    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window starts here: context for the next piece
        self.read_offset = 0  # ids before this are already emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the new text that is safe to show (possibly '')."""
        self.ids.append(token_id)
        prefix = self.decode(self.ids[self.prefix_offset: self.read_offset])
        text = self.decode(self.ids[self.prefix_offset:])
        if len(text) <= len(prefix) or text.endswith(REPLACEMENT) or not text.startswith(prefix):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix):]

    def flush(self) -> str:
        """The rest of the text at the end of a stream (incomplete characters included, as decode shows them)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix = self.decode(self.ids[self.prefix_offset: self.read_offset])
        text = self.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]
