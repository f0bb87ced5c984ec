"""`glmkit generate [MODEL] --prompt TEXT`: one completion on stdout, for scripts.

Prints only the completion text, or with --json one JSON record (text, token ids, counts, finish
reason). --chat renders the prompt as a user message in the model's chat format.
"""

from __future__ import annotations

import argparse
import json
import sys

from glmkit.cli.common import add_model_args, add_sampling_args, load_model, sampling, template_kwargs


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--prompt", required=True, help="the prompt text ('-' reads it from stdin)")
    parser.add_argument("--chat", action="store_true", help="apply the model's chat format to the prompt")
    parser.add_argument("--no-think", action="store_true", help="with --chat: enable_thinking=false for the template")
    parser.add_argument("--json", action="store_true", help="print one JSON record instead of the text")
    add_sampling_args(parser, max_tokens=256)


def main(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_model(args)
    ids = (llm.apply_chat_template([{"role": "user", "content": prompt}], **template_kwargs(args)) if args.chat
           else llm.encode_prompt(prompt))
    done = llm.generate(ids, **sampling(args))
    message = llm.chat_format.parse_reply(done.text, None, ids) if args.chat and llm.chat_format else {}
    text = message.get("content", done.text)  # with --chat: the answer, its reasoning apart
    if args.json:
        extra = {"reasoning_content": message["reasoning_content"]} if "reasoning_content" in message else {}
        print(json.dumps({"text": text, **extra, "token_ids": done.token_ids, "prompt_token_ids": ids,
                          "finish_reason": done.finish_reason, "usage": done.usage}, ensure_ascii=False))
    else:
        print(text)
    return 0
