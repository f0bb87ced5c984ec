"""The tensor side of the engine: `ModelRunner.step(StepInputs) -> logits`.

It owns the KV cache (grown in rows and length with use, the P-tuning prefix written into every row on
creation and growth), computes positions through positions.py for prompts and decode steps alike, and
runs the model, or a compiled decode step when one is ready (engine/compiled.py: one row, or rows
0..n-1). It knows nothing of requests, sampling or text: the scheduler says which ids go to which cache
row. This is the seam a tensor-parallel rank, a vision input or a draft model plugs into.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from glmkit.kv_cache import KVCache
from glmkit.model import Transformer
from glmkit.positions import anchor, decode_positions, prompt_positions

CACHE_STEP = 256  # the cache grows in steps of this many positions
_RUNNER_IDS = itertools.count()  # tensor parallelism: which runner of rank 0 a mirrored call is for


@dataclass
class StepInputs:
    """One step of work. A prefill: one cache row, `tokens` the next prompt ids to run (all those not cached yet,
    or a chunk of them), `prompt` the whole prompt (positions and the prefix mask depend on all of it),
    `reserve` the positions to make room for, `images` the prompt's images in order (each with .pixels, .grid
    and a .features slot the runner fills once). A decode step: rows 0..n-1, one id each (an idle row's id is
    0 and its start points past what it keeps), or one row, any.
    `starts[r]` is the sequence index of row r's first id (its cached length)."""
    rows: list[int]
    tokens: list[list[int]]
    starts: list[int]
    prompt: list[int] | None = None
    reserve: int = 0
    images: tuple = ()

    @property
    def is_prefill(self) -> bool:
        return self.prompt is not None


