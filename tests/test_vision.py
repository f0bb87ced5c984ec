"""GLM-4.1V / GLM-4.6V-Flash (glm4v) and GLM-4.5V / GLM-4.6V (glm4v_moe): images against transformers.

Tiny random Glm4vForConditionalGeneration / Glm4vMoeForConditionalGeneration saved as released checkpoints are
(weights, tokenizer with the image tokens, preprocessor_config.json, a GLM-V style chat template); transformers'
Glm4vProcessor (its PIL image processor) and the model classes are the reference for preprocessing, vision
features, logits and greedy replies.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch

import glmkit
from glmkit.errors import GlmkitError

SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
            "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
            "<|end_of_video|>", "<|image|>", "<|video|>"]
TEMPLATE = (Path(__file__).parent / "fixtures" / "templates" / "GLM-4.1V-style.jinja").read_text()
PREPROCESSOR = dict(size={"shortest_edge": 28 * 28 * 2, "longest_edge": 28 * 28 * 40}, patch_size=14,
                    temporal_patch_size=2, merge_size=2)
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)
VISION = dict(depth=2, hidden_size=32, num_heads=2, out_hidden_size=64, intermediate_size=48)
MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
           first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, head_dim=16)


def make_vlm(directory: Path, kind: str = "glm4v", seed: int = 0):
    """A tiny random GLM-V checkpoint as released: -> (transformers model, its processor)."""
    from transformers import (Glm4vConfig, Glm4vForConditionalGeneration, Glm4vImageProcessorPil, Glm4vMoeConfig,
                              Glm4vMoeForConditionalGeneration, Glm4vProcessor)
    from vocab import save_hf_tokenizer
    from transformers import AutoTokenizer

    save_hf_tokenizer(directory, SPECIALS, TEMPLATE, eos_token="<|endoftext|>")
    tok = AutoTokenizer.from_pretrained(directory)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>",
                                                     "<|begin_of_video|>", "<|end_of_video|>")}
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}
    text = {**TEXT, "vocab_size": len(tok), "rope_parameters": rope, **(MOE if kind == "glm4v_moe" else {})}
    special = dict(image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
                   image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
                   video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"])
    torch.manual_seed(seed)
    if kind == "glm4v":
        model = Glm4vForConditionalGeneration(Glm4vConfig(text_config=text, vision_config=VISION, **special))
    else:
        model = Glm4vMoeForConditionalGeneration(Glm4vMoeConfig(text_config=text, vision_config=VISION, **special))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight")):
                p.normal_(0, 0.08 if "position_embedding" not in name else 0.5)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.2)
    model.eval().save_pretrained(directory)
    processor = _processor(Glm4vProcessor, Glm4vImageProcessorPil(**PREPROCESSOR), tok)
    processor.image_processor.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    return model, processor


def _processor(cls, image_processor, tokenizer):
    """transformers' Glm4vProcessor without a video processor (which needs torchvision, absent here): its class
    check on the missing video processor is skipped; images go through it unchanged."""
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=TEMPLATE)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0):
    """A random-noise picture (smooth enough that resizing matters, noisy enough that every pixel counts)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (max(height // 4, 1), max(width // 4, 1), 4), generator=g, dtype=torch.uint8)
    img = Image.fromarray(small.numpy(), "RGBA").resize((width, height), Image.BILINEAR)
    return img.convert(mode)


def data_url(img, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def conversation(images: list, question: str = "What is in the picture?") -> list[dict]:
    """OpenAI messages (data-URL images) and the same for transformers' processor (PIL images)."""
    ours = [{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_url(i)}} for i in images),
                                         {"type": "text", "text": question}]}]
    theirs = [{"role": "user", "content": [*({"type": "image", "image": i} for i in images),
                                           {"type": "text", "text": question}]}]
    return ours, theirs


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    out = {}
    for kind in ("glm4v", "glm4v_moe"):
        directory = tmp_path_factory.mktemp(kind)
        out[kind] = (directory, *make_vlm(directory, kind, seed=3 if kind == "glm4v" else 4))
    return out


@pytest.mark.parametrize("size,mode", [((60, 90), "RGB"), ((200, 37), "RGBA"), ((30, 30), "L"), ((500, 333), "P"),
                                       ((17, 300), "LA")])
