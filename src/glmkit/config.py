"""ModelConfig: the one typed description of every architecture glmkit runs.

The GLM generations (and Llama) differ by a handful of switches; each is a field here whose
variants are a closed set of strings. `from_hf_dict` reads a checkpoint's config.json in the THUDM
remote-code spelling or the transformers-native one (4.x and 5.x); `hf_spelling` is the one rule that
tells them apart. Any key that could change the maths and is not understood is an error; keys of
architecture features glmkit does not run yet (experts, latent attention, vision towers, sliding
windows) are an "unsupported architecture feature" error naming the key. The coming features get
nested optional sub-configs (MoEConfig, MLAConfig, VisionConfig). No torch here.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

from glmkit.errors import ConfigError, UnsupportedArchitectureError

NormKind = Literal["rmsnorm", "layernorm"]  # layernorm carries a bias (ChatGLM-6B)
MlpKind = Literal["swiglu", "gelu_tanh"]  # swiglu: in_proj holds [gate; up]; gelu_tanh: not gated
ResidualKind = Literal["pre_norm", "deepnorm"]  # deepnorm: x = alpha * LN(x) + f(LN(x)) (ChatGLM-6B)
ExtraNorms = Literal["none", "sandwich"]  # sandwich: a norm after attention and after MLP (GLM-4-0414)
RopeLayout = Literal["interleaved", "half_split"]  # pairs (2i, 2i+1) (GLM) or (i, i + d/2) (Llama)
PositionKind = Literal["1d", "2d", "mrope"]  # 2d: position + block position on the two halves of a head;
# mrope: (t, h, w) positions, each rotary frequency slot reading one of them (GLM-4.1V / 4.5V)
MaskKind = Literal["causal", "prefix"]  # prefix: tokens before <sop> see each other (ChatGLM-6B)
FreqDtype = Literal["float32", "float16"]  # ChatGLM-6B rounds its rotary frequencies to float16


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-Experts MLP (GLM-4.5 family): routed experts plus shared ones, the first layers dense."""
    num_experts: int
    experts_per_token: int
    expert_size: int  # each expert's intermediate size
    shared_experts: int = 0
    first_dense_layers: int = 0
    groups: int = 1  # group-limited routing: experts in `groups` groups, the best `topk_groups` kept
    topk_groups: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    sparse_layers: tuple[int, ...] | None = None  # the MoE layers, when not all after first_dense_layers
    scoring: Literal["sigmoid", "softmax"] = "sigmoid"  # GLM's routers: sigmoid (a GGUF may say otherwise)

    def __post_init__(self) -> None:
        if self.sparse_layers is not None:
            object.__setattr__(self, "sparse_layers", tuple(self.sparse_layers))

    def is_sparse(self, index: int, num_layers: int) -> bool:
        """Whether layer `index` (MTP layers past num_layers included) has a MoE MLP."""
        if self.sparse_layers is None or index >= num_layers:
            return index >= self.first_dense_layers
        return index in self.sparse_layers


@dataclass(frozen=True)
class MLAConfig:
    """Multi-head latent attention (GLM-4.7-Flash, GLM-5): a compressed latent per token in the cache; with
    index_topk, GLM-5's sparse-attention indexer (DSA) picks the keys each query may attend."""
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_interleave: bool = True  # rotary pairs (2i, 2i+1) of the rope part, else half against half
    index_topk: int = 0  # 0: no indexer
    index_heads: int = 0
    index_head_dim: int = 0
    indexer_types: tuple[str, ...] = ()  # per layer: "full" runs the indexer, "shared" reuses the last full one's

    def __post_init__(self) -> None:
        object.__setattr__(self, "indexer_types", tuple(self.indexer_types))

    def has_indexer(self, index: int) -> bool:
        return self.index_topk > 0 and (index >= len(self.indexer_types) or self.indexer_types[index] == "full")


