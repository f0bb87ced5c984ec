"""Training data: text files and chat JSONL turned into samples, and samples collated into tensors.

Three objectives: "glm" (blank infilling, ChatGLM-6B-architecture models), "causal" (next token), "sft"
(chat conversations rendered by the model's chat format, loss on assistant tokens only). A sample is
fixed by (seed, epoch, index), so a run resumed at step n sees exactly the data an uninterrupted run
would. No model, no optimizer here.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from glmkit.config import ModelConfig
from glmkit.errors import GlmkitError, read_utf8
from glmkit.positions import prompt_positions
from glmkit.train.glm_objective import IGNORE, GLMTokens, Mixture, glm_sample

SENTENCE_END = (".", "?", "!", ";", ":", "。", "？", "！", "；", "…", "\n")


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # labels[i]: the token to predict at position i, or IGNORE
    position_ids: list[list[int]] | None = None  # GLM 2D positions; None: 0..T-1 (or from the prompt)
    prefix_len: int | None = None  # bidirectional prefix (GLM Part A); None: causal


def read_documents(paths: list[str | Path]) -> list[str]:
    """Plain-text files, one document per non-empty line ('\\n' inside a document may be written as '\\\\n')."""
    docs = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise GlmkitError(f"training data {path} does not exist; pass text files (one document per line).")
        docs += [line.replace("\\n", "\n") for line in read_utf8(path, "training data").splitlines() if line.strip()]
    if not docs:
        raise GlmkitError(f"the training data {[str(p) for p in paths]} holds no text.")
    return docs


def read_conversations(paths: list[str | Path]) -> list[dict]:
    """JSONL, one conversation per line: {"messages": [...], "tools": [...]?} or a bare list of messages
    in the OpenAI shape (roles system / user / assistant / tool, assistant tool_calls included)."""
    rows = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise GlmkitError(f"chat data {path} does not exist; pass JSONL files of conversations.")
        for n, line in enumerate(read_utf8(path, "chat data").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise GlmkitError(f"{path} line {n} is not JSON ({e.msg}); each line must be one conversation.") from None
            row = {"messages": row} if isinstance(row, list) else row
            if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
                raise GlmkitError(f"{path} line {n}: expected {{\"messages\": [...]}} or a list of messages.")
            rows.append(row)
    if not rows:
        raise GlmkitError(f"the chat data {[str(p) for p in paths]} holds no conversations.")
    return rows


def chunk_documents(token_docs: list[list[int]], size: int) -> list[list[int]]:
    """Split tokenized documents into pieces of at most `size` tokens (the last piece of each may be shorter)."""
    return [doc[i: i + size] for doc in token_docs for i in range(0, len(doc), size) if len(doc[i: i + size]) >= 2]


def causal_sample(tokens: list[int]) -> Sample:
    return Sample(tokens[:-1], tokens[1:])


def sft_sample(ids: list[int], loss_mask: list[bool], max_len: int) -> Sample:
    """A rendered conversation: each position predicts the next token where that token is trained."""
    ids, loss_mask = ids[: max_len + 1], loss_mask[: max_len + 1]
    labels = [t if m else IGNORE for t, m in zip(ids[1:], loss_mask[1:])]
    return Sample(ids[:-1], labels)


class Dataset:
    """Samples by index; `sample(i, epoch)` is deterministic. GLM samples draw their blanks from a
    random.Random seeded by (seed, epoch, i)."""

    def __init__(self, objective: str, items: list, *, seed: int = 0, glm_tokens: GLMTokens | None = None,
                 mixture: Mixture = Mixture(), sentence_ends: frozenset[int] = frozenset(), max_len: int = 512):
        self.objective, self.items, self.seed = objective, items, seed
        self.glm_tokens, self.mixture, self.sentence_ends, self.max_len = glm_tokens, mixture, sentence_ends, max_len
        self._order: tuple[int | None, list[int]] = (None, [])  # (epoch, its order): the last one computed

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, index: int, epoch: int = 0) -> Sample:
        item = self.items[index]
        if self.objective == "glm":
            rng = random.Random(f"{self.seed}/{epoch}/{index}")
            s = glm_sample(item, self.glm_tokens, rng, self.mixture, self.sentence_ends)
            return Sample(s.input_ids, s.labels, s.position_ids, s.prefix_len)
        if self.objective == "sft":
            return sft_sample(item[0], item[1], self.max_len)
        return causal_sample(item)

    def order(self, epoch: int) -> list[int]:
        """The visiting order of an epoch (a permutation fixed by seed and epoch; the last one is kept)."""
        if self._order[0] != epoch:
            order = list(range(len(self.items)))
            random.Random(f"{self.seed}/order/{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self._order[1]


def glm_chunk_size(max_len: int) -> int:
    """Tokens per GLM document so that Part A + Part B fit max_len: blanks add two tokens each ([MASK] and
    <sop>) and cover >= 1 token each, at most ~15% of the text (+1 span)."""
    return max(4, int((max_len - 3) / 1.32))


def collate(samples: list[Sample], pad_id: int, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample. Returns input_ids (B, T), labels (B, T), positions (B, T) or
    (B, 2, T), and prefix_len (B,) when the model uses a prefix mask."""
    T = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    for b, s in enumerate(samples):
        ids[b, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[b, : len(s.labels)] = torch.tensor(s.labels)
    positions, prefix_len = _positions(samples, ids, config)
    out = {"input_ids": ids, "labels": labels, "positions": positions}
    if prefix_len is not None:
        out["prefix_len"] = prefix_len
    return out


def _positions(samples: list[Sample], ids: torch.Tensor, config: ModelConfig):
    """GLM samples carry their 2D positions; other rows get the positions the model sees at inference
    (0..T-1, or ChatGLM-6B's 2D positions and prefix from [gMASK] <sop>). Padding takes position 0."""
    B, T = ids.shape
    positions = torch.zeros((B, 2, T) if config.positions == "2d" else (B, T), dtype=torch.long)
    prefix = torch.zeros(B, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        if s.position_ids is not None:
            positions[b, :, :n] = torch.tensor(s.position_ids)
            prefix[b] = s.prefix_len
            continue
        row, row_prefix = prompt_positions(ids[b: b + 1, :n], config)
        positions[b, ..., :n] = row[0]
        prefix[b] = 0 if row_prefix is None else row_prefix[0]
    return positions, prefix if config.attention_mask == "prefix" else None
