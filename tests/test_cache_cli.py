"""The cache commands through the entry point: `glmkit list / show / rm` on a cache holding a GGUF, a checkpoint
directory and a compiled package; `glmkit pull org/repo:TAG` and `org/repo` from a local fake of the Hugging Face
hub (its file listing and resolve routes, served on loopback: no network); `glmkit ps`; every command's help
shows its defaults."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run(*args: str, home: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmkit", *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "GLMKIT_HOME": str(home), **env})


class FakeHub:
    """The routes huggingface_hub uses to list a repo and download a file, over a folder of repos."""

    def __init__(self, root: Path):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.respond(body=False)

            def do_GET(self):
                self.respond(body=True)

            def respond(self, body: bool):
                path = self.path.split("?")[0]
                hub.requests.append(path)
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and "tree" in parts:
                    repo = root / parts[2] / parts[3]
                    listing = [{"type": "file", "path": f.name, "size": f.stat().st_size,
                                "oid": hashlib.sha1(f.read_bytes()).hexdigest()} for f in sorted(repo.iterdir())]
                    return self.send(json.dumps(listing).encode(), "application/json", body)
                if len(parts) >= 5 and parts[2] == "resolve":
                    file = root / parts[0] / parts[1] / "/".join(parts[4:])
                    if file.is_file():
                        data = file.read_bytes()
                        return self.send(data, "application/octet-stream", body,
                                         {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()

            def send(self, data: bytes, kind: str, body: bool, headers: dict | None = None):
                start = 0
                if self.headers.get("Range", "").startswith("bytes="):
                    start = int(self.headers["Range"][6:].split("-")[0])
                self.send_response(206 if start else 200)
                for k, v in {"Content-Type": kind, "Content-Length": str(len(data) - start), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data[start:])

        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A fake hub with org/tiny-gguf (two quantizations of one GGUF model) and org/tiny (a checkpoint directory)."""
    from conftest import LLAMA_CONFIGS, make_hf_model
    from test_gguf import write_gguf

    root = tmp_path_factory.mktemp("hub")
    model = make_hf_model("llama", LLAMA_CONFIGS["gqa-bias"], seed=1, hidden_size=64, intermediate_size=64)
    (root / "org" / "tiny-gguf").mkdir(parents=True)
    for qtype in ("Q8_0", "F32"):
        write_gguf(model, root / "org" / "tiny-gguf" / f"tiny-{qtype}.gguf", qtype)
    model.save_pretrained(root / "org" / "tiny")
    (root / "org" / "tiny" / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    fake = FakeHub(root)
    yield fake
    fake.close()


def test_pull_list_show_rm(hub, tmp_path):
    """pull org/repo:TAG fetches that GGUF only, pull org/repo the checkpoint directory; a wrong tag names the
    ones there; list shows both with size, format and quantization, and a compiled package; show reads one
    without its weights; glmkit.load finds pulled models by the same names; rm removes them."""
    import glmkit

    home, env = tmp_path / "home", {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf")}
    done = run("pull", "org/tiny-gguf:q8_0", home=home, **env)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).name == "tiny-Q8_0.gguf"
    assert not any("tiny-F32" in r for r in hub.requests if "/resolve/" in r)  # only the tagged file
    wrong = run("pull", "org/tiny-gguf:Q4_K_M", home=home, **env)
    assert wrong.returncode == 1 and "no GGUF file tagged 'Q4_K_M'" in wrong.stderr and "F32, Q8_0" in wrong.stderr
    which = run("pull", "org/tiny-gguf", home=home, **env)
    assert which.returncode == 1 and "glmkit pull org/tiny-gguf:Q8_0" in which.stderr
    assert run("pull", "org/tiny", home=home, **env).returncode == 0
    compiled = home / "compiled"
    compiled.mkdir(parents=True)
    (compiled / "decode-abcdef0123456789.pt2").write_bytes(b"x" * 2048)
    (compiled / "decode-abcdef0123456789.json").write_text(json.dumps({"model": "org/tiny", "built": 0}))
    listed = run("list", home=home)
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines() if line.startswith("org/")}
    assert rows["org/tiny-gguf"][3:5] == ["gguf", "Q8_0"] and rows["org/tiny"][3] == "safetensors"
    assert "abcdef0123456789" in listed.stdout
    shown = run("show", "org/tiny", home=home)
    assert shown.returncode == 0, shown.stderr
    info = dict(line.split(None, 1) for line in shown.stdout.splitlines() if line.strip())
    assert info["architecture"] == "llama" and info["licence"] == "apache-2.0" and info["context"].startswith("256")
    with pytest.MonkeyPatch.context() as mp:  # the pulled names load from glmkit's cache, offline
        mp.setenv("GLMKIT_HOME", str(home))
        assert glmkit.load("org/tiny-gguf:Q8_0").config.num_layers == glmkit.load("org/tiny").config.num_layers
    assert run("rm", "org/tiny-gguf", home=home).returncode == 0
    assert run("rm", "--compiled", "abcdef", home=home).returncode == 0
    after = run("list", home=home).stdout
    assert "org/tiny-gguf" not in after and "abcdef" not in after and "org/tiny " in after
    missing = run("rm", "org/nothing", home=home)
    assert missing.returncode == 1 and "no model 'org/nothing'" in missing.stderr and "Traceback" not in missing.stderr


def test_ps_lists_running_servers(tmp_path):
    from glmkit.loaders import cache

    home = tmp_path / "home"
    (home / "servers").mkdir(parents=True)
    (home / "servers" / f"{os.getpid()}.json").write_text(json.dumps({"pid": os.getpid(), "url": "http://127.0.0.1:9",
                                                                      "model": "tiny", "started": 0}))
    (home / "servers" / "999999999.json").write_text(json.dumps({"pid": 999999999, "url": "x", "model": "gone"}))
    out = run("ps", home=home)
    assert out.returncode == 0 and "http://127.0.0.1:9" in out.stdout and "gone" not in out.stdout
    assert not (home / "servers" / "999999999.json").exists()  # an ended server's note is dropped
    assert cache.servers_dir  # (the module serve writes through)


def test_every_help_shows_defaults_and_choices(capsys):
    from glmkit.cli import COMMANDS, main

    texts = {}
    for name in COMMANDS:
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0
        texts[name] = " ".join(capsys.readouterr().out.split())
    for name in ("serve", "chat", "generate", "bench", "ppl", "quantize"):
        assert "default" in texts[name], name
    assert "--port PORT port to listen on (default: 8000)" in texts["serve"] and "{text,json}" in texts["serve"]
    assert "default: 32" in texts["quantize"] and "{32,64,128,256}" in texts["quantize"]
