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
