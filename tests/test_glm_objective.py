"""The GLM blank-infilling layout against hand-computed examples, and the invariants of sampled ones."""

from __future__ import annotations

import random

import pytest
import torch

from glmkit.model import attention_mask
from glmkit.train.glm_objective import IGNORE, GLMTokens, build_sample, glm_sample, sample_spans

M, G, SOP, EOP = 90, 91, 92, 93
IDS = GLMTokens(mask=M, smask=94, gmask=G, sop=SOP, eop=EOP)


def test_hand_computed_example():
    # x1..x6 = 1..6, spans {x3} and {x5, x6}, Part B order: second span first (as in the GLM paper's figure)
    s = build_sample([1, 2, 3, 4, 5, 6], spans=[(2, 3), (4, 6)], order=[1, 0], mask_id=M, sop=SOP, eop=EOP)
    assert s.input_ids == [1, 2, M, 4, M, SOP, 5, 6, SOP, 3]
    assert s.position_ids == [[0, 1, 2, 3, 4, 4, 4, 4, 2, 2], [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]]
    assert s.prefix_len == 5
    assert s.labels == [IGNORE] * 5 + [5, 6, EOP, 3, EOP]


@pytest.mark.parametrize("seed", range(20))
def test_sampled_invariants(seed):
    rng = random.Random(seed)
    tokens = [rng.randrange(1, 80) for _ in range(rng.randint(8, 120))]
    s = glm_sample(tokens, IDS, rng)
    T, A = len(s.input_ids), s.prefix_len
    part_a, part_b = s.input_ids[:A], s.input_ids[A:]
    masks = [i for i, t in enumerate(part_a) if t in (M, G)]
    # Part B is <sop> + span blocks; each block's labels are its span then <eop>
    starts = [i for i, t in enumerate(part_b) if t == SOP]
    assert starts and starts[0] == 0 and len(starts) == len(masks)
    spans = {}
    for k, b in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else len(part_b)
        span = part_b[b + 1:e]
        assert s.labels[A + b: A + e] == span + [EOP]  # every Part-B token predicts the next span token
        assert set(s.position_ids[0][A + b: A + e]) == {s.position_ids[0][A + b]}  # one mask position per block
        assert s.position_ids[1][A + b: A + e] == list(range(1, e - b + 1))
        spans[s.position_ids[0][A + b]] = span
    assert sorted(spans) == masks
    rebuilt = []  # putting the spans back at their masks gives the document
    for i, t in enumerate(part_a):
        rebuilt += spans[i] if i in spans else [t]
    assert rebuilt == tokens
    assert all(label == IGNORE for label in s.labels[:A]) and all(label != IGNORE for label in s.labels[A:])
    allowed = attention_mask(T, T, 0, torch.tensor([A]), torch.device("cpu"))[0, 0]  # the model's own mask
    assert not allowed[:A, A:].any()  # no Part-A token sees Part B
    assert allowed[A:, :A].all()  # Part B sees all of Part A


