"""The compiled decode steps: greedy tokens equal the eager reference in float32, for two models of the same
shape compiled in one process (frozen weights must not leak between them through the package cache), and for
the batched (rows) step with requests joining and leaving; a second load finds the package on disk; a
compiler failure or a corrupt package leaves eager decoding working."""

from __future__ import annotations

import sys

import pytest
import torch

import glmkit
from conftest import GLM_CONFIGS, LLAMA_CONFIGS, make_hf_model
from glmkit.engine.sampling import SamplingParams
from glmkit.quant import cpu_kernels

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GLMKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "home" / "inductor"))


def greedy(llm, prompt, n=24):
    return llm.generate(prompt, max_tokens=n, temperature=0, ignore_eos=True).token_ids


@pytest.mark.parametrize("kind,config", [("llama", LLAMA_CONFIGS["gqa-bias"]), ("glm", GLM_CONFIGS["gqa-tied"])])
def test_compiled_greedy_equals_eager_in_float32(tmp_path, kind, config):
    outputs = []
    for seed in (0, 1):  # same shapes, different weights
        d = tmp_path / f"m{seed}"
        make_hf_model(kind, config, seed=seed).save_pretrained(d)
        eager = glmkit.load(d)
        prompt = [5, 9, 13, 2, 40, 7]
        expected = greedy(eager, prompt)
        llm = glmkit.load(d)
        decoder = llm.compile(batched=False)  # (the rows step: test_batched_compiled_decoding_equals_eager)
        assert decoder.ready and not decoder.cached, decoder.error
        got = greedy(llm, prompt)
        assert got == expected
        outputs.append(got)
        # the same prompt again: all but its last id are cached, and that id runs through the compiled step
        run, seen = decoder._run, []
        decoder._run = lambda args: seen.append(args[0].clone()) or run(args)
        assert greedy(llm, prompt) == expected and seen[0].tolist() == [[prompt[-1]]] and len(seen) == 24
        decoder._run = run
        # a second conversation through the same compiled step, longer than the first (the position is dynamic)
        assert greedy(llm, prompt + [3, 3, 8], 40) == greedy(eager, prompt + [3, 3, 8], 40)
        again = glmkit.load(d)  # a later run: the package comes from disk
        assert again.compile(batched=False).cached and greedy(again, prompt) == expected
    assert outputs[0] != outputs[1]


def joining_and_leaving(llm, prompts: list[list[int]]) -> tuple[list[list[int]], dict]:
    """Greedy outputs of requests that join a 4-row engine at different steps and leave after different lengths
    (the fifth waits for a free row), and the engine's step counts by path; every step decodes the rows in use
    together."""
    engine = llm.make_engine(max_batch=4)
    plan = {0: [(0, 14), (1, 5)], 2: [(2, 11)], 3: [(3, 9)], 5: [(4, 7)]}  # step -> (prompt, max_tokens) joining
    seqs, step = [], 0
    while step <= max(plan) or engine.has_work:
        seqs += [engine.submit(prompts[i], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
                 for i, n in plan.get(step, [])]
        engine.step()
        step += 1
    return [s.output for s in seqs], engine.runner.steps


def chatglm6b():
    from pathlib import Path

    return Path(__file__).parent / "fixtures" / "chatglm-official-rich" / "v1"


@pytest.mark.parametrize("kind", ["llama", "glm4", "chatglm6b"])
def test_batched_compiled_decoding_equals_eager(tmp_path, kind):
    """The compiled rows step (rows 0..n-1 at their own offsets, a dynamic batch) decodes exactly like the eager
    batched step, greedy in float32, with requests joining and leaving mid-batch; both compiled steps were used."""
    if kind == "chatglm6b":  # the official checkpoint: 2d positions, the bidirectional prefix
        folder = chatglm6b()
    else:
        folder = tmp_path / "m"
        config = LLAMA_CONFIGS["mqa-tied"] if kind == "llama" else GLM_CONFIGS["mqa-untied"]
        make_hf_model(kind, config, seed=5).save_pretrained(folder)
    eager, llm = glmkit.load(folder), glmkit.load(folder)
    V = llm.config.vocab_size
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(5, V - 10, (n,), generator=g).tolist() for n in (7, 3, 12, 5, 9)]
    if kind == "chatglm6b":  # its prompts end with [gMASK] <sop>
        prompts = [p + [llm.config.gmask_token_id, llm.config.sop_token_id] for p in prompts]
    decoder = llm.compile()
    assert decoder.ready and decoder.rows_ready, (decoder.error, decoder.rows_error)
    expected, _ = joining_and_leaving(eager, prompts)
    got, steps = joining_and_leaving(llm, prompts)
    assert got == expected and all(len(out) > 2 for out in expected)
    assert steps["compiled_rows"] > 10 and steps["compiled"] > 0 and steps["eager"] == 0, steps


