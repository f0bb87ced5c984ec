"""The engine against the reference path and against transformers: cached greedy decoding, batching,
prefix reuse, the official greedy continuations, sampling and stopping."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import glmkit
from conftest import GLM_CONFIGS, LLAMA_CONFIGS, make_hf_model
from test_official_fixtures import CASES
from glmkit.engine.sampling import SamplingParams, argmax, candidates, make_sampler
from glmkit.errors import GlmkitError
from vocab import CHATML_SPECIALS, SMOLLM2_TEMPLATE, save_hf_tokenizer

RICH = Path(__file__).parent / "fixtures" / "chatglm-official-rich"
GREEDY = dict(temperature=0, ignore_eos=True)


def naive_greedy(llm, ids: list[int], n: int) -> list[int]:
    """The reference: recompute full logits without a cache for every new token."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(llm.logits(ids)[0, -1].argmax()))
    return ids[-n:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random models of every transformers family, saved and loaded through glmkit."""
    out = {}
    for kind, cfg in (("glm", GLM_CONFIGS["gqa-tied"]), ("glm4", GLM_CONFIGS["mqa-untied"]),
                      ("llama", LLAMA_CONFIGS["gqa-bias"])):
        d = tmp_path_factory.mktemp(kind)
        hf = make_hf_model(kind, cfg, seed=11)
        hf.save_pretrained(d)
        out[kind] = (glmkit.load(d), hf)
    return out


@pytest.mark.parametrize("folder,prefix", CASES)
def test_official_greedy_continuations(folder, prefix):
    exp = load_file(RICH / folder / "expected.safetensors")
    llm = glmkit.load(RICH / folder)
    done = llm.generate(exp[prefix + "input_ids"][0].tolist(), max_tokens=12, **GREEDY)
    assert done.token_ids == exp[prefix + "greedy_ids"][0].tolist()
    assert done.finish_reason == "length"


@pytest.mark.parametrize("kind", ["glm", "glm4", "llama"])
def test_cached_greedy_equals_naive_loop(tiny, random_ids, kind):
    llm, _ = tiny[kind]
    ids = random_ids(1, 9, llm.config.vocab_size, seed=3)[0].tolist()
    assert llm.generate(ids, max_tokens=20, **GREEDY).token_ids == naive_greedy(llm, ids, 20)


@pytest.mark.parametrize("folder", ["v1", "v1-mask", "v3", "v3-glm4like"])
def test_cached_greedy_equals_naive_loop_chatglm(folder):
    llm = glmkit.load(RICH / folder)
    exp = load_file(RICH / folder / "expected.safetensors")
    ids = exp["input_ids"][0].tolist()
    assert llm.generate(ids, max_tokens=12, **GREEDY).token_ids == naive_greedy(llm, ids, 12)


@pytest.mark.parametrize("kind", ["glm", "glm4", "llama"])
def test_greedy_equals_transformers_generate(tiny, random_ids, kind):
    llm, hf = tiny[kind]
    ids = random_ids(1, 7, llm.config.vocab_size, seed=4)
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=16,
                       eos_token_id=None, pad_token_id=0)[0, 7:].tolist()
    assert llm.generate(ids[0].tolist(), max_tokens=16, **GREEDY).token_ids == want


def test_batch_equals_one_by_one(tiny, random_ids):
    llm, _ = tiny["glm4"]
    prompts = [random_ids(1, n, llm.config.vocab_size, seed=n)[0].tolist() for n in (3, 11, 6, 17, 1, 9)]
    alone = [llm.generate(p, max_tokens=10 + i, **GREEDY).token_ids for i, p in enumerate(prompts)]
    batched = [c.token_ids for c in llm.generate_batch(prompts, max_tokens=10, **GREEDY)]
    assert batched == [a[:10] for a in alone]
    sampled = dict(temperature=0.9, top_p=0.95, seed=7, max_tokens=12)
    one = [llm.generate(p, **sampled).token_ids for p in prompts]
    assert [c.token_ids for c in llm.generate_batch(prompts, **sampled)] == one


def test_more_prompts_than_slots(tiny, random_ids):
    llm, _ = tiny["llama"]
    prompts = [random_ids(1, 4 + i % 5, llm.config.vocab_size, seed=i)[0].tolist() for i in range(20)]
    out = llm.generate_batch(prompts, max_tokens=5, **GREEDY)
    assert [c.token_ids for c in out] == [naive_greedy(llm, p, 5) for p in prompts]


def test_second_turn_reuses_cache_and_matches_full_prefill(tiny, random_ids):
    llm, _ = tiny["glm"]
    turn1 = random_ids(1, 12, llm.config.vocab_size, seed=8)[0].tolist()
    reply = llm.generate(turn1, max_tokens=8, **GREEDY).token_ids
    turn2 = turn1 + reply + random_ids(1, 5, llm.config.vocab_size, seed=9)[0].tolist()
    seq = llm.engine.submit(turn2, SamplingParams(max_tokens=8, **GREEDY))
    while not seq.done:
        llm.engine.step()
    assert seq.prefilled < len(turn2) - 10  # only the new tokens were prefilled
    assert seq.output == naive_greedy(llm, turn2, 8)


def test_cancel_frees_the_slot(tiny, random_ids):
    llm, _ = tiny["llama"]
    engine = llm.engine
    seq = engine.submit(random_ids(1, 5, llm.config.vocab_size)[0].tolist(), SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    assert seq.slot is not None
    engine.cancel(seq)
    assert seq.finish_reason == "cancelled" and seq not in engine.slots and not engine.has_work


def test_prompt_longer_than_context(tiny):
    llm, _ = tiny["llama"]
    with pytest.raises(GlmkitError, match=r"prompt has 300 tokens but this model's context is 256"):
        llm.generate([1] * 300)
    done = llm.generate([1] * 250, max_tokens=50, **GREEDY)
    assert len(done.token_ids) == 6 and done.finish_reason == "length"


# --------------------------------------------------------------------------------------- sampling
def kept(logits, top_k=0, top_p=1.0, min_p=0.0) -> set[int]:
    values, ids = candidates(logits, top_k, top_p, min_p)
    assert len(values) == (logits.numel() if ids is None else len(ids))
    return set(range(logits.numel())) if ids is None else set(ids)


def test_filters_on_crafted_logits():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    probs = torch.softmax(logits, -1)  # 0.636, 0.234, 0.086, 0.032, 0.012
    assert kept(logits, top_k=2) == {0, 1}
    assert kept(logits, top_p=0.8) == {0, 1} and kept(logits, top_p=0.5) == {0}
    assert kept(logits, min_p=0.1) == {i for i in range(5) if probs[i] >= 0.0636}  # {0, 1, 2}
    assert kept(logits, top_k=4, top_p=0.95, min_p=0.02) == {0, 1, 2}  # 0.032 after top-k is >= 0.02 * 0.636
    assert kept(logits) == set(range(5))


@pytest.mark.parametrize("as_list", [False, True])  # a tensor (no filter, min-p alone) or a list of candidates
def test_draw_follows_softmax_and_its_generator(as_list):
    """draw() picks index i with probability softmax(values)_i (never a zero-probability one), reproducibly
    from a seeded generator."""
    from glmkit.engine.sampling import draw

    values = torch.tensor([0.0, 1.0, 2.0, float("-inf"), 0.5])
    given = values.tolist() if as_list else values
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([draw(given, g) for _ in range(20000)]), minlength=5) / 20000
    torch.testing.assert_close(counts, torch.softmax(values, 0), atol=0.015, rtol=0)
    assert counts[3] == 0
    again = [draw(given, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert again[0] == again[1]


def reference_kept(logits, top_k, top_p, min_p) -> set[int]:
    """The filters as masks over the whole vocabulary, one after the other, each on what the last left."""
    x = logits.clone()
    if 0 < top_k < x.numel():
        x[x < torch.topk(x, top_k).values[-1]] = float("-inf")
    if top_p < 1.0:
        ordered, order = torch.sort(x, descending=True)
        probs = torch.softmax(ordered.double(), -1)  # (a float32 sum of thousands drifts at the nucleus's edge)
        last = ordered[(probs.cumsum(-1) - probs) < top_p].min()  # the least likely token the nucleus needs
        x[x < last] = float("-inf")  # (its ties stay)
    if min_p > 0.0:
        probs = torch.softmax(x, -1)
        x[probs < min_p * probs.max()] = float("-inf")
    return set(torch.isfinite(x).nonzero()[:, 0].tolist())


@pytest.mark.parametrize("vocab", [3000, 16384])  # the second is searched in two halves (SPLIT_FROM)
@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])  # flat (the nucleus lies past NUCLEUS_HEADS) to peaked
def test_candidates_equal_whole_vocabulary_filters(scale, vocab):
    g, draw = torch.Generator().manual_seed(int(scale * 10)), random.Random(int(scale * 10))
    for _ in range(20):
        logits = torch.randn(vocab, generator=g) * scale
        top_k, top_p, min_p = draw.randrange(200), draw.uniform(0.5, 1.0), draw.uniform(0.0, 0.1)
        for k, p, m in [(top_k, top_p, min_p), (0, top_p, 0.0), (0, top_p, min_p), (top_k, 1.0, 0.0), (0, 1.0, min_p)]:
            assert kept(logits, k, p, m) == reference_kept(logits, k, p, m), (k, p, m)
    flat = -torch.arange(1000.0) * 1e-4  # a nucleus past NUCLEUS_HEADS: wide_nucleus
    assert kept(flat, 0, 0.9, 0.0) == reference_kept(flat, 0, 0.9, 0.0) and len(kept(flat, 0, 0.9, 0.0)) > 800
    tied = torch.zeros(300)
    tied[[3, 250]] = float("-inf")  # (as a grammar's mask leaves them)
    everything_allowed = set(range(300)) - {3, 250}
    assert kept(tied, 40) == reference_kept(tied, 40, 1.0, 0.0) == everything_allowed  # ties with the k-th stay
    assert kept(tied, 40, 0.9) == kept(tied, 0, 0.5) == everything_allowed  # and ties with top-p's last token
    assert kept(torch.tensor([2.0, 1.0, 1.0, 0.0]), 0, 0.6) == {0, 1, 2}  # p(0) = 0.53: one of the 1.0s, so both
    halves = torch.zeros(16384)
    halves[[5, 9000, 16000]] = 1.0  # the best in both halves, then 16381 tied
    assert kept(halves, 2) == {5, 9000, 16000} and kept(halves, 5) == set(range(16384))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_top_k_of_the_raw_logits_equals_filtering_the_scaled_ones(dtype):
    """With top-k on, candidates() searches the logits as the model gave them (bfloat16 too) and scales only
    the few it keeps: the same tokens as scaling the whole vocabulary in float32 first, whatever the temperature."""
    g, draw = torch.Generator().manual_seed(3), random.Random(3)
    for vocab in (3000, 49152):  # one search, and the halves merged as lists (best_few)
        for _ in range(15):
            logits = (torch.randn(vocab, generator=g) * draw.choice([0.5, 3.0])).to(dtype)
            k, p, m, t = draw.randrange(1, 200), draw.uniform(0.5, 1.0), draw.uniform(0.0, 0.1), draw.uniform(0.3, 2)
            values, ids = candidates(logits, k, p, m, temperature=t)
            assert set(ids) == reference_kept(logits.float() / t, k, p, m), (k, p, m, t)
            torch.testing.assert_close(torch.tensor(values, dtype=torch.float64), logits[ids].double() / t)
    tied = torch.zeros(49152, dtype=dtype)
    tied[[7, 30000]] = 2.0
    assert set(candidates(tied, 1, 1.0, 0.0, 0.7)[1]) == {7, 30000}  # the tie with the k-th stays


def test_argmax_equals_torch_and_greedy_sampling_reports_nan():
    g = torch.Generator().manual_seed(0)
    for vocab in (49152, 65024, 3000, 1000):  # blocks searched first; a vocabulary that does not divide: torch's
        for dtype in (torch.bfloat16, torch.float32):
            for case in range(40):
                x = torch.randn(vocab, generator=g).to(dtype)
                if case % 3 == 0:  # equal maxima: the first one, as torch.argmax
                    x[torch.randint(vocab, (3,), generator=g)] = x.max() + 1
                if case % 5 == 0:
                    x[torch.randint(vocab, (1,), generator=g)] = float("nan")
                assert argmax(x) == int(torch.argmax(x)), (vocab, dtype, case)
    bad = torch.zeros(49152, dtype=torch.bfloat16)
    bad[40000] = float("nan")
    for params in (SamplingParams(temperature=0), SamplingParams(top_k=40)):  # the paths that read only the best
        with pytest.raises(GlmkitError, match="NaN or infinite logits"):
            make_sampler(params)(bad, [], [], None)


def test_penalties_on_crafted_logits():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    greedy_rep = make_sampler(SamplingParams(temperature=0, repetition_penalty=4.0))
    assert greedy_rep(logits, [0], [], None) == 2  # 2.0/4 = 0.5 < 1.0
    greedy_freq = make_sampler(SamplingParams(temperature=0, frequency_penalty=0.6))
    assert greedy_freq(logits, [], [0, 0], None) == 2  # 2.0 - 1.2 = 0.8 < 1.0
    greedy_pres = make_sampler(SamplingParams(temperature=0, presence_penalty=1.2))
    assert greedy_pres(logits, [], [0, 0], None) == 2  # presence counts once: 0.8 < 1.0
    assert make_sampler(SamplingParams(temperature=0))(logits, [0], [0], None) == 0


def test_seeded_sampling_is_reproducible(tiny, random_ids):
    llm, _ = tiny["glm"]
    ids = random_ids(1, 6, llm.config.vocab_size)[0].tolist()
    runs = [llm.generate(ids, max_tokens=25, temperature=1.0, seed=s, ignore_eos=True).token_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_nan_logits_are_reported_not_sampled():
    with pytest.raises(GlmkitError, match="NaN or infinite logits"):
        make_sampler(SamplingParams())(torch.tensor([0.0, float("nan")]), [], [], None)


def test_bad_sampling_parameters():
    with pytest.raises(GlmkitError, match=r"top_p=1.5 is out of range"):
        SamplingParams(top_p=1.5)


# ------------------------------------------------------------------------ stopping and text
@pytest.fixture(scope="module")
def chatml_llm(tmp_path_factory):
    d = tmp_path_factory.mktemp("chatml-llm")
    make_hf_model("llama", LLAMA_CONFIGS["gqa-bias"], vocab_size=500, seed=2).save_pretrained(d)
    save_hf_tokenizer(d, CHATML_SPECIALS, SMOLLM2_TEMPLATE, eos_token="<|im_end|>")
    return glmkit.load(d)


def test_stop_string_spanning_tokens(chatml_llm):
    llm = chatml_llm
    ids = llm.encode_prompt("你好 hello")
    full = llm.generate(ids, max_tokens=40, temperature=0, ignore_eos=True, stop_token_ids=[])
    tok = llm.tokenizer
    pieces = [tok.decode(full.token_ids[: i + 1]) for i in range(len(full.token_ids))]
    # a stop string made of the end of one token's text and the start of the next one's
    k = next(i for i in range(3, len(pieces) - 1)
             if len(pieces[i]) > len(pieces[i - 1]) and len(pieces[i + 1]) > len(pieces[i]))
    stop = pieces[k][-1] + pieces[k + 1][len(pieces[k])]
    cut = full.text.find(stop)
    done = llm.generate(ids, max_tokens=40, temperature=0, ignore_eos=True, stop=[stop])
    assert done.finish_reason == "stop" and done.text == full.text[:cut] and stop not in done.text
    streamed = "".join(c.text for c in llm.generate(ids, max_tokens=40, temperature=0, ignore_eos=True,
                                                     stop=[stop], stream=True))
    assert streamed == done.text


def test_stop_ids_end_generation(chatml_llm):
    llm = chatml_llm
    ids = llm.encode_prompt("hello")
    full = llm.generate(ids, max_tokens=30, temperature=0, ignore_eos=True)
    target = full.token_ids[4]
    done = llm.generate(ids, max_tokens=30, temperature=0, stop_token_ids=[target])
    assert done.finish_reason == "stop" and done.token_ids == full.token_ids[: full.token_ids.index(target)]


def test_stream_pieces_equal_completion(chatml_llm):
    llm = chatml_llm
    ids = llm.apply_chat_template([{"role": "user", "content": "中文 😀"}])
    done = llm.generate(ids, max_tokens=30, temperature=0.8, seed=3, ignore_eos=True)
    chunks = list(llm.generate(ids, max_tokens=30, temperature=0.8, seed=3, ignore_eos=True, stream=True))
    assert "".join(c.text for c in chunks) == done.text
    assert [i for c in chunks for i in c.token_ids] == done.token_ids and chunks[-1].finish_reason == "length"


def test_chat_returns_an_openai_message(chatml_llm):
    reply = chatml_llm.chat([{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)
    assert reply["finish_reason"] in ("stop", "length") and reply["usage"]["completion_tokens"] <= 8
    streamed = list(chatml_llm.chat([{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True))
    assert streamed[-1]["content"] == reply["content"]


def test_conversation_longer_than_context(chatml_llm):
    long = [{"role": "user", "content": "hello world " * 30}, {"role": "assistant", "content": "ok " * 30}] * 3
    messages = long + [{"role": "user", "content": "last question"}]
    with pytest.raises(GlmkitError, match="but this model's context is 256"):
        chatml_llm.chat(messages, max_tokens=4)
    reply = chatml_llm.chat(messages, max_tokens=4, truncate="drop_oldest", temperature=0)
    assert reply["usage"]["prompt_tokens"] < 256


def test_cli_generate_json(chatml_llm):
    out = subprocess.run([sys.executable, "-m", "glmkit", "generate", chatml_llm.source, "--prompt", "你好",
                          "--max-tokens", "6", "--temperature", "0", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout)
    assert record["usage"]["completion_tokens"] == len(record["token_ids"]) <= 6
    assert record["finish_reason"] in ("stop", "length") and record["prompt_token_ids"]
    assert record["token_ids"] == chatml_llm.generate(record["prompt_token_ids"], max_tokens=6,
                                                      temperature=0).token_ids


# ----------------------------------------------------------------------------------- fault isolation
def test_one_failing_sequence_leaves_the_batch_decoding(tiny, random_ids):
    """A failure while sampling one sequence (here its sampler raises) ends that sequence with an error; the
    sequences decoding beside it finish exactly as they would alone."""
    llm, _ = tiny["llama"]
    engine = llm.make_engine(max_batch=4)
    prompts = [random_ids(1, 6 + i, llm.config.vocab_size, seed=20 + i)[0].tolist() for i in range(3)]
    seqs = [engine.submit(p, SamplingParams(max_tokens=6, **GREEDY)) for p in prompts]
    calls = []

    def broken(logits, *rest):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("probability tensor contains inf")
        return int(logits.argmax())

    seqs[1].sample = broken
    while engine.has_work:
        engine.step()
    assert seqs[1].finish_reason == "error" and "RuntimeError" in seqs[1].error and seqs[1].error_is_internal
    for i in (0, 2):
        assert seqs[i].output == naive_greedy(llm, prompts[i], 6) and seqs[i].finish_reason == "length"
    assert engine.running == 0


def test_pathological_sampling_values_are_bounded():
    """Values that would make probabilities non-finite are refused, or (temperature / top_p below a floor)
    mean greedy; seeds beyond what a generator takes are refused, in the Python API, the CLI and the server."""
    assert SamplingParams(temperature=1e-40).temperature == 0 and SamplingParams(top_p=1e-300).temperature == 0
    for bad in (dict(temperature=float("inf")), dict(temperature=float("nan")), dict(repetition_penalty=1e-300),
                dict(repetition_penalty=1e300), dict(seed=2 ** 64), dict(seed=-1)):
        with pytest.raises(GlmkitError, match=r"out of range \("):
            SamplingParams(**bad)


def test_prompt_logprobs_in_chunks_equal_the_reference(tiny, random_ids):
    llm, _ = tiny["glm"]
    ids = random_ids(1, 40, llm.config.vocab_size, seed=31)[0].tolist()
    lp = torch.log_softmax(llm.logits(ids)[0].double(), dim=-1)  # (T, V)
    got = llm.prompt_logprobs(ids, top=3, chunk=7)
    assert got[0] == (ids[0], None, {}) and [g[0] for g in got] == ids
    for i in range(1, len(ids)):
        assert abs(got[i][1] - float(lp[i - 1, ids[i]])) < 1e-4
        top = torch.topk(lp[i - 1], 3)
        assert list(got[i][2]) == top.indices.tolist()


@pytest.mark.parametrize("kind", ["glm", "llama"])
def test_samples_of_one_prompt_share_its_prefill(tiny, random_ids, kind):
    """n sequences of one prompt admitted together: one prefill, the others copy its cache row; each one's
    greedy ids equal the naive loop's (ChatGLM-6B's 2d positions and prefix mask included), and seeded ones
    differ from each other."""
    llm, _ = tiny[kind]
    engine = llm.make_engine(max_batch=4)
    prompt = random_ids(1, 11, llm.config.vocab_size, seed=5)[0].tolist()
    seqs = [engine.submit(prompt, SamplingParams(max_tokens=6, **GREEDY)) for _ in range(3)]
    seqs.append(engine.submit(prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=7, ignore_eos=True)))
    while engine.has_work:
        engine.step()
    assert [s.prefilled for s in seqs] == [len(prompt), 0, 0, 0]
    want = naive_greedy(llm, prompt, 6)
    assert all(s.output == want for s in seqs[:3])
    alone = llm.make_engine(max_batch=1)
    solo = alone.submit(prompt, SamplingParams(max_tokens=6, temperature=1.0, seed=7, ignore_eos=True))
    while alone.has_work:
        alone.step()
    assert seqs[3].output == solo.output and seqs[3].output != want


@pytest.mark.parametrize("kind", ["glm", "glm4", "llama"])
def test_chunked_prefill_equals_whole_and_keeps_others_decoding(tiny, random_ids, kind):
    """A step prefills at most prefill_chunk prompt tokens: a long prompt arriving while another sequence
    decodes is prefilled a chunk per step, and the running one gets a token at every one of those steps. Every
    sequence's greedy ids equal the naive loop's; samples of the long prompt still share its prefill."""
    llm, _ = tiny[kind]
    engine = llm.make_engine(max_batch=4, prefill_chunk=5)
    short = random_ids(1, 4, llm.config.vocab_size, seed=21)[0].tolist()
    long = random_ids(1, 23, llm.config.vocab_size, seed=22)[0].tolist()
    running = engine.submit(short, SamplingParams(max_tokens=20, **GREEDY))
    engine.step()
    arrivals = [engine.submit(long, SamplingParams(max_tokens=6, **GREEDY)) for _ in range(2)]
    steps_while_prefilling = 0
    while arrivals[0].fed < len(long):
        before = len(running.output)
        engine.step()
        steps_while_prefilling += 1
        assert len(running.output) == before + 1  # the running stream never waits for the whole prompt
    assert steps_while_prefilling == -(-len(long) // 5)
    while engine.has_work:
        engine.step()
    assert running.output == naive_greedy(llm, short, 20)
    assert [s.output for s in arrivals] == [naive_greedy(llm, long, 6)] * 2
    assert [s.prefilled for s in arrivals] == [len(long), 0]


def test_cancel_while_prefilling_frees_the_slot(tiny, random_ids):
    llm, _ = tiny["llama"]
    engine = llm.make_engine(max_batch=2, prefill_chunk=4)
    prompt = random_ids(1, 17, llm.config.vocab_size, seed=3)[0].tolist()
    seq = engine.submit(prompt, SamplingParams(max_tokens=5))
    engine.step()
    slot = seq.slot
    assert seq in engine.prefilling and seq.fed == 4
    engine.cancel(seq)
    assert not engine.prefilling and not engine.has_work and engine.slots[slot] is None
    assert engine.cached[slot] == prompt[:4]  # the keys it did write stay reusable by a later prompt
    with pytest.raises(GlmkitError, match="prefill_chunk"):
        llm.make_engine(prefill_chunk=0)


def test_a_lone_stream_in_any_row_takes_the_one_row_step(tiny, random_ids):
    """When one sequence is left decoding, in row 1 here, its steps are one-row steps on that row, the case the
    compiled step serves (here a stand-in that records the rows it gets and runs the model), not batched steps
    over idle rows; its greedy ids still equal the naive loop's."""
    llm, _ = tiny["llama"]
    engine = llm.make_engine(max_batch=4)
    seen = []

    class Recorder:
        def usable(self, start):
            return True

        def usable_rows(self, n, attended):
            return False  # batched steps run the model

        def __call__(self, tokens, positions, cache, start):
            seen.append(cache.k[0].data_ptr())
            return llm.model(tokens, positions, cache, start)[:, -1]

    engine.runner.compiled = Recorder()
    first, second = (random_ids(1, 6, llm.config.vocab_size, seed=s)[0].tolist() for s in (31, 32))
    a = engine.submit(first, SamplingParams(max_tokens=2, **GREEDY))
    b = engine.submit(second, SamplingParams(max_tokens=9, **GREEDY))
    while engine.has_work:
        engine.step()
    assert (a.slot, b.slot) == (None, None) and len(seen) >= 6
    row1 = engine.runner.cache.rows(1, 2).k[0].data_ptr()
    assert set(seen) == {row1}  # every one-row step ran on row 1, where b lives
    assert b.output == naive_greedy(llm, second, 9) and a.output == naive_greedy(llm, first, 2)
