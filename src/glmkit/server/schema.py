"""Request bodies of the OpenAI-compatible API (pydantic), and OpenAI's error shape.

Unknown fields are accepted and ignored, as OpenAI clients send many; values that glmkit cannot honour
are refused with a clear message. No engine, no HTTP framework here.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP, MAX_STOP_CHARS, MAX_PROMPTS, MAX_TOOLS = 16, 512, 128, 128  # bounded cost per request
# OpenAI fields glmkit cannot honour: refused by name when set, never silently dropped
UNSUPPORTED = {"audio": "audio output", "prediction": "predicted outputs", "web_search_options": "web search",
               "functions": "the legacy 'functions' field (send 'tools')",
               "function_call": "the legacy 'function_call' field (send 'tool_choice')",
               "suffix": "a suffix after the completion (use a [MASK] prompt on ChatGLM-6B models)"}


def _at_most_max_prompts(v):
    """A list of prompts (texts or id lists; not one list of ids) holds at most MAX_PROMPTS."""
    if isinstance(v, list) and v and not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
    return v


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    # None: the model's default (generation_config.json, else llama-server's; `glmkit serve --temperature` ...)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=8, description="choices per prompt")
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI sends it) -> bias
    response_format: dict[str, Any] | None = None  # text, json_object, json_schema: constrained decoding

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        for name, what in UNSUPPORTED.items():
            if (self.model_extra or {}).get(name) not in (None, "", [], {}):
                raise ValueError(f"glmkit does not support {what}; leave '{name}' out")
        modalities = (self.model_extra or {}).get("modalities")
        if modalities not in (None, ["text"]):
            raise ValueError("glmkit answers in text only; leave 'modalities' out or send ['text']")
        best_of = (self.model_extra or {}).get("best_of")
        if best_of not in (None, 1, self.n):
            raise ValueError("best_of is not supported; use n")
        return self

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP or any(len(x) > MAX_STOP_CHARS for x in stops):
            raise ValueError(f"at most {MAX_STOP} stop strings of at most {MAX_STOP_CHARS} characters")
        return v


class ChatRequest(_Request):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    logprobs: bool = False  # each generated token's log-probability ...
    top_logprobs: int | None = Field(None, ge=0, le=20)  # ... and this many likeliest alternatives
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    chat_template_kwargs: dict[str, Any] | None = None  # what the model's template reads (enable_thinking, ...)
    parallel_tool_calls: bool = True  # false: at most one call per reply


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]

    _bounded_prompts = field_validator("prompt")(lambda cls, v: _at_most_max_prompts(v))
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    pooling: Literal["mean", "last"] = "mean"  # glmkit's: how hidden states become one vector

    _bounded_inputs = field_validator("input")(lambda cls, v: _at_most_max_prompts(v))


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
