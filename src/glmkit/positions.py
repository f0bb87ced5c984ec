"""Position ids (and ChatGLM-6B's prefix length) for a prompt, from the config's position kind.

1d: 0..T-1 for every row. 2d (ChatGLM-6B / the GLM objective): with c the index of the first <sop>
and m the index of the first [gMASK] (else the first [MASK]), tokens before c get (i, 0) and tokens
from c on get (m, i - c + 1); tokens before c attend to each other bidirectionally (prefix_len = c).
mrope (GLM-4.1V / 4.5V): text tokens get (i, i, i) continuing after what came before; an image's tokens get
(s, s + row, s + column) over its merged patch grid, s being where the image starts, and the text after it
starts at s + max(rows, columns). Decode positions continue from a per-sequence anchor (mrope: the offset
between positions and sequence indexes). No model code, no sampling: the engine and the reference path
both call these, so the engine never computes positions inline.
"""

from __future__ import annotations

import torch

from glmkit.config import ModelConfig
from glmkit.errors import GlmkitError


def prompt_positions(ids: torch.Tensor, config: ModelConfig,
                     grids: list[tuple[int, int, int]] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ids (B, T) -> positions (B, T), (B, 2, T) or (B, 3, T), and prefix_len (B,) or None for causal models.
    grids: the (t, h, w) patch grid of each image whose tokens the rows hold, in order (mrope)."""
    B, T = ids.shape
    if config.positions == "mrope":
        images = iter(grids)
        return torch.tensor([_mrope_row(row, config, images) for row in ids.tolist()], device=ids.device), None
    if config.positions == "1d":
        positions = torch.arange(T, device=ids.device).expand(B, T)
        prefix = None
        if config.attention_mask == "prefix":
            prefix = torch.tensor([_first(row, config.sop_token_id, T) for row in ids.tolist()], device=ids.device)
        return positions, prefix
    rows, prefix = [], []
    for row in ids.tolist():
        c = _first(row, config.sop_token_id, T)
        m = _first(row[:c], config.gmask_token_id, None)
        m = _first(row[:c], config.mask_token_id, None) if m is None else m
        if m is None and c < T:
            raise GlmkitError("a ChatGLM-6B prompt with <sop> needs a [gMASK] or [MASK] before it; "
                              "end the prompt with [gMASK] <sop> (the chat format does this).")
        rows.append([list(range(c)) + [m] * (T - c), [0] * c + list(range(1, T - c + 1))])
        prefix.append(c)
    return torch.tensor(rows, device=ids.device), torch.tensor(prefix, device=ids.device)


def _mrope_row(row: list[int], config: ModelConfig, images) -> list[list[int]]:
    """One prompt's (3, T) positions: text (i, i, i); an image's merged grid (s + t, s + row, s + column)."""
    merge = config.vision.spatial_merge_size if config.vision else 1
    image = config.vision.image_token_id if config.vision else None
    out: list[list[int]] = [[], [], []]
    i, next_pos = 0, 0
    while i < len(row):
        if row[i] != image:
            for stream in out:
                stream.append(next_pos)
            i, next_pos = i + 1, next_pos + 1
            continue
        t, h, w = next(images, (0, 0, 0))
        n = t * (h // merge) * (w // merge)
        if n == 0 or row[i: i + n] != [image] * n or (i + n < len(row) and row[i + n] == image):
            raise GlmkitError("the prompt's image placeholder tokens do not match the images given (each image "
                              "needs exactly its grid's count of <|image|> tokens); build prompts with the chat "
                              "format.")
        grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h // merge), torch.arange(w // merge),
                                          indexing="ij")).reshape(3, -1) + next_pos  # (3, n)
        for stream, values in zip(out, grid.tolist()):
            stream += values
        i, next_pos = i + n, next_pos + max(h, w) // merge
    return out


def _first(row: list[int], token: int | None, default):
    return row.index(token) if token is not None and token in row else default


def anchor(positions: torch.Tensor, prefix_len: torch.Tensor | None, config: ModelConfig) -> tuple[int, ...] | None:
    """What a sequence's decode positions hang on, from its prompt's positions (1, T) / (1, 2, T) / (1, 3, T): for
    2d the index c of <sop> and the mask position m; for mrope (position - index,) of the next token; None for
    1d."""
    if config.positions == "mrope":
        return (int(positions.max()) + 1 - positions.shape[-1],)
    if config.positions != "2d":
        return None
    c = int(prefix_len[0])
    if c == positions.shape[-1]:
        raise GlmkitError("a ChatGLM-6B prompt must end with [gMASK] <sop> (or contain <sop>) before generation; "
                          "the chat format adds them.")
    return c, int(positions[0, 0, c])


def decode_positions(indexes: list[int], anchors: list[tuple[int, int] | None], config: ModelConfig,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """The positions of one new token per row, at sequence index indexes[b]: (B, 1) for 1d, (B, 2, 1) for 2d
    ((m, index - c + 1): generated tokens sit at the mask's position and count block positions from <sop>),
    (B, 3, 1) for mrope (index + the row's offset on all three)."""
    if config.positions == "mrope":
        shifted = [i + (a[0] if a else 0) for i, a in zip(indexes, anchors)]
        return torch.tensor(shifted, device=device)[:, None, None].repeat(1, 3, 1)  # (B, 3, 1), contiguous
    if config.positions != "2d":
        return torch.tensor(indexes, device=device)[:, None]  # (B, 1)
    rows = [[[m], [i - c + 1]] if a is not None else [[0], [0]] for i, a in zip(indexes, anchors)
            for c, m in [a or (0, 0)]]
    return torch.tensor(rows, device=device)  # (B, 2, 1)
