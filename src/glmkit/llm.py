"""`glmkit.load()` and the LLM object it returns: a loaded model plus its reference forward path.

Builds the model on the meta device, fills it from the loader's tensors with strict accounting
(every parameter filled, no tensor left over, shapes checked) and moves it to the chosen device and
dtype. Tokenizers, generation and chat attach here as later parts land; no sampling code lives here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from glmkit import loaders
from glmkit.chat_format import ChatFormat, choose, pick
from glmkit.config import ModelConfig
from glmkit.engine.batch import Engine
from glmkit.engine.generate import complete, complete_batch, stream as stream_chunks
from glmkit.engine.sampling import SamplingParams
from glmkit.engine.sequence import Chunk, Completion
from glmkit.errors import CheckpointError, GlmkitError
from glmkit.hub import home
from glmkit.model import Transformer
from glmkit.positions import prompt_positions
from glmkit.tokenizer import Tokenizer, load_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# compiled decode steps are cached with glmkit's files (torch would otherwise pick /tmp, often wiped, and
# fixes the directory the first time anything touches its compiler, which loading can already do)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(home() / "inductor"))


class LLM:
    def __init__(self, model: Transformer, source: str, tokenizer: Tokenizer | None = None,
                 chat_format: ChatFormat | None = None):
        self.model = model.eval()
        self.config: ModelConfig = model.config
        self.source = source
        self._tokenizer = tokenizer
        self.chat_format = chat_format
        self._engine: Engine | None = None
        self.prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # P-tuning v2 prefix (load(ptuning=...))

    @property
    def engine(self) -> Engine:
        """The continuous-batching engine (created on first use); stops on the model's and the chat format's ids."""
        if self._engine is None:
            stops = set(self.config.eos_token_ids) | set(self.chat_format.stop_ids if self.chat_format else ())
            decode = None if self._tokenizer is None else (lambda ids: self._tokenizer.decode(ids, skip_special=True))
            self._engine = Engine(self.model, frozenset(stops), decode, prefix_kv=self.prefix_kv)
        return self._engine

    def compile(self, background: bool = False, build: bool = True):
        """Compile the one-token decode step (a package cached under $GLMKIT_HOME/compiled); single-sequence
        decoding uses it once ready and stays eager until then, or if compiling fails. build=False only
        uses a package already on disk (no compile). Returns the CompiledDecoder (.ready, .cached, .error,
        .seconds, .path, .wait())."""
        from glmkit.engine.compiled import CompiledDecoder

        decoder = CompiledDecoder(self.model)
        self.engine.compiled = decoder
        return decoder.compile_in_background(build) if background else decoder.compile(build)

    def encode_prompt(self, text: str) -> list[int]:
        """Plain text -> prompt ids, with the special tokens this generation puts around a prompt
        (ChatGLM-6B: text + [gMASK] <sop>; ChatGLM2/3, GLM-4: [gMASK] sop + text; others: as the tokenizer adds)."""
        ids = self.tokenizer.encode_prompt(text)
        return self.chat_format.wrap_plain(ids) if self.chat_format is not None else ids

    def generate(self, prompt: str | Sequence[int], *, stream: bool = False,
                 **sampling: Any) -> Completion | Iterator[Chunk]:
        """Complete text or token ids. Sampling: max_tokens, temperature (0 = greedy), top_p, top_k, min_p,
        repetition_penalty, presence_penalty, frequency_penalty, stop (strings), stop_token_ids, ignore_eos, seed."""
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        params = _params(sampling)
        return stream_chunks(self.engine, ids, params) if stream else complete(self.engine, ids, params)

    def generate_batch(self, prompts: list[str | Sequence[int]], **sampling: Any) -> list[Completion]:
        """One Completion per prompt, decoded together through continuous batching."""
        ids = [self.encode_prompt(p) if isinstance(p, str) else [int(i) for i in p] for p in prompts]
        return complete_batch(self.engine, ids, [_params(sampling) for _ in ids])

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None, stream: bool = False,
             truncate: str = "error", **sampling: Any):
        """Reply to OpenAI-style messages. Returns the assistant message as a dict (role, content,
        tool_calls when the model called a tool, finish_reason, usage), or with stream=True an iterator
        of {'delta': text, 'completion_tokens': n so far} dicts ending with that message. truncate='drop_oldest' drops the oldest turns
        of a conversation longer than the context instead of raising."""
        ids = self._fit(messages, tools, truncate)
        params = _params(sampling)
        if stream:
            return self._chat_stream(ids, tools, params)
        done = complete(self.engine, ids, params)
        return self._reply(done.text, tools, done.finish_reason, done.usage)

    def infill(self, prompt: str | Sequence[int], **sampling: Any) -> str | list[int]:
        """Fill every [MASK] of a prompt, left to right (GLM blank infilling; ChatGLM-6B-architecture models).

        Each blank is generated after <sop> until <eop>, with the positions of the GLM objective (the
        generated tokens sit at the blank's position, block positions counting from <sop>), and spliced in
        before the next blank is filled. Text in, text out; token ids in, token ids out."""
        c = self.config
        if c.positions != "2d" or c.mask_token_id is None or c.sop_token_id is None:
            raise GlmkitError("blank infilling needs a GLM (ChatGLM-6B-architecture) model with [MASK] and <sop>.")
        as_text = isinstance(prompt, str)
        ids = self.tokenizer.encode(prompt, allow_special=True) if as_text else [int(i) for i in prompt]
        if c.mask_token_id not in ids:
            raise GlmkitError("the prompt has no [MASK] to fill.")
        while c.mask_token_id in ids:
            ids = self.fill_first_blank(ids, self.generate(ids + [c.sop_token_id], **sampling).token_ids)
        return self.tokenizer.decode(ids) if as_text else ids

    def fill_first_blank(self, ids: list[int], fill: list[int]) -> list[int]:
        """ids with its first [MASK] replaced by fill; blank-structure tokens a weak model may emit inside a
        fill (<sop>, [MASK], [gMASK]) are dropped so the next blank keeps its GLM positions."""
        c = self.config
        structure = {c.sop_token_id, c.mask_token_id, c.gmask_token_id}
        at = ids.index(c.mask_token_id)
        return ids[:at] + [t for t in fill if t not in structure] + ids[at + 1:]

    def _chat_stream(self, ids, tools, params) -> Iterator[dict]:
        text, started, last, n = "", False, None, 0
        for chunk in stream_chunks(self.engine, ids, params):
            text, last, n = text + chunk.text, chunk, n + len(chunk.token_ids)
            piece = chunk.text if started else chunk.text.lstrip()
            started = started or bool(piece)
            if piece and not tools:  # a reply that may be a tool call is only known at its end
                yield {"delta": piece, "completion_tokens": n}
        usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
        yield self._reply(text, tools, last.finish_reason if last else "stop", usage)

    def _reply(self, text: str, tools, finish_reason: str, usage: dict) -> dict:
        message = self.chat_format.parse_reply(text, tools)
        if message.get("tool_calls"):
            finish_reason = "tool_calls"
        return {**message, "finish_reason": finish_reason, "usage": usage}

    def _fit(self, messages: list[dict], tools, truncate: str) -> list[int]:
        if truncate not in ("error", "drop_oldest"):
            raise GlmkitError(f"truncate must be 'error' or 'drop_oldest', got {truncate!r}.")
        messages = list(messages)
        ctx = self.config.max_seq_len
        while True:
            ids = self.apply_chat_template(messages, tools)
            if len(ids) < ctx:
                return ids
            turns = [i for i, m in enumerate(messages) if m.get("role") != "system"]
            last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
            if truncate == "error" or not turns or turns[0] == last_user:
                raise GlmkitError(f"the conversation has {len(ids)} tokens but this model's context is {ctx}; "
                                  "shorten the last message" + ("" if truncate != "error" else
                                                               " or pass truncate='drop_oldest'") + ".")
            nxt = next((i for i in turns[1:] if messages[i].get("role") == "user"), last_user)
            messages = [m for i, m in enumerate(messages) if m.get("role") == "system" or i >= nxt]

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise GlmkitError(f"{self.source} ships no tokenizer (tokenizer.json, tokenizer.model or ice_text.model); "
                              "pass token ids instead of text, or add the tokenizer files to the directory.")
        return self._tokenizer

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True) -> list[int]:
        """OpenAI-style messages -> prompt token ids in this model's own chat format."""
        return self.render_chat(messages, tools, add_generation_prompt)[0]

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True) -> tuple[list[int], list[bool]]:
        """Like apply_chat_template, plus the loss mask (True on the assistant's tokens)."""
        self.tokenizer  # a clear error first when there is no tokenizer at all
        if self.chat_format is None:
            raise GlmkitError(f"{self.source} has no chat format: no chat template in its tokenizer files and no GLM "
                              "role tokens. Use plain-text generation, or pass chat_format= to glmkit.load().")
        return self.chat_format.render(messages, tools, add_generation_prompt)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.inference_mode()
    def logits(self, ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor) -> torch.Tensor:
        """Full forward without a cache, the reference path: ids [T] or [B, T] -> logits [B, T, V] float32."""
        ids = self._as_batch(ids)
        positions, prefix_len = prompt_positions(ids, self.config)
        return self.model(ids, positions, prefix_len=prefix_len).float()

    def _as_batch(self, ids) -> torch.Tensor:
        t = ids if isinstance(ids, torch.Tensor) else torch.tensor(ids)
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2 or t.shape[1] == 0 or t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise GlmkitError(f"token ids must be a non-empty list of ints or a [batch, time] integer tensor, "
                              f"got shape {tuple(t.shape)} of {t.dtype}.")
        V, T = self.config.vocab_size, t.shape[1]
        if int(t.min()) < 0 or int(t.max()) >= V:
            raise GlmkitError(f"token id {int(t.max()) if int(t.max()) >= V else int(t.min())} is outside this "
                              f"model's vocabulary (0..{V - 1}).")
        if T > self.config.max_seq_len:
            raise GlmkitError(f"the input has {T} tokens but this model's context is {self.config.max_seq_len}; "
                              "shorten the input.")
        return t.long().to(self.device)

    def __repr__(self) -> str:
        c = self.config
        return (f"LLM({self.source!r}, layers={c.num_layers}, hidden={c.hidden_size}, heads={c.num_heads}/"
                f"{c.num_kv_heads}, vocab={c.vocab_size}, device={self.device}, dtype={self.dtype})")


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise GlmkitError(f"device {device!r} is not supported; use 'cpu' or 'cuda'.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GlmkitError("device 'cuda' was asked for but this torch build sees no CUDA GPU; use device='cpu' "
                          "or install a CUDA build of torch (see the README).")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if dtype not in _DTYPES:
        raise GlmkitError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}.")
    return _DTYPES[dtype]


