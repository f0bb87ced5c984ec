"""`glmkit.load()` and the LLM it returns: a facade over loaders, tokenizer, chat format and engine.

load() composes open (resolve the source, read its layout and config) -> tokenizer and chat format (before the
weights: peak memory) -> assemble (the strictly accounted, possibly quantized model) -> adapters. LLM offers
generate / generate_batch / chat / logits / infill / apply_chat_template; `make_engine` builds a fresh engine
from its public settings (the server owns one that way). No sampling, loading or format code here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from typing_extensions import Unpack

from glmkit import forward, images, loaders, parallel
from glmkit import infill as blanks
from glmkit.adapters import apply_lora, load_prefix
from glmkit.chat import (ChatDelta, ChatFormat, ChatReply, ChatTurn, fit_conversation, reply_decoder,
                         tokenizer_and_format)
from glmkit.config import ModelConfig
from glmkit.engine.follow import lead_or_follow
from glmkit.engine.generate import complete, complete_batch, stream as stream_chunks
from glmkit.engine.runner import ModelRunner
from glmkit.engine.sampling import Sampling, SamplingParams, sampling_defaults
from glmkit.engine.scheduler import Scheduler
from glmkit.engine.sequence import Chunk, Completion
from glmkit.errors import GlmkitError
from glmkit.grammar import Grammar, Grammars
from glmkit.loaders.hub import home
from glmkit.loaders.layouts import Layout
from glmkit.model import Transformer
from glmkit.tokenizer import Tokenizer

# compiled steps are cached with glmkit's files (torch would pick /tmp, often wiped, once anything touches it)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(home() / "inductor"))


def compiled_dir() -> Path:
    """Where compiled decode steps are kept: $GLMKIT_HOME/compiled."""
    return home() / "compiled"


class LLM:
    def __init__(self, model: Transformer, source: str, tokenizer: Tokenizer | None = None,
                 chat_format: ChatFormat | None = None, *, layout: Layout | None = None,
                 prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None, generation: dict | None = None,
                 weight_files: list | None = None):
        self.model, self.weight_files = model.eval(), weight_files  # the files weights came from (file_identity)
        self.config: ModelConfig = model.config
        self.source, self.layout = source, layout
        self._tokenizer, self.chat_format = tokenizer, chat_format
        self.prefix_kv = prefix_kv  # P-tuning v2 prefix (load(ptuning=...)): every engine puts it in its cache
        self.compiled = None  # the CompiledDecoder of llm.compile(), handed to every engine
        self._engine: Scheduler | None = None
        self._grammars: Grammars | None = None
        self.preprocessor, self.image_limits = {}, images.Limits()  # preprocessor_config.json; per-request bounds
        generation = generation or {}
        self.defaults = sampling_defaults(generation)  # what sampling arguments left out mean (README: Sampling)
        eos = generation.get("eos_token_id")
        self.extra_stop_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int)}

    @property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end a reply: the config's EOS, the chat format's and generation_config.json's."""
        return frozenset(set(self.config.eos_token_ids) | set(self.chat_format.stop_ids if self.chat_format else ())
                         | self.extra_stop_ids)

    @property
    def grammars(self) -> Grammars:  # the grammar compiler for structured outputs (vocabulary read on first use)
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.config.vocab_size, self.stop_ids)
        return self._grammars

    def output_grammar(self, response_format: dict | None = None, tools: list[dict] | None = None,
                       tool_choice: Any = None) -> Grammar | None:
        """The grammar a reply must follow (Grammars.for_reply: a forced tool call, else a response_format)."""
        return self.grammars.for_reply(self.chat_format, response_format, tools, tool_choice)

    def make_engine(self, max_batch: int = 8, prefill_chunk: int = 256) -> Scheduler:
        """A new continuous-batching engine over this model: its stop ids, detokenizer, prefix and compiled step."""
        decode = None if self._tokenizer is None else reply_decoder(self._tokenizer, self.chat_format)
        (runner := ModelRunner(self.model, self.prefix_kv)).compiled = self.compiled
        return Scheduler(runner, self.stop_ids, decode, max_batch=max_batch, prefill_chunk=prefill_chunk)

    @property
    def engine(self) -> Scheduler:
        """This LLM's own engine (created on first use), which generate / chat run on."""
        if self._engine is None:
            self._engine = self.make_engine()
        return self._engine

    def compile(self, background: bool = False, build: bool = True, on_ready=None, batched: bool = True):
        """Compile the decode steps (one row; batched: also 2..16) under $GLMKIT_HOME/compiled, used once ready (eager till
        then or on failure); build=False takes packages on disk only; on_ready(decoder): one row usable. -> CompiledDecoder."""
        from glmkit.engine.compiled import CompiledDecoder

        self.compiled = self.engine.runner.compiled = CompiledDecoder(self.model, compiled_dir(), self.source,
                                                                      self.weight_files, on_ready, batched)
        return self.compiled.compile_in_background(build) if background else self.compiled.compile(build)

    def sampling_params(self, **sampling: Unpack[Sampling]) -> SamplingParams:
        """Sampling arguments over this model's defaults (`llm.defaults`), checked; response_format -> its grammar."""
        sampling = {k: v for k, v in sampling.items() if v is not None}
        if "response_format" in sampling:
            sampling["grammar"] = self.output_grammar(sampling.pop("response_format")) or sampling.get("grammar")
        try:
            return SamplingParams(**{**self.defaults, **sampling})
        except TypeError as e:
            raise GlmkitError(f"unknown sampling parameter ({e}); see help(glmkit.LLM.generate).") from None

    def encode_prompt(self, text: str) -> list[int]:
        """Plain text -> prompt ids with the special tokens this generation puts around a prompt ([gMASK] <sop> ...)."""
        ids = self.tokenizer.encode_prompt(text)
        return self.chat_format.wrap_plain(ids) if self.chat_format is not None else ids

    def _ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.encode_prompt(prompt)
        if isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
            raise GlmkitError("generate() takes text or token ids; for chat messages use llm.chat(messages).")
        try:
            return prompt if hasattr(prompt, "images") else [int(i) for i in prompt]  # an ImagePrompt keeps its images
        except (TypeError, ValueError):
            raise GlmkitError(f"a prompt is text or a list of token ids, got {type(prompt).__name__}.") from None

    def generate(self, prompt: str | Sequence[int], *, stream: bool = False,
                 **sampling: Unpack[Sampling]) -> Completion | Iterator[Chunk]:
        """Complete text or token ids: a Completion (.text, .token_ids, .finish_reason, .usage, .logprobs), or with
        stream=True an iterator of Chunks. Sampling arguments: engine.sampling.Sampling (max_tokens, temperature
        (0 = greedy), top_p, ..., seed, logprobs, response_format); those left out take `llm.defaults`."""
        ids, params = self._ids(prompt), self.sampling_params(**sampling)
        return stream_chunks(self.engine, ids, params) if stream else complete(self.engine, ids, params)

    def generate_batch(self, prompts: list[str | Sequence[int]], **sampling: Unpack[Sampling]) -> list[Completion]:
        """One Completion per prompt, decoded together through continuous batching."""
        ids = [self._ids(p) for p in prompts]
        return complete_batch(self.engine, ids, [self.sampling_params(**sampling) for _ in ids])

    def chat(self, messages: list[dict], *, tools: list[dict] | None = None, tool_choice: Any = None,
             stream: bool = False, truncate: str = "error", chat_template_kwargs: dict | None = None,
             **sampling: Unpack[Sampling]) -> ChatReply | Iterator[ChatDelta | ChatReply]:
        """Reply to OpenAI-style messages: a ChatReply (the assistant message as a dict: role, content,
        reasoning_content, tool_calls, finish_reason, usage; also as attributes), or with stream=True ChatDeltas
        ({'delta': text, 'completion_tokens': n, + reasoning_content / tool_calls pieces}) ending with it.
        tool_choice 'required' or {'type': 'function', 'function': {'name': ...}} forces a call (constrained
        decoding). truncate='drop_oldest' drops the oldest turns of a conversation longer than the context."""
        tools = None if tool_choice == "none" else tools
        ids = fit_conversation(lambda m: self.apply_chat_template(m, tools, **(chat_template_kwargs or {})), messages,
                               self.config.max_seq_len, truncate)
        forced = self.output_grammar(tools=tools, tool_choice=tool_choice)
        params = self.sampling_params(**sampling, **({"grammar": forced} if forced is not None else {}))
        turn = ChatTurn(self.chat_format, tools, ids)
        if stream:
            return self._chat_stream(ids, turn, params)
        done = complete(self.engine, ids, params)
        turn.feed(done.text, len(done.token_ids), done.finish_reason)
        return turn.reply()

    def _chat_stream(self, ids: list[int], turn: ChatTurn, params: SamplingParams) -> Iterator[ChatDelta | ChatReply]:
        for chunk in stream_chunks(self.engine, ids, params):
            piece = ChatDelta.of(turn.feed(chunk.text, len(chunk.token_ids), chunk.finish_reason), turn.tokens)
            if piece is not None:
                yield piece
        yield turn.reply()

    def infill(self, prompt: str | Sequence[int], **sampling: Any) -> str | list[int]:
        """Fill every [MASK] of a prompt, left to right (GLM blank infilling, ChatGLM-6B architecture); text or ids."""
        return blanks.infill(self, prompt, **sampling)

    def fill_first_blank(self, ids: list[int], fill: list[int]) -> list[int]:
        return blanks.fill_first_blank(self.config, ids, fill)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise GlmkitError(f"{self.source} ships no tokenizer (tokenizer.json, tokenizer.model or ice_text.model); "
                              "pass token ids instead of text, or add the tokenizer files to the directory.")
        return self._tokenizer

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        """OpenAI-style messages -> prompt token ids in this model's own chat format; template_kwargs
        (enable_thinking=False, ...) reach a Jinja template as transformers passes them."""
        self.tokenizer  # a clear error first when there is no tokenizer at all
        if self.chat_format is None:
            raise GlmkitError(f"{self.source} has no chat format: no chat template in its tokenizer files and no GLM "
                              "role tokens. Use plain-text generation, or pass chat_format= to glmkit.load().")
        render = lambda m: self.chat_format.render(m, tools, add_generation_prompt, **template_kwargs)[0]  # noqa: E731
        return images.chat_prompt(messages, render, self.config.vision, self.preprocessor, self.image_limits,
                                  getattr(self.chat_format, "template", None) is not None)  # images read, expanded

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def logits(self, ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor) -> torch.Tensor:
        """Full forward without a cache, the reference path: ids [T] or [B, T] -> logits [B, T, V] float32."""
        return forward.logits(self.model, self._as_batch(ids))

    def prompt_logprobs(self, ids: Sequence[int], top: int = 0,
                        chunk: int = 256) -> list[tuple[int, float | None, dict[int, float]]]:
        """Per prompt token: (id, its log-probability given the tokens before it, the `top` likeliest ids there).
        One forward; the head and log-softmax run `chunk` positions at a time, so memory stays chunk x V."""
        return forward.prompt_logprobs(self.model, self._as_batch(ids), top, chunk)

    def embed(self, inputs: Sequence[str | Sequence[int]], pooling: str = "mean",
              normalize: bool = True) -> torch.Tensor:
        """Texts or token-id lists -> embeddings (N, C) float32: the final-normed hidden states of each input,
        averaged over its tokens ('mean') or taken at its last token ('last'), scaled to unit length. One forward
        per input, no cache."""
        batches = [self._as_batch(self.tokenizer.encode_prompt(x) if isinstance(x, str) else list(x)) for x in inputs]
        return forward.embed(self.model, batches, pooling, normalize)

    def _as_batch(self, ids) -> torch.Tensor:
        return forward.as_batch(ids, self.config, self.device)

    def __repr__(self) -> str:
        c = self.config
        return f"LLM({self.source!r}, layers={c.num_layers}, hidden={c.hidden_size}, device={self.device}, dtype={self.dtype})"


