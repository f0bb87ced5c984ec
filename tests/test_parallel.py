"""Tensor parallelism on torch.distributed (gloo, 2 CPU processes): a dense GLM-4, a GLM-4.5-shaped MoE and Llama
models split across ranks give the single-process logits, `glmkit generate` under torchrun prints what one
process prints, `glmkit serve` under torchrun answers the openai client as one process does (streaming and
concurrent requests too), each rank holds about half the weights, and a rank that dies ends the server with a
clear error instead of a hang."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import glmkit
from conftest import LLAMA_CONFIGS, make_hf_model

pytestmark = pytest.mark.slow
TESTS = Path(__file__).parent
LOGITS = r"""
import sys, torch, glmkit
llm = glmkit.load(sys.argv[1], dtype="float32")  # the other ranks follow rank 0 inside, and exit with it
ids = [[5, 9, 13, 2, 40, 7, 11, 3], [8, 1, 4, 4, 20, 6, 9, 30]]
torch.save({"logits": llm.logits(ids), "greedy": llm.generate(ids[0], max_tokens=12, temperature=0,
            ignore_eos=True).token_ids, "batch": [c.token_ids for c in llm.generate_batch(ids, max_tokens=8,
            temperature=0, ignore_eos=True)]}, sys.argv[2])
"""
SHARES = r"""
import os, sys, json, torch, torch.distributed as dist
from glmkit import loaders, parallel
from glmkit.model import Transformer
dist.init_process_group("gloo")
world = parallel.World(dist.get_rank(), dist.get_world_size(), sys.argv[2])
model = loaders.assemble(loaders.open(sys.argv[1]), Transformer.skeleton, "cpu", "float32", None, world=world)
mine = sum(t.numel() for t in model.state_dict().values())
with open(f"{sys.argv[3]}.{world.rank}", "w") as f:  # a file per rank: two ranks' prints may interleave
    json.dump({"rank": world.rank, "params": mine}, f)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, timeout: float = 240, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=TESTS, **kw)


def models(root: Path) -> dict[str, Path]:
    from scripted import write_glm45_checkpoint
    from test_moe import make_moe

    out = {"glm4": write_glm45_checkpoint(root / "glm4"), "moe": root / "moe", "llama": root / "llama",
           "llama-mqa-tied": root / "llama-mqa-tied"}
    hf = make_moe(out["moe"], "groups", seed=5)
    from test_moe import write_glm4moe_gguf

    out["moe-gguf"] = root / "moe.gguf"  # Q8_0 experts: dequantized, cut and (as a float model here) kept float
    write_glm4moe_gguf(hf, out["moe-gguf"], "Q8_0")
    make_hf_model("llama", LLAMA_CONFIGS["gqa-bias"], seed=6).save_pretrained(out["llama"])
    make_hf_model("llama", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=12, rope_theta=10000.0,
                                tie_word_embeddings=True), seed=7).save_pretrained(out["llama-mqa-tied"])
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return models(tmp_path_factory.mktemp("tp"))


@pytest.mark.parametrize("kind", ["glm4", "moe", "moe-by-expert", "moe-gguf", "llama", "llama-mqa-tied"])
def test_two_ranks_give_the_single_process_logits(checkpoints, tmp_path, kind):
    """Logits within 1e-5; greedy decoding and a continuous batch of two prompts token for token (MoE experts
    split by columns, the default, and whole experts per rank)."""
    env = {**os.environ, "GLMKIT_SPLIT_EXPERTS": "experts" if kind.endswith("by-expert") else "columns"}
    kind = kind.removesuffix("-by-expert")
    done = torchrun(str(_script(tmp_path, LOGITS)), str(checkpoints[kind]), str(tmp_path / "tp.pt"), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "tp.pt")
    llm = glmkit.load(checkpoints[kind], dtype="float32")
    ids = [[5, 9, 13, 2, 40, 7, 11, 3], [8, 1, 4, 4, 20, 6, 9, 30]]
    torch.testing.assert_close(got["logits"], llm.logits(ids), atol=1e-5, rtol=0)
    assert got["greedy"] == llm.generate(ids[0], max_tokens=12, temperature=0, ignore_eos=True).token_ids
    assert got["batch"] == [c.token_ids for c in llm.generate_batch(ids, max_tokens=8, temperature=0,
                                                                     ignore_eos=True)]


