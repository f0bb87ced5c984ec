"""`glmkit chat [MODEL]`: interactive streaming chat in the terminal.

Commands: /clear (forget the conversation), /system TEXT (set the system prompt), /image FILE (attach an image
to the next message: vision models, GLM-4.1V / 4.5V / 4.6V), /exit. Ctrl-C stops the reply being written
without leaving; Ctrl-D leaves. A message that fails (a bad image, a text-only model) is dropped with the reason. A dim status line shows tokens and tokens/s.
Follow-up turns reuse the cached conversation (ChatGLM-6B re-reads it: its prefix is bidirectional).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from glmkit.cli.common import add_model_args, add_sampling_args, load_model, sampling, template_kwargs

HELP = "commands: /clear  /system TEXT  /image FILE  /exit   (Ctrl-C stops a reply, Ctrl-D leaves)"


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
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    llm = load_model(args, build=True)
    if llm.chat_format is None:
        from glmkit.errors import GlmkitError

        raise GlmkitError(f"{args.model} has no chat format (no chat template, no GLM role tokens); "
                          "use `glmkit generate` for plain completion.")
    state = {"system": args.system, "messages": [], "images": list(args.image)}
    out, err = sys.stdout, sys.stderr
    print(f"glmkit chat: {args.model} ({llm.chat_format.name} format). {HELP}", file=err)
    while True:
        try:
            line = input("\n>>> ")
        except EOFError:
            print(file=err)
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to leave)", file=err)
            continue
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text and not (text.startswith("/") and command(text, state, err)):
            turn(llm, args, line, state, out, err)


def command(text: str, state: dict, err) -> bool:
    """Run a /command -> True (False: not one, the line is a message)."""
    if text == "/clear":
        state["messages"], state["images"] = [], []
        print("(conversation cleared)", file=err)
    elif text.startswith("/system"):
        state["system"], state["messages"] = text[len("/system"):].strip() or None, []
        print(f"(system prompt {'set' if state['system'] else 'cleared'}; conversation cleared)", file=err)
    elif text.startswith("/image"):
        path = Path(text[len("/image"):].strip()).expanduser()
        if path.is_file():
            state["images"].append(str(path))
            print(f"({path.name} goes with your next message)", file=err)
        else:
            print(f"(no image file at {str(path)!r}; /image FILE attaches one)", file=err)
    else:
        print(HELP, file=err)
    return True


def turn(llm, args, line: str, state: dict, out, err) -> None:
    """One user message (with the images attached to it) and the streamed reply; a failure drops the message."""
    from glmkit.errors import GlmkitError

    images = [{"type": "image_url", "image_url": {"url": path}} for path in state["images"]]
    message = {"role": "user", "content": [*images, {"type": "text", "text": line}] if images else line}
    system = [{"role": "system", "content": state["system"]}] if state["system"] else []
    start = time.perf_counter()
    try:
        stream = llm.chat(system + state["messages"] + [message], stream=True, truncate="drop_oldest",
                          chat_template_kwargs=template_kwargs(args), **sampling(args))
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
