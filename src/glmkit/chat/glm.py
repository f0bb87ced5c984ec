"""Chat formats: OpenAI-style messages -> (token ids, loss mask), one renderer per GLM generation.

The loss mask is True on tokens the assistant produces (its replies and the token that ends each
reply), so the same function serves chat, the server and fine-tuning. Each format also knows its
stop ids and how to read tool calls out of a reply. User text is always encoded as plain text: it
can never become a role or stop token. Checkpoints with a Jinja template use jinja.py. No torch, no model.
"""

from __future__ import annotations

import json

from glmkit.chat.base import ChatFormat, Ids, normalize
from glmkit.chat.tools import (arguments_of, forced_chatglm3_call, format_chatglm3_call, functions, parse_chatglm3,
                               parse_glm4, tool_names)
from glmkit.errors import GlmkitError
from glmkit.tokenizer import Tokenizer

class _RoundsFormat(ChatFormat):
    """ChatGLM-6B and ChatGLM2-6B: a text prompt of '[Round N]' blocks of 问 / 答."""

    first_round = 0
    sep = "\n"

    def no_tools(self) -> GlmkitError:
        return GlmkitError(f"the {self.name} chat format has no tool calls; use a ChatGLM3 or GLM-4 model for tools.")

    def forced_call(self, tools, name=None):
        raise self.no_tools()

    def _rounds(self, messages) -> tuple[list[tuple[str, str]], str, str | None]:
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        turns = [m for m in messages if m["role"] != "system"]
        if any(m["role"] == "tool" or m.get("tool_calls") for m in turns):
            raise self.no_tools()
        answer = turns.pop()["content"] if turns and turns[-1]["role"] == "assistant" else None
        pairs, query = [], None
        for m in turns:
            if m["role"] == "user":
                if query is not None:
                    raise GlmkitError(f"the {self.name} chat format needs user and assistant messages to alternate.")
                query = m["content"]
            elif query is None:
                raise GlmkitError(f"the {self.name} chat format needs user and assistant messages to alternate.")
            else:
                pairs.append((query, m["content"]))
                query = None
        if query is None:
            raise GlmkitError(f"the {self.name} chat format needs the conversation to end with a user message "
                              "(or a user message then the assistant reply to train on).")
        if system:  # no system role in these generations: fold it into the first query
            if pairs:
                pairs[0] = (system + "\n" + pairs[0][0], pairs[0][1])
            else:
                query = system + "\n" + query
        return pairs, query, answer

    def _prompt(self, pairs, query) -> str:
        s, r = self.sep, self.first_round
        text = "".join(f"[Round {i + r}]{s}问：{q}{s}答：{a}{s}" for i, (q, a) in enumerate(pairs))
        return text + f"[Round {len(pairs) + r}]{s}问：{query}{s}答："


class ChatGLM1Format(_RoundsFormat):
    """ChatGLM-6B: prompt text, then [gMASK] <sop>; replies end with <eop>. A first turn is the bare query."""

    name = "chatglm1"
    needs = ("[gMASK]", "<sop>", "<eop>")

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        self.stop_ids = frozenset({tokenizer.token_id("<eop>")})

    def render(self, messages, tools=None, add_generation_prompt=True, **template_kwargs):
        if tools:
            raise self.no_tools()
        pairs, query, answer = self._rounds(normalize(messages))
        out = Ids()
        out.add(self.tok.encode(self._prompt(pairs, query) if pairs else query))
        out.add([self.tok.token_id("[gMASK]"), self.tok.token_id("<sop>")])
        if answer is not None:
            out.add(self.tok.encode(answer) + [self.tok.token_id("<eop>")], train=True)
        return out.ids, out.mask

    def wrap_plain(self, ids):
        return ids + [self.tok.token_id("[gMASK]"), self.tok.token_id("<sop>")]


class ChatGLM2Format(_RoundsFormat):
    """ChatGLM2-6B: [gMASK] sop, then rounds from 1 separated by blank lines; replies end with </s>."""

    name = "chatglm2"
    needs = ("[gMASK]", "sop")
    first_round = 1
    sep = "\n\n"

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        self.eos = tokenizer.eos_id
        self.stop_ids = frozenset({self.eos})

    def render(self, messages, tools=None, add_generation_prompt=True, **template_kwargs):
        if tools:
            raise self.no_tools()
        pairs, query, answer = self._rounds(normalize(messages))
        out = Ids()
        out.add([self.tok.token_id("[gMASK]"), self.tok.token_id("sop")])
        out.add(self.tok.encode(self._prompt(pairs, query)))
        if answer is not None:
            out.add(self.tok.encode(answer) + [self.eos], train=True)
        return out.ids, out.mask

    def wrap_plain(self, ids):
        return [self.tok.token_id("[gMASK]"), self.tok.token_id("sop")] + ids


