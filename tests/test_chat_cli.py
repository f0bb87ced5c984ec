"""`glmkit chat` driven through a pseudo-terminal, as a person types: a multi-line paste (bracketed paste) is one
message, a \"\"\" block is one message, /set changes the sampling of the next reply, /regen replaces the last
reply, /save writes the conversation and /load restores it, and the input history persists."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import glmkit

PROMPT = b">>> "


class Terminal:
    def __init__(self, *args: str, env: dict):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "glmkit", "chat", *args], stdin=slave, stdout=slave,
                                     stderr=slave, env={**os.environ, **env, "TERM": "xterm"}, close_fds=True)
        os.close(slave)
        self.seen = b""

    def wait_for(self, what: bytes, timeout: float = 120) -> bytes:
        deadline = time.time() + timeout
        while what not in self.seen:
            assert time.time() < deadline, f"no {what!r} in {self.seen[-2000:]!r}"
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:
                    break
        head, _, self.seen = self.seen.partition(what)
        return head

    def send(self, text: str) -> bytes:
        os.write(self.master, text.encode())
        return self.wait_for(PROMPT)

    def close(self) -> int:
        os.write(self.master, b"/exit\r")
        code = self.proc.wait(timeout=60)
        os.close(self.master)
        return code


def test_chat_in_a_terminal(tmp_path):
    from scripted import write_glm45_checkpoint

    model = write_glm45_checkpoint(tmp_path / "m")
    env = {"GLMKIT_HOME": str(tmp_path / "home")}
    term = Terminal(str(model), "--eager", "--max-tokens", "6", "--seed", "3", env=env)
    term.wait_for(PROMPT)
    term.send("/set temperature 0\r")
    term.send("\x1b[200~first line\nsecond line\x1b[201~\r")  # a paste of two lines
    term.send('"""\rblock one\rblock two"""\r')
    term.send("/regen\r")
    term.send(f"/save {tmp_path / 'talk.json'}\r")
    assert term.close() == 0
    saved = json.loads((tmp_path / "talk.json").read_text())
    users = [m["content"] for m in saved["messages"] if m["role"] == "user"]
    assert users == ["first line\nsecond line", "block one\nblock two"]  # each one message; /regen kept the count
    assert len(saved["messages"]) == 4 and saved["settings"]["temperature"] == 0.0
    llm = glmkit.load(model)
    greedy = llm.chat(saved["messages"][:3], temperature=0, max_tokens=6, seed=3)
    assert saved["messages"][3]["content"] == greedy["content"]  # /set reached the sampling; /regen re-asked it
    history = (tmp_path / "home" / "chat_history").read_text()
    assert "/set temperature 0" in history  # the input history persists

    term = Terminal(str(model), "--eager", "--max-tokens", "6", env=env)
    term.wait_for(PROMPT)
    term.send(f"/load {tmp_path / 'talk.json'}\r")
    shown = term.send("/show\r")
    assert b"conversation: 4 messages" in shown and b"temperature=0.0" in shown
    term.send("and then?\r")
    term.send(f"/save {tmp_path / 'more.json'}\r")
    assert term.close() == 0
    more = json.loads((tmp_path / "more.json").read_text())
    assert more["messages"][:4] == saved["messages"] and more["messages"][4]["content"] == "and then?"
    bad = Terminal(str(model), "--eager", env=env)
    bad.wait_for(PROMPT)
    assert b"not valid" in bad.send("/set temperature hot\r")
    assert b"cannot load" in bad.send(f"/load {tmp_path / 'missing.json'}\r")
    assert bad.close() == 0
