"""GLM blank infilling at inference (ChatGLM-6B-architecture models): every [MASK] of a prompt is generated
after <sop> until <eop> at the GLM objective's positions and spliced in, left to right. Works on any object
with LLM's generate / tokenizer / config; no torch here.
"""

from __future__ import annotations

from typing import Any, Sequence

from glmkit.config import ModelConfig
from glmkit.errors import GlmkitError


def infill(llm, prompt: str | Sequence[int], **sampling: Any) -> str | list[int]:
    """Text in, text out; token ids in, token ids out."""
    c = llm.config
    if c.positions != "2d" or c.mask_token_id is None or c.sop_token_id is None:
        raise GlmkitError("blank infilling needs a GLM (ChatGLM-6B-architecture) model with [MASK] and <sop>.")
    as_text = isinstance(prompt, str)
    ids = llm.tokenizer.encode(prompt, allow_special=True) if as_text else [int(i) for i in prompt]
    if c.mask_token_id not in ids:
        raise GlmkitError("the prompt has no [MASK] to fill.")
    while c.mask_token_id in ids:
        ids = fill_first_blank(c, ids, llm.generate(ids + [c.sop_token_id], **sampling).token_ids)
    return llm.tokenizer.decode(ids) if as_text else ids


def fill_first_blank(c: ModelConfig, ids: list[int], fill: list[int]) -> list[int]:
    """ids with its first [MASK] replaced by fill; blank-structure tokens a weak model may emit inside a fill
    (<sop>, [MASK], [gMASK]) are dropped so the next blank keeps its GLM positions."""
    structure = {c.sop_token_id, c.mask_token_id, c.gmask_token_id}
    at = ids.index(c.mask_token_id)
    return ids[:at] + [t for t in fill if t not in structure] + ids[at + 1:]