class ModelRunner:
    def __init__(self, model: Transformer, prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None):
        """prefix_kv: P-tuning v2 prefix keys and values, each (L, K, P, D), seen by every token as P extra past
        positions (real tokens keep their own positions)."""
        self.model, self.config = model, model.config
        self.device, self.dtype = model.device, model.dtype
        self.prefix = prefix_kv
        self.P = 0 if prefix_kv is None else prefix_kv[0].shape[2]
        self.cache: KVCache | None = None
        self.anchors: dict[int, tuple[int, int] | None] = {}  # cache row -> what its decode positions hang on
        self.compiled = None  # a CompiledDecoder (engine/compiled.py) for decode steps
        self.steps = dict.fromkeys(("prefill", "eager", "compiled", "compiled_rows"), 0)  # steps run, by path
        self._views: tuple = (None, {})  # (the cache buffer they view, {(lo, hi): row views})
        self.world, self.id = getattr(model, "tp", None), next(_RUNNER_IDS)  # rank 0's calls go to the others too

    def _mirror(self, *call) -> None:
        if self.world is not None and self.world.rank == 0:
            self.world.send((call[0], self.id, *call[1:]))

    @property
    def max_len(self) -> int:
        """Sequence positions a row can hold now (beyond the prefix)."""
        return 0 if self.cache is None else self.cache.max_len - self.P

    def reserve(self, length: int, rows: int) -> None:
        """Room for `length` positions in rows [0, rows): the cache grows with use, so one conversation holds
        one row, not max_batch."""
        length = min(-(-(length + self.P) // CACHE_STEP) * CACHE_STEP, self.config.max_seq_len + self.P)
        if self.cache is None:
            self.cache = KVCache(self.config, rows, length, dtype=self.dtype, device=self.device)
            if self.prefix is not None:
                self.cache.write_prefix(*self.prefix)
            return
        new_rows = self.cache.grow(length, rows)
        if self.prefix is not None and new_rows:
            self.cache.rows(new_rows.start, new_rows.stop).write_prefix(*self.prefix)

    @torch.inference_mode()
    def fork(self, src: int, dst: int, length: int, reserve: int) -> None:
        """Row dst starts as a copy of row src's first `length` positions (and its position anchor), with room
        for `reserve` positions: a second sample of the same prompt without a second prefill."""
        self._mirror("fork", src, dst, length, reserve)
        self.reserve(reserve, dst + 1)
        self.cache.copy_row(src, dst, self.P + length)
        self.anchors[dst] = self.anchors.get(src)

    @torch.inference_mode()
    def step(self, inputs: StepInputs) -> torch.Tensor:
        """-> the logits after each row's last id, (rows, V)."""
        self._mirror("step", inputs)
        if inputs.is_prefill:
            self.steps["prefill"] += 1
            return self._prefill(inputs)
        return self._decode(inputs)

    def _prefill(self, inputs: StepInputs) -> torch.Tensor:
        row, common = inputs.rows[0], inputs.starts[0]
        end = common + len(inputs.tokens[0])
        self.reserve(inputs.reserve, row + 1)
        ids = torch.tensor([inputs.prompt], device=self.device)  # (1, T): the whole prompt
        positions, prefix_len = prompt_positions(ids, self.config, [image.grid for image in inputs.images])
        self.anchors[row] = anchor(positions, prefix_len, self.config)
        if prefix_len is not None:
            prefix_len = prefix_len + self.P
        start = self.P + common
        if end - common == 1 and not inputs.images and prefix_len is None and self.compiled is not None \
                and self.compiled.usable(start):  # all but the last id cached (a repeated prompt): a decode step
            return self.compiled(ids[:, common:end], positions[..., common:end], self._rows(row, row + 1), start)
        embeds = self.image_embeddings(ids, inputs.images)[:, common:end] if inputs.images else None  # (1, t, C)
        h = self.model.hidden_states(ids[:, common:end], positions[..., common:end], self.cache.rows(row, row + 1),
                                     start, prefix_len, embeds)  # (1, t, C)
        return self.model.head(h[:, -1:])[:, -1]  # only the last position's logits are needed: (1, V)

    def image_embeddings(self, ids: torch.Tensor, images) -> torch.Tensor:
        """The prompt's embeddings (1, T, C) with each image's features at its tokens; an image's features are
        computed once (kept on it) however many chunks or samples its prompt is prefilled in."""
        for image in images:
            if getattr(image, "features", None) is None:
                pixels = image.pixels.to(self.device, self.model.visual.patch_embed.proj.weight.dtype)
                image.features = self.model.visual(pixels, [image.grid])  # (n, C)
        return self.model.embeddings(ids, torch.cat([image.features for image in images]))

    def _decode(self, inputs: StepInputs) -> torch.Tensor:
        n = len(inputs.rows)
        tokens = torch.tensor([t[0] for t in inputs.tokens], device=self.device)[:, None]  # (n, 1)
        anchors = [self.anchors.get(r) for r in inputs.rows]
        positions = decode_positions(inputs.starts, anchors, self.config, self.device)  # (n, 1) or (n, 2, 1)
        if n == 1:  # one row, whichever it is: a plain offset (no per-row scatter, no mask), the compiled step
            row, start = inputs.rows[0], self.P + inputs.starts[0]
            cache = self._rows(row, row + 1)
            if self.compiled is not None and self.compiled.usable(start):  # the compiled one-token step
                self.steps["compiled"] += 1
                return self.compiled(tokens, positions, cache, start)  # (1, V)
            self.steps["eager"] += 1
            return self.model(tokens, positions, cache, start)[:, -1]  # (1, V)
        start = torch.tensor(inputs.starts, device=self.device) + self.P  # (n,): rows 0..n-1
        attended = self.P + max(inputs.starts) + 1
        if self.compiled is not None and self.compiled.usable_rows(n, attended):  # the compiled rows step
            self.steps["compiled_rows"] += 1
            return self.compiled.rows(tokens, positions, start, self._rows(0, n), attended)  # (n, V)
        self.steps["eager"] += 1
        return self.model(tokens, positions, self._rows(0, n), start)[:, -1]  # (n, V)

    def _rows(self, lo: int, hi: int) -> KVCache:
        """cache.rows(lo, hi), kept while the cache's buffers stay the same (a decode step would otherwise slice
        every layer's buffers again: two views a layer, each token)."""
        if self._views[0] is not self.cache.k[0]:
            self._views = (self.cache.k[0], {})
        views = self._views[1]
        if (lo, hi) not in views:
            views[(lo, hi)] = self.cache.rows(lo, hi)
        return views[(lo, hi)]