def test_an_int8_package_holds_only_the_packed_weights(tmp_path):
    """Each int8 weight is held once. With glmkit's kernels the package calls them on the weights' tiles; without
    them, inductor's C++ GEMM templates repack every int8 weight, and the package keeps the packed copies and drops the
    originals (torch alone kept both for dotted module names: 275 MB instead of ~170 for the default model's
    int8 step). The tied head's int8 table stays: the embedding reads its rows. The package still computes the
    eager model's logits (bfloat16, so within rounding)."""
    import re
    import zipfile

    from glmkit.kv_cache import KVCache

    config = dict(LLAMA_CONFIGS["mqa-tied"], hidden_size=96, intermediate_size=128, head_dim=32)
    make_hf_model("llama", config).save_pretrained(tmp_path / "m")
    llm = glmkit.load(tmp_path / "m", quantize="int8")
    decoder = llm.compile(batched=False)
    assert decoder.ready, decoder.error
    with zipfile.ZipFile(decoder.path) as z:
        wrapper = next(z.read(n).decode() for n in z.namelist() if n.endswith(".wrapper.cpp"))
    names = re.findall(r'constants_info_\[\d+\]\.name = "([^"]+)"', wrapper)
    if cpu_kernels.available():  # glmkit's int8 kernel reads the layers' tiles as stored: each is held once
        assert llm.model.lm_head.layout == "rows"  # 97 rows, not tiles of 16: inductor's template repacks it
        assert sum(n.endswith("_q") for n in names) == 9 and sum(n.startswith("constant") for n in names) == 1, names
    else:
        assert "model_lm_head_q" in names and sum(n.startswith("constant") for n in names) == 9  # 2 layers x 4 + head
        assert not [n for n in names if n.endswith("_q") and n != "model_lm_head_q"], names

    c, prompt = llm.model.config, torch.tensor([[5, 9, 13, 2, 40, 7]])
    caches = [KVCache(c, 1, 32, dtype=llm.model.dtype) for _ in range(2)]
    with torch.no_grad():
        for cache in caches:
            llm.model(prompt, torch.arange(6)[None], cache, 0)
        token, position = torch.tensor([[11]]), torch.tensor([[6]])
        eager = llm.model(token, position, caches[0], 6)[:, -1].float()  # (1, V)
        compiled = decoder(token, position, caches[1], 6).float()  # (1, V)
    assert (compiled - eager).abs().max() < 0.05 * eager.abs().max()
    assert compiled.argmax() == eager.argmax()


def test_compile_failure_or_corrupt_package_leaves_eager_decoding(tmp_path, monkeypatch):
    from glmkit.engine import packages
    from glmkit.engine.compiled import inductor_options, package_key
    from glmkit.llm import compiled_dir as packages_dir

    d = tmp_path / "m"
    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"]).save_pretrained(d)
    llm = glmkit.load(d)
    expected = greedy(llm, [4, 5, 6])
    corrupt = packages_dir() / f"decode-{package_key(llm.model, inductor_options(llm.model), llm.weight_files)}.pt2"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    packages.companion(corrupt).write_bytes(b"PK\x03\x04 truncated too")  # the batched step's package

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with pytest.warns(UserWarning, match="stays eager"):
        decoder = llm.compile()
    assert not decoder.ready and "no C++ compiler" in decoder.error
    assert not decoder.rows_ready and "no C++ compiler" in decoder.rows_error
    assert not corrupt.exists() and not list(corrupt.parent.iterdir())  # no corrupt or partial package is left
    assert greedy(llm, [4, 5, 6]) == expected