@dataclass(frozen=True)
class VisionConfig:
    """A vision tower whose features enter the text model through its embeddings input (GLM-4.1V, 4.5V): patches
    of `patch_size` pixels over `temporal_patch_size` frames, `depth` blocks of `hidden_size`, merged
    `spatial_merge_size` x `spatial_merge_size` into tokens of `out_hidden_size` (the text model's width)."""
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    out_hidden_size: int
    intermediate_size: int  # the merger's SwiGLU width
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    image_size: int = 336  # the learned position table covers (image_size / patch_size)^2 patches
    in_channels: int = 3
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    attention_bias: bool = False
    image_token_id: int = 151343  # <|image|>: one per output token of an image in the prompt
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None


SUB_CONFIGS = {"moe": MoEConfig, "mla": MLAConfig, "vision": VisionConfig}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    mlp: MlpKind = "swiglu"
    qkv_bias: bool = False
    out_bias: bool = False  # attention output projection
    mlp_bias: bool = False
    residual: ResidualKind = "pre_norm"
    residual_alpha: float = 1.0  # only for residual="deepnorm"
    extra_norms: ExtraNorms = "none"
    rope_layout: RopeLayout = "half_split"
    rope_fraction: float = 1.0  # share of each head (or, for 2d, of each half) that rotates
    rope_theta: float = 10000.0
    rope_linear_factor: float = 1.0  # positions are divided by this (linear interpolation)
    rope_freq_dtype: FreqDtype = "float32"
    positions: PositionKind = "1d"
    attention_mask: MaskKind = "causal"
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    mask_token_id: int | None = None  # [MASK]
    gmask_token_id: int | None = None  # [gMASK]
    sop_token_id: int | None = None  # <sop>: starts the generated (causal) part in prefix mode
    eop_token_id: int | None = None
    qk_norm: bool = False  # an RMSNorm over each head's q and k before rotary (GLM-4.5 355B)
    mtp_layers: int = 0  # next-token-prediction layers stored after the last layer (GLM-4.5's MTP), kept aside
    moe: MoEConfig | None = None  # Mixture-of-Experts MLPs after the first dense layers (GLM-4.5 family)
    mla: MLAConfig | None = None
    vision: VisionConfig | None = None
    mrope_section: tuple[int, ...] = ()  # positions "mrope": rotary frequency slots read from t, h, w in turn

    def __post_init__(self) -> None:
        for name, kind in SUB_CONFIGS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, kind(**value))
            elif value is not None and not isinstance(value, kind):
                raise ConfigError(f"ModelConfig.{name} must be a {kind.__name__} or None, got {type(value).__name__}.")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            allowed = _literal_values(f.type)
            if allowed and value not in allowed:
                raise ConfigError(f"ModelConfig.{f.name} is {value!r}; it must be one of {', '.join(map(repr, allowed))}.")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"ModelConfig.{name} must be a positive integer, got {value!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                              f"num_kv_heads ({self.num_kv_heads}).")
        if not 0.0 < self.rope_fraction <= 1.0:
            raise ConfigError(f"ModelConfig.rope_fraction must lie in (0, 1], got {self.rope_fraction}.")
        if self.rotary_dim % 2:
            raise ConfigError(f"ModelConfig.rope_fraction {self.rope_fraction} gives an odd rotary size "
                              f"{self.rotary_dim}; it must be even.")
        if self.positions == "2d" and self.head_dim % 2:
            raise ConfigError(f"ModelConfig.head_dim must be even for 2d positions, got {self.head_dim}.")
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.rope_linear_factor <= 0:
            raise ConfigError("ModelConfig.norm_eps, rope_theta and rope_linear_factor must be positive.")
        if self.attention_mask == "prefix" and self.sop_token_id is None:
            raise ConfigError("ModelConfig.attention_mask 'prefix' needs sop_token_id (the token that starts "
                              "the causal part).")
        if self.positions == "2d" and self.mask_token_id is None and self.gmask_token_id is None:
            raise ConfigError("ModelConfig.positions '2d' needs mask_token_id or gmask_token_id.")
        if self.positions == "mrope" and (len(self.mrope_section) != 3 or sum(self.mrope_section) != self.rotary_dim // 2):
            raise ConfigError(f"ModelConfig.mrope_section {self.mrope_section} must give 3 sizes summing to the "
                              f"{self.rotary_dim // 2} rotary frequencies.")
        if self.vision is not None and self.vision.out_hidden_size != self.hidden_size:
            raise ConfigError(f"the vision tower's out_hidden_size ({self.vision.out_hidden_size}) must equal the text "
                              f"model's hidden_size ({self.hidden_size}).")
        if self.moe is not None:
            _check_moe(self.moe, self.num_layers)
        if self.mla is not None:
            _check_mla(self.mla, self.num_layers)
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per rotary block: the whole head (1d) or each half of it (2d)."""
        block = self.head_dim // 2 if self.positions == "2d" else self.head_dim
        return int(round(block * self.rope_fraction))

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["mrope_section"] = list(self.mrope_section)
        return {k: v for k, v in d.items() if k not in SUB_CONFIGS or v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_dict (glmkit's own spelling); unknown fields are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; known fields are {sorted(names)}.")
        return cls(**{**d, "eos_token_ids": tuple(d.get("eos_token_ids", ()))})

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a checkpoint's config.json: THUDM remote-code or transformers-native spelling."""
        _refuse_unsupported_features(d)
        if d.get("quantization_bit") not in (None, 0, 4, 8):
            raise ConfigError(f"config.json quantization_bit={d['quantization_bit']!r}: official ChatGLM checkpoints "
                              "come as int4 or int8 only.")
        spelling = hf_spelling(d)
        if spelling in ("thudm_v1", "thudm_v2"):
            return _from_thudm(_Keys(d))
        model_type = d.get("model_type")
        if model_type in _VISION_TEXT:
            return _from_vision_language(d, model_type)
        if spelling == "transformers":
            return _from_transformers(_Keys(d), model_type)
        archs = d.get("architectures") or []
        raise UnsupportedArchitectureError(
            f"unknown architecture (model_type={model_type!r}, architectures={archs}); glmkit runs ChatGLM-6B/2/3, "
            f"GLM-4 (THUDM layout), and transformers' {', '.join(sorted(_HF_FAMILIES))} models.")


def _check_moe(m: MoEConfig, num_layers: int) -> None:
    rules = [(m.num_experts > 0 and m.expert_size > 0, "num_experts and expert_size must be positive"),
             (0 < m.experts_per_token <= m.num_experts, "experts_per_token must lie in 1..num_experts"),
             (m.groups > 0 and m.num_experts % m.groups == 0, "num_experts must be a multiple of groups"),
             (0 < m.topk_groups <= m.groups, "topk_groups must lie in 1..groups"),
             (m.groups == 1 or m.num_experts // m.groups >= 2, "group routing needs at least 2 experts a group"),
             (m.experts_per_token <= m.num_experts // m.groups * m.topk_groups,
              "experts_per_token exceeds the experts of the kept groups"),
             (0 <= m.first_dense_layers <= num_layers, "first_dense_layers must lie in 0..num_layers"),
             (m.shared_experts >= 0, "shared_experts must be 0 or more"),
             (m.scoring in ("sigmoid", "softmax"), "scoring must be 'sigmoid' or 'softmax'")]
    for ok, rule in rules:
        if not ok:
            raise ConfigError(f"MoEConfig: {rule} (got {m}).")


def _check_mla(m: MLAConfig, num_layers: int) -> None:
    rules = [(min(m.kv_lora_rank, m.qk_nope_head_dim, m.v_head_dim) > 0, "the latent and head sizes must be positive"),
             (m.qk_rope_head_dim > 0 and m.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be positive and even"),
             (m.q_lora_rank is None or m.q_lora_rank > 0, "q_lora_rank must be positive or null"),
             (m.index_topk == 0 or (m.index_heads > 0 and m.index_head_dim >= m.qk_rope_head_dim),
              "an indexer needs index_heads and an index_head_dim of at least qk_rope_head_dim"),
             (m.index_topk == 0 or m.q_lora_rank is not None, "an indexer reads the q_lora_rank latent"),
             (set(m.indexer_types) <= {"full", "shared"}, "indexer_types are 'full' or 'shared'"),
             (not m.indexer_types or (len(m.indexer_types) == num_layers and m.indexer_types[0] == "full"),
              "indexer_types needs one entry per layer, the first 'full'")]
    for ok, rule in rules:
        if not ok:
            raise ConfigError(f"MLAConfig: {rule} (got {m}).")


def hf_spelling(d: dict[str, Any]) -> str | None:
    """Which spelling a config.json uses: 'thudm_v1' (ChatGLM-6B remote code), 'thudm_v2' (ChatGLM2/3,
    GLM-4-9B remote code), 'transformers' (a model_type glmkit reads), or None. The one place that decides
    whether a checkpoint is THUDM's: layouts, tokenizers, adapters and export all ask this."""
    if "num_layers" in d and ("padded_vocab_size" in d or "inner_hidden_size" in d or "kv_channels" in d):
        return "thudm_v1" if d.get("position_encoding_2d") is not None or "inner_hidden_size" in d else "thudm_v2"
    return "transformers" if d.get("model_type") in (*_HF_FAMILIES, *_VISION_TEXT) else None


# config.json keys of architecture features glmkit does not run yet: a model carrying them would be read as
# something else, so they are refused by name (a falsy value, as many configs write it, is no feature)
UNSUPPORTED_FEATURES = {
    "vision_config": "a vision tower (image input)", "n_routed_experts": "Mixture-of-Experts layers",
    "num_experts": "Mixture-of-Experts layers", "num_local_experts": "Mixture-of-Experts layers",
    "experts_per_token": "Mixture-of-Experts layers", "num_experts_per_tok": "Mixture-of-Experts layers",
    "moe_intermediate_size": "Mixture-of-Experts layers", "kv_lora_rank": "latent attention (MLA)",
    "q_lora_rank": "latent attention (MLA)", "index_topk": "a sparse-attention indexer (DSA)",
    "sliding_window": "sliding-window attention", "interleaved_qkv": "per-head interleaved q/k/v rows",
    "use_qk_norm": "per-head q/k norms", "num_nextn_predict_layers": "next-token-prediction (MTP) layers",
}


_MOE_KEYS = {"n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "num_nextn_predict_layers"}
SUPPORTED_BY = {"glm4_moe": _MOE_KEYS | {"use_qk_norm"}, "glm4_moe_lite": _MOE_KEYS | {"kv_lora_rank", "q_lora_rank"},
                "glm_moe_dsa": _MOE_KEYS | {"kv_lora_rank", "q_lora_rank", "index_topk"},
                "glm4v": {"vision_config"}, "glm4v_moe": {"vision_config"}}  # model types that run some


NOT_YET = {  # model types glmkit knows of but does not run yet, with what they add
    "glm5_next": "GLM-5.3-Flash: linear-attention (Kimi Delta Attention) layers, latent attention without a rope "
                 "part and mHC residual streams",
}


def _refuse_unsupported_features(d: dict[str, Any]) -> None:
    if d.get("model_type") in NOT_YET:
        raise UnsupportedArchitectureError(f"model_type {d['model_type']!r} is not supported yet ({NOT_YET[d['model_type']]}); "
                                           "glmkit cannot run this model.")
    kinds = d.get("layer_types") or (d.get("text_config") or {}).get("layer_types") or []
    if isinstance(kinds, list) and "linear_attention" in kinds:
        raise UnsupportedArchitectureError("unsupported architecture feature 'layer_types' (linear-attention layers) "
                                           "in config.json: glmkit cannot run this model yet.")
    runs = SUPPORTED_BY.get(d.get("model_type"), set())
    for key, what in UNSUPPORTED_FEATURES.items():
        value = d.get(key)
        if key in runs:
            continue
        if key == "sliding_window" and d.get("use_sliding_window") is False:
            continue  # configured but switched off
        if value:
            raise UnsupportedArchitectureError(
                f"unsupported architecture feature {key!r} ({what}) in config.json: glmkit cannot run this model "
                "yet, and loading it without that feature would give wrong outputs.")


def _literal_values(tp: Any) -> tuple[Any, ...]:
    tp = _HINTS.get(tp, tp) if isinstance(tp, str) else tp
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


_HINTS = {name: obj for name, obj in list(globals().items()) if typing.get_origin(obj) is Literal}

# Keys that never change a model's maths (bookkeeping, training-only, generation defaults).
_IGNORED = {
    "_name_or_path", "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "initializer_range", "attention_dropout", "hidden_dropout", "classifier_dropout",
    "output_attentions", "output_hidden_states", "return_dict", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "pretraining_tp", "tokenizer_class", "use_return_dict",
    "bias_dropout_fusion", "fp32_residual_connection", "apply_query_key_layer_scaling",
    "attention_softmax_in_fp32", "gradient_checkpointing", "max_length", "do_sample", "temperature", "top_p",
    "top_k", "repetition_penalty", "num_beams", "prefix_projection", "resid_pdrop", "embd_pdrop", "attn_pdrop",
    "tie_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "decoder_start_token_id", "sep_token_id", "unk_token_id", "task_specific_params", "finetuning_task",
    "_attn_implementation_autoset", "quantization_bit", "num_image_tokens", "image_size",
    "layer_types", "use_sliding_window", "max_window_layers", *UNSUPPORTED_FEATURES, "torchscript",
    "pruned_heads", "tf_legacy_loss", "use_bfloat16", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "bad_words_ids",
    "diversity_penalty", "early_stopping", "length_penalty", "min_length", "no_repeat_ngram_size",
    "num_beam_groups", "num_return_sequences", "encoder_no_repeat_ngram_size", "typical_p", "prefix",
}


class _Keys:
    """A config dict that records which keys were read, so leftovers can be reported."""

    def __init__(self, d: dict[str, Any]):
        self.d, self.used = d, set()

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.d.get(key, default)

    def need(self, key: str) -> Any:
        self.used.add(key)
        if self.d.get(key) is None:
            raise ConfigError(f"config.json has no {key!r}, which this architecture needs.")
        return self.d[key]

    def expect(self, key: str, allowed: tuple[Any, ...], default: Any) -> Any:
        value = self.get(key, default)
        if value not in allowed:
            raise ConfigError(f"config.json {key}={value!r} is not supported by glmkit "
                              f"(supported: {', '.join(map(repr, allowed))}).")
        return value

    def check_leftovers(self) -> None:
        left = sorted(k for k in self.d if k not in self.used and k not in _IGNORED)
        if left:
            raise ConfigError(
                f"config.json key(s) {left} are not understood by glmkit and may change the model's maths; "
                "remove them if they do not, or open an issue to have them supported.")


def _eos_list(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _from_thudm(k: _Keys) -> ModelConfig:
    """THUDM remote-code configs: ChatGLM-6B (v1) and ChatGLM2/3, GLM-4-9B (v2+)."""
    k.expect("pre_seq_len", (None,), None)  # p-tuning v2 prefixes arrive with the engine issue
    hidden = int(k.need("hidden_size"))
    heads = int(k.need("num_attention_heads"))
    common = dict(hidden_size=hidden, num_layers=int(k.need("num_layers")), num_heads=heads,
                  norm_eps=float(k.get("layernorm_epsilon", 1e-5)), pad_token_id=k.get("pad_token_id"),
                  eos_token_ids=_eos_list(k.get("eos_token_id")))
    if k.get("position_encoding_2d") is not None or "inner_hidden_size" in k.d:  # ChatGLM-6B v1
        k.expect("position_encoding_2d", (True,), True)
        cfg = ModelConfig(
            **common, vocab_size=int(k.need("vocab_size")), intermediate_size=int(k.get("inner_hidden_size", 4 * hidden)),
            num_kv_heads=heads, head_dim=hidden // heads, norm="layernorm", mlp="gelu_tanh", qkv_bias=True,
            out_bias=True, mlp_bias=True, residual="deepnorm",
            residual_alpha=math.sqrt(2 * 28),  # the official code never passes num_layers: alpha is sqrt(56)
            rope_layout="half_split", rope_freq_dtype="float16", positions="2d", attention_mask="prefix",
            tie_embeddings=bool(k.get("tie_word_embeddings", True)),
            max_seq_len=int(k.get("max_sequence_length", 2048)), bos_token_id=k.get("bos_token_id"),
            mask_token_id=k.get("mask_token_id"), gmask_token_id=k.get("gmask_token_id"),
            sop_token_id=k.get("bos_token_id"), eop_token_id=k.get("eos_token_id"))
    else:  # ChatGLM2/3, GLM-4-9B
        k.expect("apply_residual_connection_post_layernorm", (False,), False)
        k.expect("post_layer_norm", (True,), True)
        k.expect("original_rope", (True,), True)
        mqa = bool(k.get("multi_query_attention", False))
        k.get("multi_query_group_num")  # read by the official code only when multi_query_attention is true
        bias = bool(k.get("add_bias_linear", False))
        cfg = ModelConfig(
            **common, vocab_size=int(k.need("padded_vocab_size")), intermediate_size=int(k.need("ffn_hidden_size")),
            num_kv_heads=int(k.need("multi_query_group_num")) if mqa else heads,
            head_dim=int(k.get("kv_channels") or hidden // heads),
            norm="rmsnorm" if k.get("rmsnorm", True) else "layernorm", mlp="swiglu",
            qkv_bias=bool(k.get("add_qkv_bias", False)) or bias, out_bias=bias, mlp_bias=bias,
            rope_layout="interleaved", rope_fraction=0.5,
            # GLM-4 and ChatGLM3-32k/128k scale the base; (chatglm2-6b-32k interpolated positions instead)
            rope_theta=10000.0 * float(k.get("rope_ratio", 1.0)),
            tie_embeddings=bool(k.get("tie_word_embeddings", False)),
            max_seq_len=int(k.get("seq_length", 2048)))
    for key in ("bos_token_id", "mask_token_id", "gmask_token_id", "max_sequence_length", "seq_length"):
        k.get(key)
    k.check_leftovers()
    return cfg


_HF_FAMILIES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM", "glm4_moe": "Glm4MoeForCausalLM",
                "glm4_moe_lite": "Glm4MoeLiteForCausalLM", "glm_moe_dsa": "GlmMoeDsaForCausalLM",
                "llama": "LlamaForCausalLM"}
_MLA_TYPES = ("glm4_moe_lite", "glm_moe_dsa")


def _rope_parameters(k: _Keys) -> dict[str, Any]:
    """Merge transformers 5.x `rope_parameters` with 4.x top-level `rope_theta` / `rope_scaling`."""
    params = dict(k.get("rope_parameters") or {})
    scaling = k.get("rope_scaling") or {}
    params.update({key: v for key, v in scaling.items() if key not in params})
    for key in ("rope_theta", "partial_rotary_factor"):
        if k.d.get(key) is not None:
            params.setdefault(key, k.get(key))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in ("default", "linear"):
        raise ConfigError(f"config.json asks for rope_type {rope_type!r}, which glmkit does not support yet "
                          "(supported: 'default', 'linear').")
    factor = float(params.pop("factor", 1.0)) if rope_type == "linear" else 1.0
    out = {"rope_theta": float(params.pop("rope_theta", 10000.0)), "rope_linear_factor": factor}
    if "partial_rotary_factor" in params:
        out["rope_fraction"] = float(params.pop("partial_rotary_factor"))
    params.pop("original_max_position_embeddings", None)
    if params:
        raise ConfigError(f"config.json rope settings {sorted(params)} are not understood by glmkit.")
    return out


def _moe(k: _Keys) -> dict[str, Any]:
    """GLM-4.5's Mixture-of-Experts keys (Glm4MoeConfig) -> moe / qk_norm / mtp_layers fields."""
    k.expect("topk_method", (None, "noaux_tc"), None)
    k.expect("scoring_func", (None, "sigmoid"), None)
    k.get("output_router_logits")  # training only
    k.get("router_aux_loss_coef")
    kinds = k.get("mlp_layer_types")  # GLM-4.7-Flash / GLM-5: "dense" or "sparse" per layer
    if kinds is not None and (not isinstance(kinds, list) or set(kinds) - {"dense", "sparse"}):
        raise ConfigError(f"config.json mlp_layer_types must list 'dense' or 'sparse' per layer, got {kinds!r}.")
    sparse = None if kinds is None else tuple(i for i, kind in enumerate(kinds) if kind == "sparse")
    moe = MoEConfig(num_experts=int(k.need("n_routed_experts")), experts_per_token=int(k.need("num_experts_per_tok")),
                    expert_size=int(k.need("moe_intermediate_size")), shared_experts=int(k.get("n_shared_experts", 1)),
                    first_dense_layers=int(k.get("first_k_dense_replace", 1)), groups=int(k.get("n_group", 1)),
                    topk_groups=int(k.get("topk_group", 1)), norm_topk_prob=bool(k.get("norm_topk_prob", True)),
                    routed_scaling_factor=float(k.get("routed_scaling_factor", 1.0)), sparse_layers=sparse)
    return {"moe": moe, "qk_norm": bool(k.get("use_qk_norm", False)),
            "mtp_layers": int(k.get("num_nextn_predict_layers") or 0)}


def _mla(k: _Keys, model_type: str, num_layers: int) -> dict[str, Any]:
    """Latent attention (Glm4MoeLiteConfig) and GLM-5's indexer (GlmMoeDsaConfig) -> mla and the fields it sets:
    head_dim is the rope part (what the rotary tables cover), all of it rotating."""
    rope = int(k.need("qk_rope_head_dim"))
    if rope <= 0:
        raise UnsupportedArchitectureError("unsupported architecture feature 'qk_rope_head_dim' = 0 (latent attention "
                                           "without a rope part) in config.json: glmkit cannot run this model yet.")
    dsa = model_type == "glm_moe_dsa"
    for key in ("qk_head_dim", "head_dim", "num_key_value_heads"):  # derived values transformers writes too
        k.get(key)
    types = k.get("indexer_types")
    pattern = k.get("index_topk_pattern")  # released configs give the schedule; transformers derives the list
    freq, offset = max(int(k.get("index_topk_freq", 1)), 1), int(k.get("index_skip_topk_offset", 2))
    if dsa and types is None:
        types = ([{"F": "full", "S": "shared"}.get(c, c) for c in pattern] if pattern is not None else
                 ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(num_layers)])
    q_lora = k.get("q_lora_rank")
    mla = MLAConfig(kv_lora_rank=int(k.need("kv_lora_rank")), qk_nope_head_dim=int(k.need("qk_nope_head_dim")),
                    qk_rope_head_dim=rope, v_head_dim=int(k.need("v_head_dim")),
                    q_lora_rank=None if q_lora is None else int(q_lora),
                    rope_interleave=True if dsa else bool(k.get("rope_interleave", True)),
                    index_topk=int(k.need("index_topk")) if dsa else 0,
                    index_heads=int(k.need("index_n_heads")) if dsa else 0,
                    index_head_dim=int(k.need("index_head_dim")) if dsa else 0,
                    indexer_types=tuple(types or ()))
    return {"mla": mla, "head_dim": rope, "rope_fraction": 1.0,
            "rope_layout": "interleaved" if mla.rope_interleave else "half_split"}


_VISION_TEXT = {"glm4v": "glm4", "glm4v_moe": "glm4_moe"}  # vision-language model type -> its text model's family


def _from_vision_language(d: dict[str, Any], model_type: str) -> ModelConfig:
    """Glm4vConfig / Glm4vMoeConfig: text_config read as its family (GLM-4-0414 or GLM-4.5) with M-RoPE positions
    (half-split rotation for glm4v_moe, pairs for glm4v, whose rotary covers the whole head unless a
    partial_rotary_factor says otherwise), and vision_config as the tower."""
    k = _Keys(d)
    text, vision = k.get("text_config"), k.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ConfigError(f"config.json of a {model_type} model needs text_config and vision_config objects.")
    for key in ("video_token_id", "video_start_token_id", "video_end_token_id"):  # video input is not read yet
        k.get(key)
    family = _VISION_TEXT[model_type]
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    section = rope.pop("mrope_section", [8, 12, 12])
    if text.get("partial_rotary_factor") is None:  # transformers' default differs between the two text models
        rope.setdefault("partial_rotary_factor", 1.0 if family == "glm4" else 0.5)
    copies = ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
              "video_start_token_id", "video_end_token_id", "hidden_dropout_prob")  # released text configs repeat them
    text = {**{key: v for key, v in text.items() if key not in copies}, "model_type": family, "rope_parameters": rope,
            "rope_scaling": None, "tie_word_embeddings": k.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
            "eos_token_id": text.get("eos_token_id", d.get("eos_token_id"))}
    k.get("eos_token_id")
    cfg = _from_transformers(_Keys(text), family)
    cfg = dataclasses.replace(cfg, positions="mrope", mrope_section=tuple(section), vision=_vision(_Keys(vision), k))
    k.check_leftovers()
    return cfg


def _vision(v: _Keys, top: _Keys) -> VisionConfig:
    v.expect("hidden_act", ("silu",), "silu")
    rope = dict(v.get("rope_parameters") or {"rope_type": "axial"})
    if rope.pop("rope_type", "axial") != "axial":
        raise ConfigError("config.json vision_config rope_type must be 'axial' (2-D rotary over patch rows and columns).")
    theta = float(rope.pop("rope_theta", 10000.0))
    if rope:
        raise ConfigError(f"config.json vision_config rope settings {sorted(rope)} are not understood by glmkit.")
    single = {key: v.get(key) for key in ("patch_size", "temporal_patch_size", "image_size")}
    bad = [key for key, value in single.items() if value is not None and not isinstance(value, int)]
    if bad:
        raise ConfigError(f"config.json vision_config {bad[0]} must be one integer, got {single[bad[0]]!r}.")
    out = VisionConfig(
        depth=int(v.need("depth")), hidden_size=int(v.need("hidden_size")), num_heads=int(v.need("num_heads")),
        patch_size=int(single["patch_size"] or 14), out_hidden_size=int(v.need("out_hidden_size")),
        intermediate_size=int(v.need("intermediate_size")), spatial_merge_size=int(v.get("spatial_merge_size", 2)),
        temporal_patch_size=int(single["temporal_patch_size"] or 2), image_size=int(single["image_size"] or 336),
        in_channels=int(v.get("in_channels", 3)), norm_eps=float(v.get("rms_norm_eps", 1e-5)), rope_theta=theta,
        attention_bias=bool(v.get("attention_bias", False)),
        image_token_id=int(top.need("image_token_id")), image_start_token_id=top.get("image_start_token_id"),
        image_end_token_id=top.get("image_end_token_id"))
    for key in ("attention_dropout", "hidden_dropout_prob", "initializer_range", "model_type", "_name_or_path",
                "architectures", "dtype"):
        v.get(key)
    v.check_leftovers()
    return out


def _from_transformers(k: _Keys, model_type: str) -> ModelConfig:
    """transformers-native GlmConfig, Glm4Config and LlamaConfig (4.x and 5.x spellings)."""
    k.expect("hidden_act", ("silu",), "silu")
    hidden = int(k.need("hidden_size"))
    heads = int(k.need("num_attention_heads"))
    attention_bias = bool(k.get("attention_bias", model_type not in ("llama", "glm4_moe", *_MLA_TYPES)))
    rope = _rope_parameters(k)
    glm = model_type in ("glm", "glm4")
    moe = _moe(k) if model_type in ("glm4_moe", *_MLA_TYPES) else {}
    layers = int(k.need("num_hidden_layers"))
    mla = _mla(k, model_type, layers) if model_type in _MLA_TYPES else {}
    head_dim = mla.pop("head_dim", None) or int(k.get("head_dim") or hidden // heads)
    cfg = ModelConfig(
        vocab_size=int(k.need("vocab_size")), hidden_size=hidden, intermediate_size=int(k.need("intermediate_size")),
        num_layers=layers, num_heads=heads,
        num_kv_heads=heads if mla else int(k.get("num_key_value_heads") or heads), head_dim=head_dim,
        norm_eps=float(k.get("rms_norm_eps", 1e-6)), qkv_bias=attention_bias,
        out_bias=attention_bias and model_type == "llama", mlp_bias=bool(k.get("mlp_bias", False)),
        extra_norms="sandwich" if model_type == "glm4" else "none",
        # glm4_moe rotates NeoX-style, half against half; latent attention as its config says (_mla)
        **{"rope_layout": "interleaved" if glm else "half_split", "rope_fraction": 0.5 if glm or moe else 1.0,
           **rope, **mla}, **moe,
        tie_embeddings=bool(k.get("tie_word_embeddings", False)),
        max_seq_len=int(k.get("max_position_embeddings", 2048)), bos_token_id=k.get("bos_token_id"),
        eos_token_ids=_eos_list(k.get("eos_token_id")), pad_token_id=k.get("pad_token_id"))
    k.check_leftovers()
    return cfg


__all__ = ["ModelConfig"]