def test_spans_leave_a_gap_between_them():
    rng = random.Random(3)
    for _ in range(50):
        spans = sample_spans(rng, [3, 1, 4, 2], 40)
        assert all(b[0] > a[1] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= 40


def test_infill_reproduces_the_official_mask_continuation():
    """ChatGLM-6B's official greedy continuation of a [MASK] prompt (fixture v1-mask) is what infill writes
    into the blank."""
    from pathlib import Path

    from safetensors.torch import load_file

    import glmkit

    folder = Path(__file__).parent / "fixtures" / "chatglm-official-rich" / "v1-mask"
    exp = load_file(folder / "expected.safetensors")
    ids = exp["input_ids"][0].tolist()[:-1]  # the prompt without its final <sop>: infill adds it
    llm = glmkit.load(folder)
    filled = llm.infill(ids, max_tokens=12, temperature=0)
    at = ids.index(llm.config.mask_token_id)
    assert filled == ids[:at] + exp["greedy_ids"][0].tolist() + ids[at + 1:]


def test_infill_needs_a_glm_model(tmp_path):
    import glmkit
    from conftest import LLAMA_CONFIGS, make_hf_model

    make_hf_model("llama", LLAMA_CONFIGS["mqa-tied"]).save_pretrained(tmp_path)
    with pytest.raises(glmkit.GlmkitError, match="blank infilling needs a GLM"):
        glmkit.load(tmp_path).infill([1, 2, 3])


def test_cli_infill_through_the_entry_point():
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(__file__).parent / "fixtures" / "chatglm-official-rich" / "v1-mask"
    exp = load_file(folder / "expected.safetensors")
    ids = exp["input_ids"][0].tolist()[:-1]
    out = subprocess.run([sys.executable, "-m", "glmkit", "infill", str(folder), ",".join(map(str, ids)), "--ids",
                          "--max-tokens", "12", "--temperature", "0"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    at = ids.index(296)  # [MASK]
    assert [int(t) for t in out.stdout.strip().split(",")] == ids[:at] + exp["greedy_ids"][0].tolist() + ids[at + 1:]


def test_sentence_spans_hand_computed():
    from glmkit.train.glm_objective import sentence_spans

    # three sentences ending in token 9: [1 2 9] [3 9] [4 5 6 9] [7]  (the last one has no end mark)
    tokens = [1, 2, 9, 3, 9, 4, 5, 6, 9, 7]
    rng = random.Random(0)
    spans = sentence_spans(rng, tokens, frozenset({9}), ratio=0.15)
    bounds = [(0, 3), (3, 5), (5, 9), (9, 10)]
    assert spans and all(s in bounds for s in spans)  # whole sentences only
    assert len(spans) < len(bounds)  # Part A always keeps a sentence
    assert sum(e - s for s, e in spans) >= 0.15 * len(tokens)
    assert sentence_spans(rng, [1, 2, 3], frozenset({9})) == []  # one sentence: nothing to blank


def test_sentence_mode_builds_smask_samples():
    from glmkit.train.glm_objective import Mixture

    S = IDS.smask
    tokens = [1, 2, 9, 3, 9, 4, 5, 6, 9, 7, 8, 9]
    s = glm_sample(tokens, IDS, random.Random(1), Mixture(mask=0, sentence=1, gmask=0), frozenset({9}))
    A = s.prefix_len
    assert S in s.input_ids[:A] and M not in s.input_ids[:A] and G not in s.input_ids[:A]
    for i, t in enumerate(s.input_ids[:A]):  # each [sMASK]'s block predicts a whole sentence ending in 9
        if t == S:
            b = [k for k in range(A, len(s.input_ids)) if s.position_ids[0][k] == i]
            span = [s.labels[k] for k in b][:-1]
            assert span[-1] == 9 or span == tokens[-len(span):]
            assert [s.labels[k] for k in b][-1] == EOP


@pytest.mark.parametrize("weights,expected", [((1, 0, 0), M), ((0, 0, 1), G)])
def test_mixture_weights_choose_the_blank_kind(weights, expected):
    from glmkit.train.glm_objective import Mixture

    for seed in range(10):
        tokens = list(range(1, 41))
        s = glm_sample(tokens, IDS, random.Random(seed), Mixture(*weights))
        assert expected in s.input_ids[: s.prefix_len]
        if expected == G:  # one span at the end: Part A is a prefix of the text, then [gMASK]
            assert s.input_ids[: s.prefix_len] == tokens[: s.prefix_len - 1] + [G]


def test_collate_pads_and_keeps_the_2d_layout():
    from glmkit.config import ModelConfig
    from glmkit.train.data import Sample, collate

    config = ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                         num_kv_heads=2, head_dim=4, positions="2d", attention_mask="prefix", mask_token_id=M,
                         gmask_token_id=G, sop_token_id=SOP, eop_token_id=EOP)
    a = build_sample([1, 2, 3, 4, 5, 6], [(2, 3), (4, 6)], [1, 0], M, SOP, EOP)
    b = build_sample([7, 8, 9], [(1, 3)], [0], G, SOP, EOP)
    batch = collate([Sample(a.input_ids, a.labels, a.position_ids, a.prefix_len),
                     Sample(b.input_ids, b.labels, b.position_ids, b.prefix_len)], 0, config)
    pad = len(a.input_ids) - len(b.input_ids)
    assert batch["input_ids"].tolist() == [a.input_ids, b.input_ids + [0] * pad]
    assert batch["labels"][1].tolist() == b.labels + [IGNORE] * pad  # padding is never a target
    assert batch["positions"][0].tolist() == a.position_ids
    assert batch["positions"][1, :, : len(b.input_ids)].tolist() == b.position_ids
    assert batch["prefix_len"].tolist() == [5, 2]
