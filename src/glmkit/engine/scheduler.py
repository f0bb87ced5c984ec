"""Continuous batching, the request side: many sequences decode together, joining and leaving between steps,
each with its own sampling parameters and stop rules.

Every cache row is a slot. A slot keeps its ids after its sequence ends, so a later prompt that extends
them (the next turn of a chat) prefills only the new tokens; ChatGLM-6B's bidirectional prefix changes with
every turn, so its prompts are always prefilled whole. A step prefills at most `prefill_chunk` prompt tokens
in all: a longer prompt is prefilled a chunk a step while the others keep decoding, so one long prompt never
stalls the running streams for its whole length. Cancelling a sequence frees its slot at once. The
Scheduler decides what runs and hands the ModelRunner one StepInputs per step; it holds no tensors of its
own (sampling and detokenizing happen per Sequence) and knows nothing about tokenizers or HTTP.
"""

from __future__ import annotations

from collections import deque

from glmkit.engine.runner import ModelRunner, StepInputs
from glmkit.engine.sampling import SamplingParams
from glmkit.engine.sequence import Chunk, Sequence
from glmkit.errors import GlmkitError
from glmkit.parallel import RankLost


class Scheduler:
    def __init__(self, runner: ModelRunner, stop_ids: frozenset[int] = frozenset(), decode=None, max_batch: int = 8,
                 prefill_chunk: int = 256):
        """decode: ids -> text, for streamed text and stop strings (None: ids only)."""
        self.runner, self.config = runner, runner.config
        self.stop_ids, self.decode, self.max_batch = frozenset(stop_ids), decode, max_batch
        if prefill_chunk < 1:
            raise GlmkitError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}.")
        self.prefill_chunk = prefill_chunk
        self.prefilling: dict[Sequence, tuple[int, int]] = {}  # a prompt partly prefilled -> (next position, first)
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
        if seq.images and self.config.vision is None:
            raise GlmkitError("this model reads text only; send the request without images, or use a vision model.")
        seq.max_new = min(params.max_tokens, ctx - len(prompt))
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        seq.cancel()
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.prefilling.pop(seq, None)
        self._release(seq)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    # ---------------------------------------------------------------------- step
    def step(self) -> list[tuple[Sequence, Chunk]]:
        """Go on with prompts partly prefilled, admit waiting sequences into free slots (their prefill), all
        within one prefill budget; then one decode step for every sequence past its prefill."""
        out: list[tuple[Sequence, Chunk]] = []
        shared: dict = {}  # prompt ids -> (row, its logits (V,)) for the prompts prefilled in this step
        budget = self.prefill_chunk if self.reuse else 1 << 60  # ChatGLM-6B's prefix is prefilled whole
        for seq in list(self.prefilling):
            if budget <= 0:
                break
            budget -= self._advance(seq, budget, shared, out)
        while self.waiting and None in self.slots and budget > 0:
            if any(s.key == self.waiting[0].key for s in self.prefilling):
                break  # another sample of a prompt still prefilling: it copies that row once the prefill ends
            seq = self.waiting.popleft()
            try:
                budget -= self._admit(seq, budget, shared, out)
            except RankLost:
                raise  # the whole group is broken: not this request's failure
            except Exception as e:  # noqa: BLE001 - one prompt's failure ends that request only
                self.prefilling.pop(seq, None)
                self._emit(seq, seq.fail(e, "prefill"), out)
        running = [i for i, s in enumerate(self.slots) if s is not None and s not in self.prefilling]
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
            self.cached[seq.slot] = seq.keys[: seq.fed]
        seq.slot = None

    def _admit(self, seq: Sequence, budget: int, shared: dict, out: list) -> int:
        """Give a sequence a free row and prefill (part of) its prompt; -> the prompt tokens run. A prompt already
        prefilled in this step (n samples of one request) is copied from that row, and samples from its logits."""
        key = tuple(seq.key)
        if key in shared and self._holds(shared[key][0], seq.key):
            row, logits = shared[key]
            slot = next(i for i, s in enumerate(self.slots) if s is None)
            seq.slot, self.slots[slot], self.cached[slot] = slot, seq, []
            self.runner.fork(row, slot, len(seq.prompt), len(seq.prompt) + seq.max_new)
            seq.prefilled, seq.fed = 0, len(seq.prompt)
            self._emit(seq, seq.take(logits), out)
            return 0
        free = [i for i, s in enumerate(self.slots) if s is None]
        slot = max(free, key=lambda i: (_common(self.cached[i], seq.key), -i))
        common = _common(self.cached[slot], seq.key) if self.reuse else 0
        common = min(common, len(seq.prompt) - 1)  # at least one token runs, to give the next logits
        seq.slot, self.slots[slot] = slot, seq
        self.cached[slot] = []
        self.prefilling[seq] = (common, common)
        return self._advance(seq, budget, shared, out)

    def _advance(self, seq: Sequence, budget: int, shared: dict, out: list) -> int:
        """Prefill the next `budget` prompt tokens of a sequence; the last chunk gives its first token."""
        position, first = self.prefilling[seq]
        end = min(len(seq.prompt), position + budget)
        inputs = StepInputs([seq.slot], [seq.prompt[position:end]], [position], seq.prompt,
                            len(seq.prompt) + seq.max_new, seq.images)
        try:
            logits = self.runner.step(inputs)[0]  # (V,); on failure the row holds nothing reusable (cached stays [])
        except RankLost:
            raise
        except Exception as e:  # noqa: BLE001 - one prompt's failure ends that request only
            self.prefilling.pop(seq)
            self._emit(seq, seq.fail(e, "prefill"), out)
            return end - position
        seq.fed = end  # keys the row now holds (what a cancelled sequence leaves for reuse)
        if end < len(seq.prompt):
            self.prefilling[seq] = (end, first)
            return end - position
        del self.prefilling[seq]
        seq.prefilled = len(seq.prompt) - first
        shared[tuple(seq.key)] = (seq.slot, logits)
        self._emit(seq, seq.take(logits), out)
        return end - position

    def _holds(self, row: int, key: list) -> bool:
        """Row `row` still holds a prompt's keys (`key`: Sequence.key): its sequence runs there, or left them."""
        owner = self.slots[row]
        kept = owner.key if owner is not None else self.cached[row]
        return kept[: len(key)] == key

    def _decode(self, running: list[int], out: list) -> None:
        inputs = self._one_row(running[0]) if len(running) == 1 else self._all_rows(max(running) + 1)
        logits = self.runner.step(inputs)  # (rows, V)
        for i, row in enumerate(inputs.rows):
            seq = self.slots[row]
            if row in running:
                seq.fed = seq.length
                self._emit(seq, seq.take(logits[i]), out)

    def _one_row(self, row: int) -> StepInputs:
        """One stream, in whichever row: a one-row step (the compiled step's case), no idle rows beside it."""
        seq = self.slots[row]
        return StepInputs([row], [[seq.last_id]], [seq.length - 1])  # the last sampled id goes here

    def _all_rows(self, n: int) -> StepInputs:
        """Rows 0..n-1: the running ones with their last sampled id, the others written where nothing is kept."""
        tokens, starts = [[0] for _ in range(n)], [0] * n
        for row in range(n):
            seq = self.slots[row]
            if seq in self.prefilling:  # still prefilling: write where its next chunk will write over
                starts[row] = min(self.prefilling[seq][0], self.runner.max_len - 1)
            elif seq is None:  # idle row inside the batch: write past its cached ids, where nothing is kept
                starts[row] = min(len(self.cached[row]), self.runner.max_len - 1)
                self.cached[row] = self.cached[row][: starts[row]]
            else:
                tokens[row], starts[row] = [seq.last_id], seq.length - 1  # the last sampled id goes here
        return StepInputs(list(range(n)), tokens, starts)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