class _RoleTokenFormat(ChatFormat):
    """ChatGLM3 and GLM-4: [gMASK] sop, then per message <|role|> + encode(metadata + '\\n') + encode(content)."""

    sop = "sop"
    end_id = -1  # appended after a final assistant reply (training); set by each format

    def _tools_system(self, tools: list[dict]) -> str:
        raise NotImplementedError

    def wrap_plain(self, ids):
        return [self.tok.token_id("[gMASK]"), self.tok.token_id(self.sop)] + ids

    def _tool_call_content(self, call: dict) -> str:
        raise NotImplementedError

    def may_call(self, text, tools):
        """A call's first line is a tool's name: undecided until that line ends, unless no name starts so."""
        head, newline, _ = text.partition("\n")
        head = head.strip()
        return head in tool_names(tools) if newline else any(n.startswith(head) for n in tool_names(tools))

    def render(self, messages, tools=None, add_generation_prompt=True, **template_kwargs):
        messages = normalize(messages)
        if tools:  # as the official servers do: the tools go first, in a system message of their own
            messages = [{"role": "system", "content": self._tools_system(tools)}] + messages
        out = Ids()
        out.add([self.tok.token_id("[gMASK]"), self.tok.token_id(self.sop)])
        reply_open = False  # the previous message was the assistant's: the next role token ends its reply
        for m in messages:
            assistant = m["role"] == "assistant"
            pieces = [(call["function"]["name"], self._tool_call_content(call)) for call in m.get("tool_calls") or []]
            if not pieces or m["content"]:
                pieces.insert(0, (m.get("metadata", ""), m["content"]))
            for metadata, content in pieces:
                if not content and not assistant:
                    continue  # the official template skips empty messages
                role = {"tool": "observation"}.get(m["role"], m["role"])
                out.add([self.tok.token_id(f"<|{role}|>")], train=reply_open)
                out.add(self.tok.encode(f"{metadata}\n") + self.tok.encode(content), train=assistant)
                reply_open = assistant
        if add_generation_prompt and not reply_open:
            out.add([self.tok.token_id("<|assistant|>")])
        elif reply_open:
            out.add([self.end_id], train=True)
        return out.ids, out.mask


class ChatGLM3Format(_RoleTokenFormat):
    """ChatGLM3-6B: tools as indented JSON after the system text; calls as a ```python tool_call(...)``` block."""

    name = "chatglm3"
    needs = ("[gMASK]", "sop", "<|user|>", "<|assistant|>", "<|observation|>")
    TOOLS_TEXT = "Answer the following questions as best as you can. You have access to the following tools:"

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        self.end_id = tokenizer.eos_id
        self.stop_ids = frozenset({tokenizer.eos_id, tokenizer.token_id("<|user|>"),
                                   tokenizer.token_id("<|observation|>")})

    def _tools_system(self, tools):
        functions = [t.get("function", t) for t in tools]
        return self.TOOLS_TEXT + "\n" + json.dumps(functions, indent=4, ensure_ascii=False)

    def _tool_call_content(self, call):
        return format_chatglm3_call(arguments_of(call))

    def parse_reply(self, text, tools=None, prompt=None):
        return parse_chatglm3(text, tools)

    def forced_call(self, tools, name=None):
        return forced_chatglm3_call(tools, name)


GLM4_TOOLS_PREAMBLE = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                       "你的任务是针对用户的问题和要求提供适当的答复和支持。")


class GLM4Format(_RoleTokenFormat):
    """GLM-4-9B: [gMASK]<sop> once; tools in a system message; calls as 'name\\n{json}'; results as <|observation|>."""

    name = "glm4"
    needs = ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>")
    sop = "<sop>"

    def __init__(self, tokenizer: Tokenizer):
        super().__init__(tokenizer)
        self.end_id = tokenizer.token_id("<|endoftext|>")
        self.stop_ids = frozenset(tokenizer.token_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>"))

    def _tools_system(self, tools):
        text = GLM4_TOOLS_PREAMBLE + "\n\n# 可用工具"
        for tool in tools:
            fn = tool.get("function", tool)
            # one newline before '##': the official template's "\n\n" follows a block tag, and Jinja's
            # trim_blocks (as transformers renders it) eats the first
            text += (f"\n## {fn['name']}\n\n{json.dumps(fn, indent=4, ensure_ascii=False)}\n"
                     "在调用上述函数时，请使用 Json 格式表示调用的参数。")
        return text

    def _tool_call_content(self, call):
        return json.dumps(arguments_of(call), ensure_ascii=False)

    def parse_reply(self, text, tools=None, prompt=None):
        return parse_glm4(text, tools)

    def forced_call(self, tools, name=None):
        return [[n + "\n", params] for n, params in functions(tools, name)]


FORMATS = {f.name: f for f in (ChatGLM1Format, ChatGLM2Format, ChatGLM3Format, GLM4Format)}
