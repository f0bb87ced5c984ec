"""Chat formats: messages -> prompt ids (native GLM renderers and Jinja templates), tool calls, and `ChatTurn`,
the one reading of a streamed reply used by LLM.chat, the server and the CLI.

`pick` chooses a checkpoint's format from its tokenizer and template (never from its name); the loaders
find the files, `tokenizer_and_format` builds both from an opened checkpoint. No torch, no model.
"""

from __future__ import annotations

import json
import warnings

from glmkit.chat.base import ChatFormat, normalize, split_images
from glmkit.chat.glm import FORMATS, ChatGLM1Format, ChatGLM2Format, ChatGLM3Format, GLM4Format
from glmkit.chat.glm45 import Glm45Format
from glmkit.chat.jinja import JinjaFormat
from glmkit.chat.turn import ChatDelta, ChatReply, ChatTurn, fit_conversation
from glmkit.errors import GlmkitError
from glmkit.tokenizer import (ChatGLM1Tokenizer, SentencePieceTokenizer, TiktokenTokenizer, Tokenizer, gguf_tokenizer,
                              load_tokenizer)


def special_strings(tok_config: dict) -> dict[str, str]:
    """bos_token, eos_token, ... as plain strings, as transformers hands them to templates."""
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        value = tok_config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out


def pick(tokenizer: Tokenizer, template: str | None, tok_config: dict, eos_ids: tuple[int, ...] = (),
         name: str | None = None) -> ChatFormat | None:
    """The chat format for a tokenizer, its Jinja template (if any) and its tokenizer_config-style settings;
    `name` forces one ('chatglm1', 'chatglm2', 'chatglm3', 'glm4', 'glm45', 'jinja'), refused clearly when it does
    not fit ('glm45' renders with the checkpoint's template, or natively without one).

    ChatGLM2 and ChatGLM3 share one tokenizer: a ChatGLM SentencePiece vocabulary counts as ChatGLM3
    when tokenizer_config.json has a chat template or mentions its role tokens, else as ChatGLM2."""
    def jinja(kind=None) -> JinjaFormat:
        strings = special_strings(tok_config)
        stops = set(eos_ids) | ({tokenizer.special[strings["eos_token"]]}
                                if strings.get("eos_token") in tokenizer.special else set())
        kind = kind or (Glm45Format if "<arg_key>" in template else JinjaFormat)  # GLM-4.5 on: thinking, XML calls
        return kind(tokenizer, template, strings, stops)

    if name is not None:
        return _forced(name, tokenizer, template, jinja)
    if isinstance(tokenizer, ChatGLM1Tokenizer):
        return ChatGLM1Format(tokenizer)
    if isinstance(tokenizer, SentencePieceTokenizer) and "[gMASK]" in tokenizer.special:
        v3 = template is not None or "<|user|>" in json.dumps(tok_config, ensure_ascii=False)
        return ChatGLM3Format(tokenizer) if v3 else ChatGLM2Format(tokenizer)
    if isinstance(tokenizer, TiktokenTokenizer):
        return GLM4Format(tokenizer)
    if template:
        return jinja()
    if Glm45Format.misfit(tokenizer) is None:  # GLM-4.5's vocabulary, no template: the native renderer
        return jinja(Glm45Format)
    if GLM4Format.misfit(tokenizer) is None:
        return GLM4Format(tokenizer)
    return None


def _forced(name: str, tokenizer: Tokenizer, template: str | None, jinja) -> ChatFormat:
    if name == "glm45":
        why = Glm45Format.misfit(tokenizer)
        if why is not None:
            raise GlmkitError(f"chat format 'glm45' does not fit this checkpoint: {why}.")
        return jinja(Glm45Format)
    if name == "jinja":
        if not template:
            raise GlmkitError("chat format 'jinja' was asked for, but this checkpoint has no chat template; "
                              f"use one of {', '.join(FORMATS)} or leave chat_format unset.")
        return jinja()
    if name not in FORMATS:
        raise GlmkitError(f"unknown chat format {name!r}; use one of {', '.join(FORMATS)}, 'glm45' or 'jinja'.")
    why = FORMATS[name].misfit(tokenizer)
    if why is not None:
        raise GlmkitError(f"chat format {name!r} does not fit this checkpoint: {why}. Leave chat_format unset to use "
                          "the checkpoint's own format.")
    return FORMATS[name](tokenizer)


def reply_decoder(tokenizer: Tokenizer, fmt: ChatFormat | None):
    """ids -> text without special tokens, except those the chat format reads in replies (<think>, <tool_call>,
    ... of GLM-4.5 and later), so its parser sees them."""
    keep = {tokenizer.special[t] for t in (fmt.reply_tokens if fmt else ()) if t in tokenizer.special}
    if not keep:
        return lambda ids: tokenizer.decode(ids, skip_special=True)
    drop = frozenset(tokenizer.special.values()) - keep
    return lambda ids: tokenizer.decode([i for i in ids if i not in drop])


def tokenizer_and_format(checkpoint, name: str | None = None):
    """A checkpoint's tokenizer (from its directory, or its GGUF metadata) and chat format (`name` forces one);
    (None, None) when it ships no tokenizer. `checkpoint` is a loaders.Checkpoint (read, not imported)."""
    if checkpoint.gguf is None:
        tokenizer = load_tokenizer(checkpoint.directory, thudm=checkpoint.layout.name.startswith("thudm"))
    else:
        kind = checkpoint.gguf.fields.get("tokenizer.ggml.model")
        kind = None if kind is None else kind.contents()  # None: weights only, generate from token ids
        if kind not in (None, "gpt2", "llama"):
            warnings.warn(f"{checkpoint.source}: GGUF tokenizers of type {kind!r} are not supported yet; the model "
                          "loads without a tokenizer (generate from token ids).", stacklevel=3)
        tokenizer = gguf_tokenizer(checkpoint.gguf) if kind in ("gpt2", "llama") else None
    if tokenizer is None:
        return None, None
    return tokenizer, pick(tokenizer, checkpoint.chat_template, checkpoint.tokenizer_config,
                           checkpoint.config.eos_token_ids, name)


__all__ = ["FORMATS", "ChatDelta", "ChatFormat", "ChatReply", "ChatGLM1Format", "ChatGLM2Format", "ChatGLM3Format",
           "ChatTurn", "GLM4Format", "Glm45Format", "JinjaFormat", "fit_conversation", "normalize", "pick", "split_images", "reply_decoder",
           "special_strings",
           "tokenizer_and_format"]