def _script(tmp_path: Path, source: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(source)
    return path


@pytest.mark.parametrize("kind", ["glm4", "moe", "moe-by-expert"])
def test_each_rank_holds_about_half_the_weights(checkpoints, tmp_path, kind):
    split = "experts" if kind.endswith("by-expert") else "columns"
    kind = kind.removesuffix("-by-expert")
    done = torchrun(str(_script(tmp_path, SHARES)), str(checkpoints[kind]), split, str(tmp_path / "share"))
    assert done.returncode == 0, done.stderr[-3000:]
    shares = [json.loads((tmp_path / f"share.{rank}").read_text()) for rank in (0, 1)]
    total = sum(t.numel() for t in glmkit.load(checkpoints[kind], dtype="float32").model.state_dict().values())
    assert sorted(s["rank"] for s in shares) == [0, 1]
    assert all(s["params"] <= 0.6 * total for s in shares), (shares, total)


def test_generate_under_torchrun_prints_what_one_process_prints(checkpoints):
    args = ["generate", str(checkpoints["glm4"]), "--prompt", "Hello there, how are", "--temperature", "0",
            "--max-tokens", "16", "--eager"]
    one = subprocess.run([sys.executable, "-m", "glmkit", *args], capture_output=True, text=True, timeout=120, cwd=TESTS)
    two = torchrun("-m", "glmkit", *args)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout and one.stdout.strip()


def _serve(cmd: list[str], port: int, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=TESTS,
                            env=env, start_new_session=True)
    import httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError("the server did not come up")


def _ask(client, messages, **kw) -> tuple[str, str]:
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True}, **kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True, extra_body={"ignore_eos": True},
        **kw) if c.choices)
    return whole, streamed


def test_serve_under_torchrun_answers_as_one_process(checkpoints):
    from openai import OpenAI

    from conftest import LiveServer

    questions = [[{"role": "user", "content": f"Say: item {i}"}] for i in range(4)]
    single = LiveServer(glmkit.load(checkpoints["glm4"]))
    try:
        want = [_ask(single.client(), q) for q in questions]
    finally:
        single.close()
    port = free_port()
    proc = _serve([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(free_port()), "-m", "glmkit", "serve", str(checkpoints["glm4"]),
                   "--port", str(port), "--model-name", "tiny", "--eager"], port)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        got: dict[int, tuple] = {}
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, _ask(client, questions[i])))
                   for i in range(4)]  # concurrent requests: continuous batching across the ranks
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [got.get(i) for i in range(4)] == want
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_a_rank_that_dies_ends_the_server_with_a_clear_error(checkpoints):
    """Rank 1 killed mid-reply: rank 0's request ends with an error naming the lost rank, and rank 0 exits
    (non-zero) instead of hanging; the group is two plain processes on env:// rendezvous, no torchrun agent."""
    from openai import OpenAI

    port, master = free_port(), free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "glmkit", "serve", str(checkpoints["glm4"]), "--port", str(port),
               "--model-name", "tiny", "--eager"]
        if rank == 0:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                          cwd=TESTS, start_new_session=True))
        else:
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                          cwd=TESTS, start_new_session=True))
    try:
        deadline = time.time() + 180
        import httpx

        while True:
            if procs[0].poll() is not None or time.time() > deadline:
                procs[0].kill()
                pytest.fail(f"rank 0 did not come up (exit code {procs[0].wait()}): {procs[0].stderr.read()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=200, stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        procs[1].kill()
        with pytest.raises(Exception) as caught:  # the stream ends with the server's error, not a hang
            for _ in stream:
                pass
        assert "rank" in str(caught.value)
        code = procs[0].wait(timeout=60)
        assert code != 0 and "another rank of the tensor-parallel group stopped answering" in procs[0].stderr.read()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)


VISION = r"""
import sys, torch, glmkit
sys.path.insert(0, sys.argv[3])  # the tests' helpers
from test_vision import conversation, picture
llm = glmkit.load(sys.argv[1], dtype="float32")
try:  # a request that fails inside a step (image tokens without images) fails on every rank; the group goes on
    llm.generate([llm.config.vision.image_token_id] * 3 + [5], max_tokens=2)
    raise SystemExit("expected an error")
except glmkit.GlmkitError as e:
    assert "image placeholder" in str(e), e
ids = llm.apply_chat_template(conversation([picture(60, 90, seed=5), picture(90, 40, seed=6)])[0])
torch.save(llm.generate(ids, max_tokens=8, temperature=0, ignore_eos=True).token_ids, sys.argv[2])
"""


def test_a_vision_model_split_across_ranks(tmp_path):
    """GLM-4.1V with two images under 2 ranks: the text model split, the vision tower whole on each rank; the
    greedy reply equals one process's."""
    from test_vision import conversation, make_vlm, picture

    make_vlm(tmp_path / "vlm", "glm4v", seed=3)
    done = torchrun(str(_script(tmp_path, VISION)), str(tmp_path / "vlm"), str(tmp_path / "out.pt"), str(TESTS))
    assert done.returncode == 0, done.stderr[-3000:]
    llm = glmkit.load(tmp_path / "vlm", dtype="float32")
    ids = llm.apply_chat_template(conversation([picture(60, 90, seed=5), picture(90, 40, seed=6)])[0])
    assert torch.load(tmp_path / "out.pt") == llm.generate(ids, max_tokens=8, temperature=0, ignore_eos=True).token_ids