def build_model(config: ModelConfig, tensors: dict[str, torch.Tensor], sources: dict[str, str],
                device: torch.device, dtype: torch.dtype) -> Transformer:
    """Meta-device model filled with `assign=True`; every parameter must come from the checkpoint."""
    model = Transformer.skeleton(config)
    expected = model.state_dict()
    for path in _official_quantized(model, tensors, expected, sources):  # ChatGLM -int4 / -int8 layers
        expected = {k: v for k, v in expected.items() if k.rsplit(".", 1)[0] != path}
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{sources[unexpected[0]]} has no place in this model (it would fill "
                              f"{unexpected[0]!r}); config.json and the weights disagree.")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"the checkpoint has no tensor for {missing[0]!r}"
                              f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; the download is "
                              "incomplete or config.json does not match the weights.")
    for name, param in expected.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise CheckpointError(f"{sources[name]} has shape {tuple(tensors[name].shape)} but config.json implies "
                                  f"{tuple(param.shape)} for {name!r}; config.json and the weights disagree.")
    # converted one tensor at a time and taken out of `tensors`, so a checkpoint is never held twice
    packed = [name for name, t in tensors.items() if not isinstance(t, torch.Tensor)]
    state = {name: tensors.pop(name).to(device=device, dtype=dtype) for name in list(tensors) if name not in packed}
    for name in packed:  # GGUF int4 / int8 blocks become quantized modules directly, never float
        from glmkit.loaders.gguf import Int4Blocks
        from glmkit.quant import Int4Linear, Int8Linear, TiedInt8Embedding, replace_module

        path, blocks = name.rsplit(".", 1)[0], tensors.pop(name)
        bias = state.pop(path + ".bias", None)
        if isinstance(blocks, Int4Blocks):
            module = Int4Linear(blocks.q, blocks.scales, blocks.zeros, 32, bias)
        else:  # Int8Rows
            module = Int8Linear.from_rows(blocks.shape, blocks.rows, bias)
        if path == "embed":  # a tied table kept 8-bit: the int8 head serves the embedding as well
            model.lm_head, model.embed = module, TiedInt8Embedding(module, dtype)
        else:
            replace_module(model, path, module)
    model.load_state_dict(state, strict=False, assign=True)  # completeness was checked above
    return model.to(device).requires_grad_(False)  # quantized layers were built on the CPU: moved (and repacked)