def test_the_package_key_reads_no_weights_but_follows_their_files(tmp_path):
    """A loaded checkpoint's package is keyed on its files' identity (no weight byte read at start-up): the same
    files give the same key on every load; other weights written there (or a LoRA adapter) give another; an
    in-memory model is keyed on its bytes."""
    from glmkit.engine.compiled import inductor_options, package_key

    d = tmp_path / "m"
    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"]).save_pretrained(d)

    def key(llm):
        return package_key(llm.model, inductor_options(llm.model), llm.weight_files)

    first = glmkit.load(d)
    assert first.weight_files and key(first) == key(glmkit.load(d))
    reads = []
    original = torch.Tensor.numpy
    try:
        torch.Tensor.numpy = lambda t, *a, **k: reads.append(1) or original(t, *a, **k)
        key(first)
    finally:
        torch.Tensor.numpy = original
    assert not reads
    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"], seed=5).save_pretrained(d)
    assert key(glmkit.load(d)) != key(first)
    first.weight_files = None  # e.g. a model built in memory: every byte counts
    changed = glmkit.load(d)
    changed.weight_files = None
    assert key(first) != key(changed)


def test_compiled_step_with_chatglm6b_2d_positions():
    """ChatGLM-6B (v1): the official checkpoint's greedy continuation, eager and compiled."""
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(__file__).parent / "fixtures" / "chatglm-official-rich" / "v1"
    prompt = load_file(folder / "expected.safetensors")["input_ids"][0].tolist()
    expected = greedy(glmkit.load(folder), prompt, 12)
    llm = glmkit.load(folder)
    assert llm.compile(batched=False).ready
    assert greedy(llm, prompt, 12) == expected