def load(source: str | Path | None = None, *, device: str | None = None, dtype: str | torch.dtype | None = None,
         quantize: str | None = None, chat_format: str | None = None, lora: str | Path | None = None,
         ptuning: str | Path | None = None) -> LLM:
    """Load a checkpoint directory (config.json + *.safetensors / *.bin, plus its tokenizer files), a .gguf file,
    a packaged alias ('smollm2-135m-instruct', also what None means) or a Hugging Face repo id, and return an LLM.
    `chat_format` forces a format ('chatglm1', 'chatglm2', 'chatglm3', 'glm4', 'glm45', 'jinja'). `lora`: a PEFT LoRA
    adapter directory, merged into float weights (kept beside quantized ones). `ptuning`: a P-tuning v2 prefix
    written by `glmkit train --ptuning N` (the engine's generation uses it; `logits()` does not)."""
    with loaders.lean_heap():  # the whole load, tokenizer included, with glibc's heap tuned for it
        checkpoint = loaders.open(source)
        tokenizer, fmt = tokenizer_and_format(checkpoint, chat_format)
        checkpoint.release_metadata()  # the vocabulary's header copy goes before the weights arrive (peak memory)
        world = parallel.from_env(device)  # under torchrun: this rank's share of the model
        model = loaders.assemble(checkpoint, Transformer.skeleton, device, dtype, quantize, world=world)
    if lora is not None:
        apply_lora(model, checkpoint.layout.adapter_names, lora)
    prefix = None if ptuning is None else load_prefix(ptuning, model.config)
    lead_or_follow(model, prefix)  # ranks other than 0 follow rank 0 from here, and end with it
    llm = LLM(model, checkpoint.source, tokenizer, fmt, layout=checkpoint.layout, prefix_kv=prefix,
              generation=checkpoint.generation, weight_files=loaders.file_identity(checkpoint.source, lora))
    llm.preprocessor = checkpoint.preprocessor  # a vision model's image settings (preprocessor_config.json)
    return llm
