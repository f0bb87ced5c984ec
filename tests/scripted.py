"""A deterministic scripted model that writes GLM-4.5-style replies, for server and agent-framework tests.

It runs inside the real engine (KV cache rows, continuous batching, prefix reuse, grammars): each step it
stores the new ids in its row's cache, reads the row's whole conversation back, and puts all its weight on the
next token of the reply its script gives for that conversation. The script: after a tool result, reasoning and
an answer that quotes the result; with tools in the prompt, reasoning and a call of the first tool (arguments
made from its schema); otherwise reasoning and a greeting. The reply ends with <|observation|> after a call and
<|user|> otherwise, as GLM-4.5 models end theirs. Once the output leaves the script (a grammar forced another
token), it prefers the stop token and otherwise has no preference (the lowest allowed id wins).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

GLM45_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "/nothink", "<think>", "</think>", "<tool_call>", "</tool_call>",
                  "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>"]
TEMPLATES = Path(__file__).parent / "fixtures" / "templates"
GREETING = "Hello from the scripted model."


def write_glm45_checkpoint(directory: Path, template: str = "GLM-4.6.jinja") -> Path:
    """A tiny GLM-4-architecture checkpoint with a GLM-4.5-style tokenizer (its think / tool tags as special
    tokens), an official GLM-4.6 / 4.7 chat template and the generation config's stop ids."""
    from conftest import make_hf_model
    from vocab import save_hf_tokenizer

    save_hf_tokenizer(directory, GLM45_SPECIALS, (TEMPLATES / template).read_text(), eos_token="<|endoftext|>")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    model = make_hf_model("glm4", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       rope_theta=10000.0, partial_rotary_factor=0.5),
                          vocab_size=len(tok), num_hidden_layers=1, max_position_embeddings=4096)
    model.save_pretrained(directory)
    stops = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    return directory


def script(prompt: str, newlines: bool) -> tuple[str | None, str]:
    """(reasoning, the text after it) that the model writes after a rendered prompt (None: no reasoning part)."""
    last_turn = max(prompt.rfind("<|user|>"), prompt.rfind("<|observation|>"))
    said = re.match(r"<\|user\|>\n?Say: (.*?)(/nothink)?<\|assistant\|>", prompt[last_turn:], re.S)
    if said:  # "Say: TEXT": the reply is TEXT as it is (for malformed and hostile output)
        return None, said.group(1)
    if prompt.startswith("<|observation|>", last_turn):
        results = re.findall(r"<tool_response>\n?(.*?)\n?</tool_response>", prompt[last_turn:], re.S)
        return "The tool answered.", "The tool says: " + " | ".join(results)
    tools = re.search(r"<tools>\n(.*?)\n</tools>", prompt, re.S)
    if tools is None:
        return "A greeting is polite.", GREETING
    first = json.loads(tools.group(1).split("\n")[0])
    fn = first.get("function", first)
    props = (fn.get("parameters") or {}).get("properties") or {}
    values = {"string": "Paris", "integer": 3, "number": 2.5, "boolean": True}
    nl = "\n" if newlines else ""
    call = "<tool_call>" + fn["name"] + "".join(
        f"{nl}<arg_key>{k}</arg_key>{nl}<arg_value>"
        f"{v if isinstance(v := values.get(s.get('type'), 'x'), str) else json.dumps(v)}</arg_value>"
        for k, s in props.items()) + nl + "</tool_call>"
    return f"The user needs {fn['name']}; I will call it.", call


class ScriptedModel(torch.nn.Module):
    def __init__(self, config, tokenizer, newlines: bool):
        super().__init__()
        self.config, self.tok, self.newlines = config, tokenizer, newlines
        self.register_buffer("anchor", torch.zeros(1))
        self.assistant = tokenizer.special["<|assistant|>"]

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    def target(self, history: list[int]) -> tuple[list[int], list[int]]:
        """(the reply ids so far, the whole reply the script wants) for one row's ids. The generation prompt may
        end in part of the reply: GLM-4.6's '\n<think></think>' (thinking off), GLM-4.7's '<think>' or '</think>'."""
        last = max(i for i, t in enumerate(history) if t == self.assistant)
        prompt, so_far = history[: last + 1], history[last + 1:]
        reasoning, body = script(self.tok.decode(prompt), self.newlines)
        starts = ["\n<think></think>"] if self.newlines else ["<think>", "</think>"]
        prefilled = next((s for s in starts if self.tok.decode(so_far).startswith(s)), "")
        sep = "\n" if self.newlines else ""
        if reasoning is None:
            text = prefilled + body
        elif prefilled.endswith("</think>"):  # thinking switched off
            text = prefilled + sep + body
        else:
            text = (prefilled or sep + "<think>") + reasoning + "</think>" + sep + body
        return so_far, self.tok.encode(text, allow_special=True)

    def next_id(self, history: list[int]) -> int:
        so_far, want = self.target(history)
        stop = self.tok.special["<|observation|>" if want and "<tool_call>" in self.tok.decode(want) else "<|user|>"]
        if want[: len(so_far)] != so_far or len(so_far) >= len(want):
            return stop
        return want[len(so_far)]

    def hidden_states(self, tokens, positions, cache=None, start=0, prefix_len=None, embeds=None):
        B, T = tokens.shape
        starts = start.tolist() if isinstance(start, torch.Tensor) else [start] * B
        store = cache.k[0]  # (B, K, S, D): this row's token ids live in [b, 0, :, 0]
        out = torch.zeros(B, T, self.config.vocab_size)
        for b in range(B):
            store[b, 0, starts[b]: starts[b] + T, 0] = tokens[b].to(store.dtype)
            history = store[b, 0, : starts[b] + T, 0].long().tolist()
            if self.assistant in history:
                out[b, -1, self.next_id(history)] = 10.0
        return out

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, tokens, positions, cache=None, start=0, prefix_len=None, embeds=None):
        return self.head(self.hidden_states(tokens, positions, cache, start, prefix_len, embeds))


def scripted_llm(directory: Path, newlines: bool):
    """glmkit.load() of a checkpoint written by write_glm45_checkpoint, its model replaced by the script."""
    import glmkit

    llm = glmkit.load(str(directory))
    llm.model = ScriptedModel(llm.config, llm.tokenizer, newlines)
    return llm