def test_preprocessing_equals_the_image_processor(size, mode):
    """Pixels and grid exactly as transformers' Glm4vImageProcessor (PIL backend): resize rule, bicubic resampling,
    transparency over white, rescale and normalisation rounding, patch order."""
    from transformers import Glm4vImageProcessorPil

    from glmkit.images import Preprocessing, preprocess
    from glmkit.config import VisionConfig

    img = picture(*size, mode=mode, seed=sum(size))
    want = Glm4vImageProcessorPil(**PREPROCESSOR)(images=[img], return_tensors="pt")
    vision = VisionConfig(depth=1, hidden_size=32, num_heads=2, patch_size=14, out_hidden_size=64, intermediate_size=48)
    pixels, grid = preprocess(img, Preprocessing.of(PREPROCESSOR, vision))
    assert list(grid) == want["image_grid_thw"][0].tolist()
    assert pixels.dtype == want["pixel_values"].dtype and torch.equal(pixels, want["pixel_values"])


@pytest.mark.parametrize("kind", ["glm4v", "glm4v_moe"])
def test_features_and_logits_equal_transformers(vlms, kind):
    """Vision features and logits of a two-image prompt (different sizes) equal transformers' within 1e-5."""
    from glmkit.positions import prompt_positions

    directory, hf, processor = vlms[kind]
    llm = glmkit.load(directory, dtype="float32")
    _, theirs = conversation([picture(60, 90, seed=1), picture(120, 50, seed=2)])
    inputs = processor.apply_chat_template(theirs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        want_features = torch.cat(hf.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        want = hf(**inputs).logits
        grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
        features = llm.model.visual(inputs["pixel_values"], grids)
        ids = inputs["input_ids"]
        positions, _ = prompt_positions(ids, llm.config, grids)
        got = llm.model(ids, positions, embeds=llm.model.embeddings(ids, features))
    torch.testing.assert_close(features, want_features, atol=1e-5, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["glm4v", "glm4v_moe"])
@pytest.mark.parametrize("count", [1, 2])
def test_greedy_chat_with_images_equals_transformers(vlms, kind, count):
    """llm.chat on OpenAI messages with data-URL images: the prompt ids equal the processor's, and the greedy
    reply equals transformers' generate token for token (one image; two images of different sizes)."""
    directory, hf, processor = vlms[kind]
    llm = glmkit.load(directory, dtype="float32")
    ours, theirs = conversation([picture(60, 90, seed=5), picture(150, 60, seed=6)][:count])
    inputs = processor.apply_chat_template(theirs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert llm.apply_chat_template(ours) == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=10, do_sample=False)
    want = out[0, inputs["input_ids"].shape[1]:].tolist()
    reply = llm.generate(llm.apply_chat_template(ours), max_tokens=10, temperature=0, ignore_eos=True)
    assert reply.token_ids == want


def test_prefix_reuse_tells_images_apart(vlms):
    """Two prompts whose ids are equal (same-size images behind the same placeholders) but whose images differ:
    the second must not reuse the first's cached keys; the same image again may (and gives the same reply)."""
    directory = vlms["glm4v"][0]
    llm, fresh = glmkit.load(directory, dtype="float32"), glmkit.load(directory, dtype="float32")
    a, b = conversation([picture(60, 90, seed=11)])[0], conversation([picture(60, 90, seed=12)])[0]
    ids_a, ids_b = llm.apply_chat_template(a), llm.apply_chat_template(b)
    assert list(ids_a) == list(ids_b)  # the same placeholder ids ...
    greedy = dict(max_tokens=6, temperature=0, ignore_eos=True)
    first, second = llm.generate(ids_a, **greedy), llm.generate(ids_b, **greedy)
    assert second.token_ids == fresh.generate(fresh.apply_chat_template(b), **greedy).token_ids
    assert first.token_ids != second.token_ids  # ... and different pictures give different replies
    again = llm.generate(llm.apply_chat_template(a), **greedy)
    assert again.token_ids == first.token_ids and again.usage["prompt_tokens"] == len(ids_a)


def test_bad_images_are_one_clear_sentence(vlms, tmp_path):
    """Corrupt, non-image, too many, too large, remote without permission, missing file; a text-only model."""
    from glmkit.images import Limits

    llm = glmkit.load(vlms["glm4v"][0], dtype="float32")
    good = data_url(picture(40, 40))

    def ask(*urls):
        return llm.chat([{"role": "user", "content": [*({"type": "image_url", "image_url": {"url": u}} for u in urls),
                                                      {"type": "text", "text": "hi"}]}], max_tokens=2)

    (tmp_path / "notes.txt").write_text("not a picture")
    cases = {"data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==": "could not be read",
             "data:image/png;base64,@@@": "invalid base64",
             str(tmp_path / "notes.txt"): "could not be read",
             str(tmp_path / "missing.png"): "not a data: URL",
             "https://example.com/cat.png": "--allow-image-urls"}
    for url, says in cases.items():
        with pytest.raises(GlmkitError, match=says):
            ask(url)
    with pytest.raises(GlmkitError, match="at most 8 images"):
        ask(*[good] * 9)
    llm.image_limits = Limits(max_pixels=1000)
    with pytest.raises(GlmkitError, match="over the limit"):
        ask(data_url(picture(40, 40)))
    llm.image_limits = Limits()
    with pytest.raises(GlmkitError, match="images go in user messages"):
        llm.chat([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": good}}]},
                  {"role": "user", "content": "hi"}])
    assert ask(good)["content"] is not None  # and the model still answers


def test_a_text_only_model_refuses_images(tmp_path):
    from scripted import write_glm45_checkpoint

    llm = glmkit.load(write_glm45_checkpoint(tmp_path / "m"))
    with pytest.raises(GlmkitError, match="reads text only"):
        llm.chat(conversation([picture(40, 40)])[0], max_tokens=2)


def test_quantized_text_model_keeps_the_vision_tower_float(vlms):
    """int8 / int4 quantize the text model only; the image still steers the reply."""
    from glmkit.quant import Int4Linear, Int8Linear

    directory = vlms["glm4v_moe"][0]
    for bits in ("int8", "int4"):
        llm = glmkit.load(directory, quantize=bits)
        assert all(p.is_floating_point() for p in llm.model.visual.parameters())
        assert not any(isinstance(m, (Int4Linear, Int8Linear)) for m in llm.model.visual.modules())
        assert isinstance(llm.model.layers[0].attn.qkv, (Int4Linear, Int8Linear))
        greedy = dict(max_tokens=5, temperature=0, ignore_eos=True)
        replies = {tuple(llm.generate(llm.apply_chat_template(conversation([picture(60, 90, seed=s)])[0]),
                                      **greedy).token_ids) for s in (21, 22)}
        assert len(replies) == 2


def test_server_answers_an_image_conversation(vlms, tmp_path):
    """The official openai client, streaming and not: the same reply as llm.chat; a bad image, or a path naming a
    file on the server, is a 400 and the server keeps serving."""
    import openai
    from conftest import LiveServer

    llm = glmkit.load(vlms["glm4v"][0], dtype="float32")
    ours = conversation([picture(60, 90, seed=31)])[0]
    want = llm.chat(ours, max_tokens=8, temperature=0, ignore_eos=True)["content"]
    live = LiveServer(llm)
    try:
        client = live.client()
        got = client.chat.completions.create(model="tiny", messages=ours, max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
        assert got.choices[0].message.content == want
        assert got.usage.prompt_tokens == len(llm.apply_chat_template(ours))
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny", messages=ours, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True})
            if c.choices)
        assert streamed == want
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                            {"type": "text", "text": "hi"}]}]
        with pytest.raises(openai.BadRequestError, match="could not be read"):
            client.chat.completions.create(model="tiny", messages=bad, max_tokens=4)
        picture(40, 40).save(tmp_path / "server-side.png")  # a file on the server's disk is not the client's to name
        named = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / "server-side.png")}}]}]
        with pytest.raises(openai.BadRequestError, match="not as file paths"):
            client.chat.completions.create(model="tiny", messages=named, max_tokens=4)
        assert client.chat.completions.create(model="tiny", messages=ours, max_tokens=2).choices[0].message
    finally:
        live.close()


