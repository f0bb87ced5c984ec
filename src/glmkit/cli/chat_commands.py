"""The slash commands of `glmkit chat` and its input history. Each command reads and changes the session state
(system prompt, messages, images for the next message, sampling settings, template arguments)."""

from __future__ import annotations

import json
from pathlib import Path

HELP = ("commands: /clear /system TEXT /image FILE /regen /save FILE /load FILE /set NAME VALUE /show /exit   "
        '(\"\"\" starts and ends a multi-line message; Ctrl-C stops a reply, Ctrl-D leaves)')
SETTINGS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "max_tokens": int, "seed": int,
            "repetition_penalty": float}


def history() -> None:
    """readline for input(): line editing, bracketed paste (a multi-line paste is one input) and the input
    history kept in $GLMKIT_HOME/chat_history across sessions."""
    try:
        import readline
    except ImportError:
        return
    import atexit

    from glmkit.loaders.hub import home

    path = home() / "chat_history"
    try:
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    readline.parse_and_bind("set enable-bracketed-paste on")

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError:
            pass

    atexit.register(save)


def command(text: str, state: dict, llm, err):
    """Run a /command. -> the user message to send again (/regen), else None."""
    name, _, arg = text.partition(" ")
    arg = arg.strip()
    if name == "/clear":
        state["messages"], state["images"] = [], []
        print("(conversation cleared)", file=err)
    elif name == "/system":
        state["system"], state["messages"] = arg or None, []
        print(f"(system prompt {'set' if state['system'] else 'cleared'}; conversation cleared)", file=err)
    elif name == "/image":
        path = Path(arg).expanduser()
        if path.is_file():
            state["images"].append(str(path))
            print(f"({path.name} goes with your next message)", file=err)
        else:
            print(f"(no image file at {str(path)!r}; /image FILE attaches one)", file=err)
    elif name == "/regen":
        return _regen(state, err)
    elif name in ("/save", "/load"):
        _save(state, arg, err) if name == "/save" else _load(state, arg, err)
    elif name == "/set":
        _set(state, llm, arg, err)
    elif name == "/show":
        settings = ", ".join(f"{k}={v}" for k, v in state["settings"].items()) or "the model's defaults"
        print(f"model: {state['model']} ({llm.chat_format.name} format)\nsettings: {settings}\n"
              f"thinking: {'off' if state['template'].get('enable_thinking') is False else 'on (if the model thinks)'}\n"
              f"system prompt: {state['system'] or 'none'}\nconversation: {len(state['messages'])} messages", file=err)
    else:
        print(HELP, file=err)
    return None


def _regen(state: dict, err):
    messages = state["messages"]
    if len(messages) < 2 or messages[-1].get("role") != "assistant":
        print("(nothing to regenerate yet)", file=err)
        return None
    del messages[-1]
    return messages.pop()  # the last user message, sent again


def _save(state: dict, arg: str, err) -> None:
    if not arg:
        print("(/save FILE writes the conversation as JSON)", file=err)
        return
    record = {k: state[k] for k in ("system", "messages", "settings", "template")}
    try:
        Path(arg).expanduser().write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
    except OSError as e:
        print(f"(cannot write {arg}: {e.strerror})", file=err)
        return
    print(f"(saved {len(state['messages'])} messages to {arg})", file=err)


def _load(state: dict, arg: str, err) -> None:
    try:
        record = json.loads(Path(arg).expanduser().read_text(encoding="utf-8"))
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise ValueError("messages must be a list of {role, content} objects")
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"(cannot load {arg!r}: {getattr(e, 'strerror', None) or e}; /save writes what /load reads)", file=err)
        return
    state.update(system=record.get("system"), messages=messages, settings=dict(record.get("settings") or {}),
                 template=dict(record.get("template") or {}), images=[])
    print(f"(loaded {len(messages)} messages from {arg})", file=err)


def _set(state: dict, llm, arg: str, err) -> None:
    from glmkit.errors import GlmkitError

    key, _, value = arg.partition(" ")
    value = value.strip()
    if key == "think" and value in ("on", "off"):
        state["template"] = {} if value == "on" else {"enable_thinking": False}
        print(f"(thinking {value})", file=err)
        return
    if key not in SETTINGS or not value:
        print(f"(/set NAME VALUE with NAME one of {', '.join(SETTINGS)}, think; e.g. /set temperature 0.3)", file=err)
        return
    try:
        settings = {**state["settings"], key: SETTINGS[key](value)}
        llm.sampling_params(**settings)  # checked now, not at the next message
    except (ValueError, GlmkitError) as e:
        print(f"({key} {value!r} is not valid: {e})", file=err)
        return
    state["settings"] = settings
    print(f"({key} = {settings[key]})", file=err)
