"""The model's seams: float16 safety of the MLP (DESIGN principle 6), the embeddings input, per-layer indices."""

from __future__ import annotations

import torch

from glmkit.config import ModelConfig
from glmkit.model import Transformer

# GLM-4-0414-shaped (transformers' Glm4: sandwich norms, interleaved rotary on half of each head, qkv bias)
GLM4 = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, qkv_bias=True, extra_norms="sandwich", rope_layout="interleaved", rope_fraction=0.5,
                   max_seq_len=128)


def _glm4_with_large_activations() -> Transformer:
    """Random weights, except layer 0's MLP: gate and up both read one input feature scaled by 2000, so for
    tokens where that feature is positive silu(gate) * up reaches ~1e6 (float16 stops at 65504), and a small
    down-projection brings the output back to a few hundred."""
    torch.manual_seed(0)
    model = Transformer(GLM4).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    for layer in model.layers:
        for norm in (layer.attn_norm, layer.mlp_norm, layer.attn_post_norm, layer.mlp_post_norm):
            norm.weight.data.fill_(1.0)
    model.norm.weight.data.fill_(1.0)
    mlp = model.layers[0].mlp
    mlp.in_proj.weight.data.zero_()
    mlp.in_proj.weight.data[:, 0] = 2000.0  # (2F, C): every gate and up row reads feature 0
    mlp.out_proj.weight.data.normal_(0, 2e-6)
    return model


def test_float16_glm4_mlp_runs_the_down_projection_in_float32():
    model = _glm4_with_large_activations()
    ids = torch.randint(0, GLM4.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(24).expand(2, 24)
    seen = []
    hook = model.layers[0].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0][..., 0] * 2000.0))
    with torch.inference_mode():
        reference = model(ids, positions).float()  # float32
        hook.remove()
        gate = seen[0]  # (2, 24): each token's gate (= up) in layer 0
        assert float((torch.nn.functional.silu(gate) * gate).max()) > 4 * 65504  # the product overflows float16
        half = model.half()(ids, positions).float()
    assert torch.isfinite(half).all()
    err = float((half - reference).norm() / reference.norm())
    assert err < 2e-2, err


def test_embeddings_input_equals_token_input():
    """The embeddings input (what image features enter through) computes what the token path computes."""
    torch.manual_seed(0)
    model = Transformer(GLM4).eval()
    ids = torch.randint(0, GLM4.vocab_size, (1, 10))
    positions = torch.arange(10)[None]
    with torch.inference_mode():
        torch.testing.assert_close(model(None, positions, embeds=model.embed(ids)), model(ids, positions))
    assert [layer.index for layer in model.layers] == [0, 1]
    assert [layer.attn.index for layer in model.layers] == [0, 1]