def test_decode_attention_spelled_out_equals_sdpa(monkeypatch):
    """Compiled steps use decode_attention's explicit maths instead of SDPA: the same numbers (float32), for
    grouped and plain heads."""
    from glmkit.model import decode_attention

    g = torch.Generator().manual_seed(0)
    for K, G in [(3, 3), (4, 1)]:
        q, k, v = (torch.randn(2, K, n, 16, generator=g) for n in (G, 37, 37))
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        got = decode_attention(q, k, v)
        monkeypatch.undo()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_package_on_disk_is_used_without_compiling(tmp_path):
    """build=False (what the CLI does without --compile) loads a package that is already on disk, and otherwise
    stays eager without compiling, writing or warning."""
    import warnings

    from glmkit.llm import compiled_dir as packages_dir

    make_hf_model("llama", LLAMA_CONFIGS["gqa-bias"], seed=3).save_pretrained(tmp_path / "m")
    prompt = [5, 9, 13, 2, 40, 7]
    expected = greedy(glmkit.load(tmp_path / "m"), prompt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        none = glmkit.load(tmp_path / "m").compile(build=False)
    assert not none.ready and "glmkit compile" in none.error
    assert not packages_dir().exists() or not list(packages_dir().iterdir())
    assert glmkit.load(tmp_path / "m").compile(batched=False).ready  # glmkit compile
    make_hf_model("llama", LLAMA_CONFIGS["gqa-bias"], seed=4).save_pretrained(tmp_path / "other")
    other = glmkit.load(tmp_path / "other").compile(build=False)  # a package on disk, but another model's
    assert not other.ready and "for this model" in other.error and len(list(packages_dir().glob("*.pt2"))) == 1
    llm = glmkit.load(tmp_path / "m")
    found = llm.compile(background=True, build=False)
    assert found.wait(60) and found.cached
    assert greedy(llm, prompt) == expected


def test_a_folder_others_can_write_is_not_trusted(tmp_path):
    """Compiled packages are native code: from a group- or world-writable folder none is loaded."""
    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"]).save_pretrained(tmp_path / "m")
    llm = glmkit.load(tmp_path / "m")
    folder = tmp_path / "home" / "compiled"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    with pytest.warns(UserWarning, match="writable by other users"):
        decoder = llm.compile(build=False)
    assert not decoder.ready and "writable by other users" in decoder.error


def test_package_listing_garbage_collection_and_clearing(tmp_path, capsys):
    """Packages carry the model they were built for; a build keeps the 3 most recently used per model;
    `glmkit compile --list / --clear` show and remove them."""
    import argparse
    import os

    from glmkit.cli import compile as compile_cli
    from glmkit.engine import packages

    directory = tmp_path / "home" / "compiled"
    directory.mkdir(parents=True)
    for i in range(5):
        for model in ("a", "b"):
            path = directory / f"decode-{model}{i}.pt2"
            path.write_bytes(b"x" * 1000)
            packages.record(path, model)
            os.utime(path, (1000 + i, 1000 + i))  # used at time 1000 + i
    packages.touch(directory / "decode-a0.pt2")  # the oldest one of model a, used just now
    removed = packages.collect_garbage(directory)
    kept = sorted(p.name for p in directory.glob("*.pt2"))
    assert kept == ["decode-a0.pt2", "decode-a3.pt2", "decode-a4.pt2", "decode-b2.pt2", "decode-b3.pt2",
                    "decode-b4.pt2"] and len(removed) == 4
    assert not (directory / "decode-b0.json").exists()  # records go with their packages
    compile_cli.main(argparse.Namespace(list=True, clear=False))
    listed = capsys.readouterr().out
    assert "6 compiled package(s)" in listed and listed.splitlines()[0].startswith("decode-a0.pt2")
    compile_cli.main(argparse.Namespace(list=False, clear=True))
    assert "removed 6" in capsys.readouterr().out and not list(directory.iterdir())


def test_export_never_touches_the_live_model(tmp_path, monkeypatch):
    """Building runs beside eager decoding (a background build): torch.export puts fake tensors in place of
    the parameters of the module it traces, so it traces a twin of the model that shares its weights; the live
    model's parameters stay real throughout the trace (a forward hook checks them mid-trace)."""
    from torch._subclasses.fake_tensor import FakeTensor

    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"]).save_pretrained(tmp_path / "m")
    llm = glmkit.load(tmp_path / "m")
    live = llm.model.layers[0].attn.qkv
    seen = []
    llm.model.layers[0].register_forward_hook(lambda *_: seen.append(isinstance(live.weight, FakeTensor)))

    def no_compiler(*args, **kwargs):
        raise RuntimeError("stop after the export")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiler)
    with pytest.warns(UserWarning, match="stays eager"):
        llm.compile(batched=False)
    assert seen and not any(seen)  # traced (the hook ran), and the live weights were never fake
    assert not isinstance(live.weight, FakeTensor) and greedy(llm, [4, 5, 6])


def _huge_kb(t: torch.Tensor) -> int:
    """kB of t's memory on transparent huge pages: AnonHugePages of the mappings it overlaps (/proc/self/smaps;
    advising part of a mapping splits it)."""
    start, end, overlaps, kb = t.data_ptr(), t.data_ptr() + t.nbytes, False, 0
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping's header line
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            overlaps = lo < end and start < hi
        elif overlaps and fields[0] == "AnonHugePages:":
            kb += int(fields[1])
    return kb


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_a_loaded_package_moves_its_weights_onto_huge_pages(monkeypatch):
    from pathlib import Path

    from glmkit.engine import hugepages

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not thp.exists() or "[never]" in thp.read_text():
        pytest.skip("this kernel gives no transparent huge pages")

    def load_and_collapse() -> torch.Tensor:  # as CompiledDecoder loads a package, then collapses its mappings
        weights, spans = hugepages.loaded(lambda: torch.ones(64 << 20, dtype=torch.uint8))  # a new 64 MiB mapping
        hugepages.collapse(spans)
        return weights

    assert _huge_kb(load_and_collapse()) >= 32 << 10  # at least half of it on 2 MiB pages
    if "[madvise]" in thp.read_text():  # (with "always" the kernel gives huge pages unasked)
        monkeypatch.setenv("GLMKIT_HUGE_PAGES", "0")
        assert _huge_kb(load_and_collapse()) == 0  # turned off: left as malloc gave it