def test_web_page_uploads_an_image(vlms, tmp_path):
    """In headless chromium: an image attached through the file picker shows as a thumbnail in the user's
    message, travels as an image_url part and gets a streamed reply."""
    import shutil

    from conftest import LiveServer
    from playwright.sync_api import sync_playwright

    browser_path = shutil.which("chromium")
    assert browser_path, "Debian's chromium is needed for this test (scripts/setup --test installs it)"
    picture(60, 90, seed=41).save(tmp_path / "cat.png")
    live = LiveServer(glmkit.load(vlms["glm4v"][0], dtype="float32"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            bodies = []
            page.on("request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None)
            page.goto(live.url + "/")
            page.set_input_files("#file", str(tmp_path / "cat.png"))
            page.wait_for_selector("#pending img")
            page.fill("#input", "What is this?")
            page.press("#input", "Enter")
            page.wait_for_function("document.getElementById('send').hidden === false && "
                                   "document.querySelector('.msg.assistant .body').textContent.length > 0",
                                   timeout=30000)
            assert page.locator(".msg.user .images img").count() == 1
            assert page.locator("#pending img").count() == 0 and page.locator(".msg.error").count() == 0
            part = bodies[-1]["messages"][-1]["content"][0]
            assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/png;base64,")
            browser.close()
    finally:
        live.close()


@pytest.mark.slow
def test_compiled_decode_step_covers_mrope(vlms, tmp_path, monkeypatch):
    """The compiled one-token step of a vision model (its three position streams shifted by the image's offset):
    greedy tokens after an image prompt equal eager."""
    monkeypatch.setenv("GLMKIT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "home" / "inductor"))
    directory = vlms["glm4v"][0]
    messages = conversation([picture(60, 90, seed=5)])[0]
    eager = glmkit.load(directory, dtype="float32")
    expected = eager.generate(eager.apply_chat_template(messages), max_tokens=12, temperature=0, ignore_eos=True)
    llm = glmkit.load(directory, dtype="float32")
    decoder = llm.compile(batched=False)
    assert decoder.ready, decoder.error
    got = llm.generate(llm.apply_chat_template(messages), max_tokens=12, temperature=0, ignore_eos=True)
    assert got.token_ids == expected.token_ids


@pytest.mark.parametrize("kind", ["glm4v", "glm4v_moe"])
def test_released_config_spellings_read_the_same(vlms, tmp_path, kind):
    """Released config.json files spell things as transformers 4.x did (rope_scaling with mrope_section, a top-level
    partial_rotary_factor and rope_theta in text_config, the image token ids repeated there, dropout keys in
    vision_config): the same model as transformers 5's spelling."""
    import json
    import shutil

    directory = vlms[kind][0]
    shutil.copytree(directory, tmp_path / "m")
    raw = json.loads((directory / "config.json").read_text())
    text = raw["text_config"]
    rope = text.pop("rope_parameters")
    text.update(rope_scaling={"type": "default", "mrope_section": rope["mrope_section"]},
                partial_rotary_factor=rope["partial_rotary_factor"], rope_theta=rope["rope_theta"],
                image_token_id=raw["image_token_id"], image_start_token_id=raw["image_start_token_id"])
    raw["vision_config"]["hidden_dropout_prob"] = 0.0
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    assert glmkit.load(tmp_path / "m").config == glmkit.load(directory).config
    raw["vision_config"]["window_size"] = 112  # a key that would change the tower: refused by name
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(GlmkitError, match="window_size"):
        glmkit.load(tmp_path / "m")


def test_chat_command_attaches_images(vlms, tmp_path):
    """`glmkit chat MODEL --image FILE` asks about the image in the first message, `/image FILE` attaches one to
    the next; a missing file is refused and the chat goes on. The replies are llm.chat's greedy ones."""
    import subprocess
    import sys

    directory = vlms["glm4v"][0]
    picture(60, 90, seed=51).save(tmp_path / "a.png")
    picture(90, 60, seed=52).save(tmp_path / "b.png")
    llm = glmkit.load(directory)
    greedy = dict(max_tokens=4, temperature=0)
    first = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / "a.png")}},
                                          {"type": "text", "text": "What is it?"}]}]
    one = llm.chat(first, **greedy)
    second = first + [one.message, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(tmp_path / "b.png")}}, {"type": "text", "text": "And this?"}]}]
    two = llm.chat(second, **greedy)
    out = subprocess.run([sys.executable, "-m", "glmkit", "chat", str(directory), "--image", str(tmp_path / "a.png"),
                          "--temperature", "0", "--max-tokens", "4"],
                         input=f"What is it?\n/image {tmp_path / 'nope.png'}\n/image {tmp_path / 'b.png'}\nAnd this?\n",
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(no image file at" in out.stderr and "(b.png goes with your next message)" in out.stderr
    assert out.stdout.replace("\n>>> ", "") == one["content"] + two["content"]  # input() prompts aside
