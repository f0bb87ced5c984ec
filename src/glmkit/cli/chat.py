"""`glmkit chat [MODEL]`: interactive streaming chat in the terminal.

Input: a line is a message; a paste of several lines is one message (readline's bracketed paste); a line that
starts with \"\"\" opens a block that runs to a line ending with \"\"\". Input history persists in $GLMKIT_HOME.
Commands (chat_commands.py): /clear, /system TEXT, /image FILE, /regen, /save FILE, /load FILE, /set NAME VALUE
(temperature, top_p, top_k, min_p, max_tokens, seed, repetition_penalty, think), /show, /help, /exit.
Ctrl-C stops the reply being written without leaving; Ctrl-D leaves. A message that fails (a bad image, a
text-only model) is dropped with the reason. A dim status line shows tokens and tokens/s. Follow-up turns
reuse the cached conversation (ChatGLM-6B re-reads it: its prefix is bidirectional).
"""

from __future__ import annotations

import argparse
import sys
import time

from glmkit.cli.chat_commands import HELP, command, history
from glmkit.cli.common import add_model_args, add_sampling_args, load_model, sampling, template_kwargs


def add_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)
    parser.add_argument("--system", default=None, help="system prompt (default: none)")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="an image to ask about in the first message (repeatable; vision models)")
    parser.add_argument("--no-think", action="store_true",
                        help="ask a thinking model (GLM-4.5 and later) to answer without reasoning "
                             "(enable_thinking=false)")
    add_sampling_args(parser, max_tokens=1024)


def main(args: argparse.Namespace) -> int:
    history()  # line editing, bracketed paste and the saved input history (when readline is there)
    llm = load_model(args, build=True)
    if llm.chat_format is None:
        from glmkit.errors import GlmkitError

        raise GlmkitError(f"{args.model} has no chat format (no chat template, no GLM role tokens); "
                          "use `glmkit generate` for plain completion.")
    state = {"system": args.system, "messages": [], "images": list(args.image), "settings": sampling(args),
             "template": template_kwargs(args), "model": args.model}
    out, err = sys.stdout, sys.stderr
    print(f"glmkit chat: {args.model} ({llm.chat_format.name} format). {HELP}", file=err)
    while True:
        try:
            text = read_message()
        except EOFError:
            print(file=err)
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to leave)", file=err)
            continue
        if text.strip() in ("/exit", "/quit"):
            return 0
        if not text.strip():
            continue
        if text.startswith("/") and "\n" not in text:
            again = command(text.strip(), state, llm, err)
            if again is not None:  # /regen: the last message once more
                turn(llm, again, state, out, err)
            continue
        turn(llm, text, state, out, err)


def read_message() -> str:
    """One message: a line (a multi-line paste arrives whole), or a \"\"\" block of lines."""
    line = input("\n>>> ")
    if not line.lstrip().startswith('"""'):
        return line
    lines = [line.lstrip()[3:]]
    while not lines[-1].rstrip().endswith('"""') or (len(lines) == 1 and lines[0].strip() == ""):
        lines.append(input("... "))
    lines[-1] = lines[-1].rstrip()[:-3]
    return "\n".join(lines).strip("\n")


def turn(llm, text: str | dict, state: dict, out, err) -> None:
    """One user message (with the images attached to it; or a message to send again) and the streamed reply; a
    failure drops the message."""
    from glmkit.errors import GlmkitError

    if isinstance(text, dict):
        message = text
    else:
        images = [{"type": "image_url", "image_url": {"url": path}} for path in state["images"]]
        message = {"role": "user", "content": [*images, {"type": "text", "text": text}] if images else text}
    system = [{"role": "system", "content": state["system"]}] if state["system"] else []
    start = time.perf_counter()
    try:
        stream = llm.chat(system + state["messages"] + [message], stream=True, truncate="drop_oldest",
                          chat_template_kwargs=state["template"], **state["settings"])
        reply, final, n = show(stream, out, err)
    except GlmkitError as e:
        print(f"glmkit chat: {e} (message not sent)", file=err)
        return
    state["images"] = []
    seconds = time.perf_counter() - start
    n = final["usage"]["completion_tokens"] if final else n
    state["messages"] += [message, final.message if final else {"role": "assistant", "content": reply}]
    print(f"\n\x1b[2m[{n} tokens, {n / max(seconds, 1e-9):.1f} tokens/s]\x1b[0m", file=err)


def show(stream, out, err) -> tuple[str, object, int]:
    """Write a streamed reply as it arrives, reasoning dimmed (on a terminal) and set apart from the answer;
    Ctrl-C stops it. -> (the content shown, the final ChatReply or None when stopped, tokens so far)."""
    dim, undim = ("\x1b[2m", "\x1b[0m") if out.isatty() else ("", "")
    reply, final, n, thinking = "", None, 0, False
    try:
        for item in stream:
            if "delta" not in item:
                final = item
                continue
            n = item["completion_tokens"]
            if item.get("reasoning_content"):
                out.write(("" if thinking else dim) + item["reasoning_content"])
                thinking = True
            if item["delta"]:
                out.write((undim + "\n\n" if thinking else "") + item["delta"])
                reply, thinking = reply + item["delta"], False
            out.flush()
    except KeyboardInterrupt:
        stream.close()
        print(undim + "\n(stopped)", file=err)
    out.write(undim if thinking else "")
    return reply, final, n
