"""Continuous batching: many sequences decode together over one KV cache, joining and leaving
between steps, each with its own sampling parameters and stop rules.

Every cache row is a slot. A slot keeps its ids after its sequence ends, so a later prompt that
extends them (the next turn of a chat) prefills only the new tokens; ChatGLM-6B's bidirectional
prefix changes with every turn, so its prompts are always prefilled whole. Cancelling a sequence
frees its slot at once. The engine owns the cache and the positions and calls the pure model; it
knows nothing about tokenizers (it gets a decode function) or HTTP.
"""

from __future__ import annotations

from collections import deque

import torch

from glmkit.engine.sampling import SamplingParams
from glmkit.engine.sequence import Chunk, Sequence
from glmkit.errors import GlmkitError
from glmkit.kv_cache import KVCache
from glmkit.model import Transformer
from glmkit.positions import prompt_positions

CACHE_STEP = 256  # the cache grows in steps of this many positions


class Engine:
    def __init__(self, model: Transformer, stop_ids: frozenset[int] = frozenset(), decode=None,
                 max_batch: int = 8, prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        """prefix_kv: P-tuning v2 prefix keys and values, each (L, K, P, D), seen by every token as P extra
        past positions (real tokens keep their own positions)."""
        self.model, self.config = model, model.config
        self.stop_ids, self.decode, self.max_batch = frozenset(stop_ids), decode, max_batch
        self.device, self.dtype = model.device, model.dtype
        self.prefix = prefix_kv
        self.P = 0 if prefix_kv is None else prefix_kv[0].shape[2]
        self.cache: KVCache | None = None
        self.slots: list[Sequence | None] = [None] * max_batch
        self.cached: list[list[int]] = [[] for _ in range(max_batch)]  # ids whose keys each slot holds
        self.waiting: deque[Sequence] = deque()
        self.reuse = self.config.attention_mask == "causal"
        self.compiled = None  # a CompiledDecoder (engine/compiled.py) for steps with one running sequence

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: list[int], params: SamplingParams) -> Sequence:
        ctx = self.config.max_seq_len
        if not prompt:
            raise GlmkitError("the prompt is empty; give at least one token.")
        if len(prompt) >= ctx:
            raise GlmkitError(f"the prompt has {len(prompt)} tokens but this model's context is {ctx}; shorten it "
                              "(or drop older turns of the conversation).")
        if max(prompt) >= self.config.vocab_size or min(prompt) < 0:
            raise GlmkitError(f"the prompt holds token ids outside this model's vocabulary (0..{self.config.vocab_size - 1}).")
        seq = Sequence(prompt, params, self.stop_ids, self.decode, self.device)
        seq.max_new = min(params.max_tokens, ctx - len(prompt))
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    # ---------------------------------------------------------------------- step
    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, Chunk]]:
        """Admit waiting sequences into free slots (prefill), then one decode step for all running ones."""
        out: list[tuple[Sequence, Chunk]] = []
        while self.waiting and None in self.slots:
            seq = self.waiting.popleft()
            chunk = self._prefill(seq)
            self._emit(seq, chunk, out)
        running = [i for i, s in enumerate(self.slots) if s is not None]
        if running:
            self._decode(running, out)
        return out

    def _emit(self, seq: Sequence, chunk: Chunk | None, out: list) -> None:
        if chunk is not None:
            out.append((seq, chunk))
        if seq.done:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.slot is not None and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
            self.cached[seq.slot] = seq.ids[: seq.fed]
        seq.slot = None

    def _ensure_cache(self, length: int, rows: int) -> None:
        """Room for `length` positions in rows [0, rows): the cache grows with use, so one conversation
        holds one row, not max_batch."""
        length = min(-(-(length + self.P) // CACHE_STEP) * CACHE_STEP, self.config.max_seq_len + self.P)
        if self.cache is None:
            self.cache = KVCache(self.config, rows, length, dtype=self.dtype, device=self.device)
            if self.prefix is not None:
                self.cache.write_prefix(*self.prefix)
        else:
            new_rows = self.cache.grow(length, rows)
            if self.prefix is not None and new_rows:
                self.cache.rows(new_rows.start, new_rows.stop).write_prefix(*self.prefix)

    def _prefill(self, seq: Sequence) -> Chunk | None:
        free = [i for i, s in enumerate(self.slots) if s is None]
        slot = max(free, key=lambda i: (self._common(self.cached[i], seq.prompt), -i))
        common = self._common(self.cached[slot], seq.prompt) if self.reuse else 0
        common = min(common, len(seq.prompt) - 1)  # at least one token runs, to give the next logits
        seq.slot, self.slots[slot] = slot, seq
        self.cached[slot] = []
        self._ensure_cache(len(seq.prompt) + seq.max_new, slot + 1)
        ids = torch.tensor([seq.prompt], device=self.device)
        positions, prefix_len = prompt_positions(ids, self.config)
        if self.config.positions == "2d":
            seq.c = int(prefix_len[0])
            if seq.c == len(seq.prompt):
                raise GlmkitError("a ChatGLM-6B prompt must end with [gMASK] <sop> (or contain <sop>) before "
                                  "generation; the chat format adds them.")
            seq.m = int(positions[0, 0, seq.c])
        if prefix_len is not None:
            prefix_len = prefix_len + self.P
        h = self.model.hidden_states(ids[:, common:], positions[..., common:], self.cache.rows(slot, slot + 1),
                                     self.P + common, prefix_len)  # (1, T, C)
        logits = self.model.head(h[:, -1:])[0, -1]  # only the last position's logits are needed: (V,)
        seq.prefilled, seq.fed = len(seq.prompt) - common, len(seq.prompt)
        return self._sample(seq, logits)

    def _decode(self, running: list[int], out: list) -> None:
        hi = max(running) + 1
        tokens = torch.zeros(hi, 1, dtype=torch.long, device=self.device)
        start = torch.zeros(hi, dtype=torch.long, device=self.device)
        two_d = self.config.positions == "2d"
        positions = torch.zeros((hi, 2, 1) if two_d else (hi, 1), dtype=torch.long, device=self.device)
        for row in range(hi):
            seq = self.slots[row]
            if seq is None:  # idle row inside the batch: write past its cached ids, where nothing is kept
                start[row] = min(self.P + len(self.cached[row]), self.cache.max_len - 1)
                self.cached[row] = self.cached[row][: int(start[row]) - self.P]
                continue
            index = len(seq.ids) - 1  # the last sampled id goes here
            tokens[row, 0], start[row] = seq.ids[-1], self.P + index
            if two_d:
                positions[row, 0, 0], positions[row, 1, 0] = seq.m, index - seq.c + 1
            else:
                positions[row, 0] = index
        offsets = int(start[0]) if hi == 1 else start  # one row: a plain offset (no per-row scatter, no mask)
        if hi == 1 and self.compiled is not None and self.compiled.usable(offsets):  # the compiled one-token step
            logits = self.compiled(tokens, positions, self.cache.rows(0, 1), offsets)  # (1, V)
        else:
            logits = self.model(tokens, positions, self.cache.rows(0, hi), offsets)[:, -1]  # (hi, V)
        for row in running:
            seq = self.slots[row]
            seq.fed = len(seq.ids)
            self._emit(seq, self._sample(seq, logits[row]), out)

    def _sample(self, seq: Sequence, logits: torch.Tensor) -> Chunk | None:
        try:
            token = seq.sample(logits, seq.prompt, seq.output, seq.generator)
        except GlmkitError as e:  # NaN / Inf logits: end this sequence only, with the reason
            seq.error = str(e)
            return seq.finish("error")
        if seq.params.logprobs is not None:  # under the model's own distribution, before sampling filters
            lp = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(lp, seq.params.logprobs) if seq.params.logprobs else None
            alternatives = {} if top is None else dict(zip(top.indices.tolist(), top.values.tolist()))
            seq.logprobs.append((float(lp[token]), alternatives))
        return seq.accept(token)

    @staticmethod
    def _common(a: list[int], b: list[int]) -> int:
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        return n
