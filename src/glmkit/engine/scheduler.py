"""Continuous batching, the request side: many sequences decode together, joining and leaving between steps,
each with its own sampling parameters and stop rules.

Every cache row is a slot. A slot keeps its ids after its sequence ends, so a later prompt that extends
them (the next turn of a chat) prefills only the new tokens; ChatGLM-6B's bidirectional prefix changes with
every turn, so its prompts are always prefilled whole. Cancelling a sequence frees its slot at once. The
Scheduler decides what runs and hands the ModelRunner one StepInputs per step; it holds no tensors of its
own (sampling and detokenizing happen per Sequence) and knows nothing about tokenizers or HTTP.
"""

from __future__ import annotations

from collections import deque

from glmkit.engine.runner import ModelRunner, StepInputs
from glmkit.engine.sampling import SamplingParams
from glmkit.engine.sequence import Chunk, Sequence
from glmkit.errors import GlmkitError


class Scheduler:
    def __init__(self, runner: ModelRunner, stop_ids: frozenset[int] = frozenset(), decode=None, max_batch: int = 8):
        """decode: ids -> text, for streamed text and stop strings (None: ids only)."""
        self.runner, self.config = runner, runner.config
        self.stop_ids, self.decode, self.max_batch = frozenset(stop_ids), decode, max_batch
        self.slots: list[Sequence | None] = [None] * max_batch
        self.cached: list[list[int]] = [[] for _ in range(max_batch)]  # ids whose keys each slot holds
        self.waiting: deque[Sequence] = deque()
        self.reuse = self.config.attention_mask == "causal"

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
        seq = Sequence(prompt, params, self.stop_ids, self.decode, self.runner.device)
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
    def step(self) -> list[tuple[Sequence, Chunk]]:
        """Admit waiting sequences into free slots (prefill), then one decode step for all running ones."""
        out: list[tuple[Sequence, Chunk]] = []
        shared: dict = {}  # prompt ids -> (row, its logits (V,)) for the prompts prefilled in this step
        while self.waiting and None in self.slots:
            seq = self.waiting.popleft()
            try:
                chunk = self._prefill(seq, shared)
            except Exception as e:  # noqa: BLE001 - one prompt's failure ends that request only
                chunk = seq.fail(e, "prefill")
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

    def _prefill(self, seq: Sequence, shared: dict) -> Chunk | None:
        """Prefill a sequence's prompt into a free row; a prompt already prefilled in this step (n samples of one
        request) is copied from that row instead, and samples from the same logits."""
        key = tuple(seq.prompt)
        if key in shared and self._holds(shared[key][0], seq.prompt):
            row, logits = shared[key]
            slot = next(i for i, s in enumerate(self.slots) if s is None)
            seq.slot, self.slots[slot], self.cached[slot] = slot, seq, []
            self.runner.fork(row, slot, len(seq.prompt), len(seq.prompt) + seq.max_new)
            seq.prefilled, seq.fed = 0, len(seq.prompt)
            return seq.take(logits)
        free = [i for i, s in enumerate(self.slots) if s is None]
        slot = max(free, key=lambda i: (_common(self.cached[i], seq.prompt), -i))
        common = _common(self.cached[slot], seq.prompt) if self.reuse else 0
        common = min(common, len(seq.prompt) - 1)  # at least one token runs, to give the next logits
        seq.slot, self.slots[slot] = slot, seq
        self.cached[slot] = []
        inputs = StepInputs([slot], [seq.prompt[common:]], [common], seq.prompt, len(seq.prompt) + seq.max_new)
        logits = self.runner.step(inputs)[0]  # (V,); on failure the row holds nothing reusable (cached stays [])
        seq.prefilled, seq.fed = len(seq.prompt) - common, len(seq.prompt)
        shared[tuple(seq.prompt)] = (slot, logits)
        return seq.take(logits)

    def _holds(self, row: int, prompt: list[int]) -> bool:
        """Row `row` still holds `prompt`'s keys: its sequence runs there, or left them behind."""
        owner = self.slots[row]
        kept = owner.prompt if owner is not None else self.cached[row]
        return kept[: len(prompt)] == prompt

    def _decode(self, running: list[int], out: list) -> None:
        n = max(running) + 1
        tokens, starts = [[0] for _ in range(n)], [0] * n
        for row in range(n):
            seq = self.slots[row]
            if seq is None:  # idle row inside the batch: write past its cached ids, where nothing is kept
                starts[row] = min(len(self.cached[row]), self.runner.max_len - 1)
                self.cached[row] = self.cached[row][: starts[row]]
            else:
                tokens[row], starts[row] = [seq.ids[-1]], len(seq.ids) - 1  # the last sampled id goes here
        logits = self.runner.step(StepInputs(list(range(n)), tokens, starts))  # (n, V)
        for row in running:
            seq = self.slots[row]
            seq.fed = len(seq.ids)
            self._emit(seq, seq.take(logits[row]), out)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