def _official_quantized(model: Transformer, tensors: dict, expected: dict, sources: dict) -> list[str]:
    """Official ChatGLM -int8 / -int4 layers: an int8 `weight` (int4: two values per byte, first in the high
    nibble) with a per-row `weight_scale` (row absmax / 127 or / 7) become int8 / int4 modules directly."""
    from glmkit.quant import Int4Linear, Int8Linear, replace_module

    done = []
    for scale_name in [n for n in tensors if n.endswith(".weight_scale")]:
        path = scale_name[: -len(".weight_scale")]
        scale, weight = tensors.pop(scale_name).float(), tensors.pop(path + ".weight", None)
        if weight is None or path + ".weight" not in expected:
            raise CheckpointError(f"{sources[scale_name]} has no quantized weight to go with it.")
        N, K = expected[path + ".weight"].shape
        bias = tensors.pop(path + ".bias", None)
        if tuple(weight.shape) == (N, K):
            module = Int8Linear(weight.to(torch.int8), scale, bias)
        elif tuple(weight.shape) == (N, K // 2):
            packed = weight.to(torch.int8).view(torch.uint8).to(torch.int16)
            signed = torch.stack([packed >> 4, packed & 15], dim=-1).view(N, K)  # (N, K), 0..15 two's complement
            values = torch.where(signed >= 8, signed - 16, signed)  # -8..7
            module = Int4Linear((values + 8).to(torch.uint8), scale[:, None].expand(N, K // 32).contiguous(),
                                torch.zeros(N, K // 32), 32, bias)
        else:
            raise CheckpointError(f"{sources[path + '.weight']} has shape {tuple(weight.shape)}; a quantized layer of "
                                  f"{(N, K)} needs {(N, K)} (int8) or {(N, K // 2)} (int4).")
        replace_module(model, path, module)
        done.append(path)
    return done


def load(source: str | Path | None = None, *, device: str | None = None, dtype: str | torch.dtype | None = None,
         quantize: str | None = None, chat_format: str | None = None, lora: str | Path | None = None,
         ptuning: str | Path | None = None) -> LLM:
    """Load a checkpoint directory (config.json + *.safetensors / *.bin, plus its tokenizer files), a .gguf file,
    a packaged alias ('smollm2-135m-instruct', also what None means) or a Hugging Face repo id, and return an LLM.
    `chat_format` forces a format ('chatglm1', 'chatglm2', 'chatglm3', 'glm4', 'jinja'). `lora`: a PEFT LoRA
    adapter directory, merged into float weights (kept beside quantized ones). `ptuning`: a P-tuning v2 prefix
    written by `glmkit train --ptuning N` (the engine's generation uses it; `logits()` does not)."""
    with _lean_heap():
        llm = _load(source, device, dtype, quantize, chat_format)
    if lora is not None:
        from glmkit.train.lora import add_lora, checkpoint_layout, lora_layers, merge, read_adapter

        settings, adapters = read_adapter(lora)
        add_lora(llm.model, checkpoint_layout(llm.source, llm.config), settings, adapters=adapters)
        floats = all(getattr(m.base, "weight", torch.empty(0, dtype=torch.int8)).is_floating_point()
                     for _, m in lora_layers(llm.model))
        if floats:
            merge(llm.model)
        llm.model.requires_grad_(False)
    if ptuning is not None:
        from glmkit.train.ptuning import load_prefix

        llm.prefix_kv = load_prefix(ptuning, llm.config)
    return llm


@contextlib.contextmanager
def _lean_heap():
    """While loading, give every allocation of 64 KiB or more its own mapping (glibc's M_MMAP_THRESHOLD), so
    the loader's large temporaries go back to the system when freed instead of fragmenting the heap (the
    default model's peak RSS: ~700 -> ~490 MB). Afterwards both thresholds are fixed where glibc's own adaptive
    ones end up (32 MiB, and 64 MiB for trimming), since fresh pages for every large activation would slow
    prefill. Elsewhere than glibc, a no-op."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        libc.malloc_trim(0)
        libc.mallopt(-3, 32 << 20)
        libc.mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD, as glibc's adaptive mode would set it (twice the above)


def _load(source, device, dtype, quantize, chat_format) -> LLM:
    from glmkit.hub import resolve

    source = resolve(source)  # None or an alias: the packaged model, pulled on first use
    if quantize not in (None, "int8", "int4"):
        raise GlmkitError(f"quantize={quantize!r} is not supported; use None, 'int8' or 'int4'.")
    dev = pick_device(device)
    saved = _glmkit_checkpoint(source)
    if saved is not None:  # written by `glmkit quantize`: its config records the quantized modules
        from glmkit.quant.checkpoint import load_quantized

        model = load_quantized(Path(source), saved, Transformer, pick_dtype(dtype or "bfloat16", dev)).to(dev)
        return LLM(model, str(source), *_tokenizer_and_format(source, None, model.config, chat_format))
    reader = None
    if str(source).lower().endswith(".gguf"):
        from glmkit.loaders.gguf import open_gguf

        reader = open_gguf(source)  # parsed once, for the weights, the tokenizer and the chat template
    if quantize is None and dtype is None and dev.type == "cpu" and reader is not None:
        quantize = _stored_quantization(reader)  # a quantized GGUF stays compact unless float is asked for
    if quantize is not None and dtype is None:
        dtype = "bfloat16"  # the weight-only kernels run fast with bfloat16 activations
    dtype = pick_dtype(dtype, dev)
    if reader is not None:  # the tokenizer first: its transient memory is gone before the weights arrive
        from glmkit.loaders.gguf import gguf_config

        tokenizer, fmt = _tokenizer_and_format(source, reader, gguf_config(reader, source), chat_format)
    config, tensors, sources = loaders.load(source, keep_int4=quantize == "int4", gguf_reader=reader, dtype=dtype,
                                            keep_int8=quantize is not None)
    if reader is None:
        tokenizer, fmt = _tokenizer_and_format(source, None, config, chat_format)
    reader = None  # the parsed header: let it go before the model is built (peak memory)
    # quantized modules are built on the CPU, then moved: a move repacks int4 weights for the device's kernel
    model = build_model(config, tensors, sources, torch.device("cpu") if quantize else dev, dtype)  # empties `tensors`
    if quantize is not None:
        from glmkit.quant import quantize_model

        model = quantize_model(model, bits=4 if quantize == "int4" else 8).to(dev)
    return LLM(model, str(source), tokenizer, fmt)


def _tokenizer_and_format(source, reader, config: ModelConfig, name: str | None):
    """The tokenizer and chat format of a checkpoint directory, or of a GGUF file's metadata (reader)."""
    if reader is not None:
        return _gguf_tokenizer_and_format(reader, source, config, name)
    tokenizer = load_tokenizer(source)
    return tokenizer, choose(source, tokenizer, config.eos_token_ids, name) if tokenizer is not None else None


def _gguf_tokenizer_and_format(reader, path, config: ModelConfig, name: str | None):
    from glmkit.loaders.gguf import metadata
    from glmkit.tokenizer import gguf_tokenizer

    if "tokenizer.ggml.model" not in reader.fields:
        return None, None  # weights only: generate from token ids
    kind = reader.fields["tokenizer.ggml.model"].contents()
    if kind not in ("gpt2", "llama"):
        import warnings

        warnings.warn(f"{path}: GGUF tokenizers of type {kind!r} are not supported yet; the model loads without a "
                      "tokenizer (generate from token ids).", stacklevel=3)
        return None, None
    tokenizer = gguf_tokenizer(reader)
    meta = metadata(reader)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    strings = {f"{key}_token": tokens[int(meta[f"tokenizer.ggml.{key}_token_id"])] for key in ("bos", "eos")
               if meta.get(f"tokenizer.ggml.{key}_token_id") is not None}
    return tokenizer, pick(tokenizer, meta.get("tokenizer.chat_template"), strings, config.eos_token_ids, name)


def _params(sampling: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**sampling)
    except TypeError as e:
        raise GlmkitError(f"unknown sampling parameter ({e}); see help(glmkit.LLM.generate).") from None


def _stored_quantization(reader) -> str | None:
    """'int4' / 'int8' for a GGUF (its reader) whose linear weights are 4-bit / 8-bit quantized, else None."""
    kinds = [t.tensor_type.name for t in reader.tensors if t.name.endswith("ffn_down.weight")]
    if kinds and all(k.startswith(("Q4", "Q5", "Q6", "Q2", "Q3", "IQ")) for k in kinds):
        return "int4"
    if kinds and all(k == "Q8_0" for k in kinds):
        return "int8"
    return None


def _glmkit_checkpoint(source) -> dict | None:
    """The config.json of a checkpoint written by `glmkit quantize`, else None."""
    import json

    from glmkit.quant.checkpoint import is_quantized_checkpoint

    path = Path(source) / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # the regular loader reports a broken config.json
    return raw if isinstance(raw, dict) and is_quantized_checkpoint(raw) else None
