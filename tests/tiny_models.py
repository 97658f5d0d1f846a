"""Small random Hugging Face decoder checkpoints, one per supported family.

``tiny_config(family)`` / ``tiny_model(family, seed)`` / ``save_tiny(family, directory)`` build
fp32 models with hidden 64, 4 query / 2 kv heads (GQA), head_dim 16, intermediate 128 and
3 (LLaMA, Qwen) or 4 (Gemma 3) layers, with randomised weights (non-trivial norm scales,
non-zero biases) so that every rule of the explainer is exercised:

* ``llama``:  llama3 rope scaling, untied lm_head.
* ``qwen2``:  biases on q/k/v, rope θ 1e6.
* ``qwen3``:  per-head q/k RMSNorm, explicit head_dim, tied embeddings.
* ``gemma3``: Gemma RMSNorm (1 + w), sandwich norms, GELU-tanh, embeddings scaled by √hidden,
  ``query_pre_attn_scalar`` 24 ≠ head_dim, layers sliding / sliding / full / sliding with
  ``sliding_window`` 8, local rope θ 1e4 and global θ 1e6 with linear scaling (factor 2), tied
  embeddings, no softcapping.

The configs are written with transformers 5.x (``rope_parameters``). ``save_tiny`` also writes
the transformers 4.x spellings (``rope_theta``, ``rope_scaling``, Gemma 3's
``rope_local_base_freq``) into config.json, so the same checkpoint means the same model in the
main environment (transformers 5) and in LXT's (transformers 4.57).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
# issue 23's families (mixture-of-experts, partial rotary, LongRoPE, YaRN): the tests that run
# every mode on every family name them where they run, to keep CI short
NEW_FAMILIES = ("qwen3_moe", "mixtral", "phi3", "phi3_longrope", "qwen3_yarn")

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "phi3_longrope": "Phi3ForCausalLM",
    "qwen3_yarn": "Qwen3ForCausalLM",
}

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    attention_dropout=0.0,
    dtype="float32",
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

# the word-level tokenizer that ``save_tiny`` writes when no tokenizer is given
SPECIAL_TOKENS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}


def _family_settings(family: str) -> tuple[type, dict]:
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig, dict(
            num_hidden_layers=3,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        )
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        # 4 experts, top-2 renormalised; layer 1 keeps a dense MLP (``mlp_only_layers``)
        return Qwen3MoeConfig, dict(
            num_hidden_layers=3, rms_norm_eps=1e-6, tie_word_embeddings=False,
            attention_bias=False, use_sliding_window=False, num_experts=4,
            num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[1],
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    if family == "mixtral":
        from transformers import MixtralConfig

        # 4 experts, top-2 (Mixtral always renormalises over the chosen experts)
        return MixtralConfig, dict(
            num_hidden_layers=3, rms_norm_eps=1e-5, tie_word_embeddings=False,
            num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
            router_jitter_noise=0.0,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    if family in ("phi3", "phi3_longrope"):
        from transformers import Phi3Config

        # partial rotary: 12 of the 16 dims of each head rotate (Phi-4-mini rotates 3/4)
        rope: dict = {"rope_type": "default", "rope_theta": 10_000.0,
                      "partial_rotary_factor": 0.75}
        if family == "phi3_longrope":  # LongRoPE with per-frequency factors (6 = rotary dim/2)
            rope = {**rope, "rope_type": "longrope",
                    "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                    "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]}
        return Phi3Config, dict(
            num_hidden_layers=3, rms_norm_eps=1e-5, tie_word_embeddings=False,
            original_max_position_embeddings=32, sliding_window=None, rope_parameters=rope)
    if family == "qwen3_yarn":
        from transformers import Qwen3Config

        return Qwen3Config, dict(
            num_hidden_layers=3, rms_norm_eps=1e-6, use_sliding_window=False,
            tie_word_embeddings=True, attention_bias=False, max_position_embeddings=128,
            rope_parameters={"rope_type": "yarn", "rope_theta": 1_000_000.0, "factor": 4.0,
                             "original_max_position_embeddings": 32})
    if family in ("qwen2", "qwen3"):
        from transformers import Qwen2Config, Qwen3Config

        qwen = dict(num_hidden_layers=3, rms_norm_eps=1e-6, use_sliding_window=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
        if family == "qwen2":  # q/k/v biases: Qwen2's attention always has them
            return Qwen2Config, dict(qwen, tie_word_embeddings=False)
        return Qwen3Config, dict(qwen, tie_word_embeddings=True, attention_bias=False)
    if family == "gemma3":
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig, dict(
            num_hidden_layers=4,
            layer_types=["sliding_attention", "sliding_attention", "full_attention",
                         "sliding_attention"],
            sliding_window=8,
            rms_norm_eps=1e-6,
            query_pre_attn_scalar=24,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            attention_bias=False,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0,
                                   "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES + NEW_FAMILIES}")


def tiny_config(family: str, vocab_size: int = 101, **overrides):
    """transformers config of the tiny ``family`` model (``architectures`` set, fp32)."""
    config_cls, settings = _family_settings(family)
    settings = {**_COMMON, **settings, "vocab_size": vocab_size,
                "architectures": [ARCHITECTURES[family]]}
    settings.update(overrides)
    rope = settings.get("rope_parameters") or {}
    if rope.get("rope_type") == "longrope" and "rope_parameters" not in overrides:
        # one LongRoPE factor per rotated frequency: stretch the tables to this head's count
        count = int(settings["head_dim"] * rope["partial_rotary_factor"]) // 2
        settings["rope_parameters"] = {**rope, **{
            name: _stretched(rope[name], count) for name in ("short_factor", "long_factor")}}
    return config_cls(**settings)


def _stretched(values: list[float], count: int) -> list[float]:
    """``values`` linearly interpolated to ``count`` entries (unchanged when they fit)."""
    if len(values) == count:
        return list(values)
    import numpy as np

    return [float(v) for v in np.interp(np.linspace(0, len(values) - 1, count),
                                        np.arange(len(values)), values)]


def _model_class(family: str):
    import transformers

    return getattr(transformers, ARCHITECTURES[family])


def _randomise(model, family: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name:
                # Gemma's RMSNorm scales by (1 + w): 0.2·randn is the same spread around 1
                scale = 0.2 * noise if family == "gemma3" else 1.0 + 0.2 * noise
                param.copy_(scale)
            else:
                param.copy_(0.15 * noise)


def tiny_model(family: str, seed: int = 0, **overrides):
    """Random tiny HF causal LM of ``family`` (eval, fp32, eager attention, no grad)."""
    config = tiny_config(family, **overrides)
    config._attn_implementation = "eager"
    model = _model_class(family)(config)
    model.to(torch.float32)
    _randomise(model, family, seed)
    model.eval()
    model.requires_grad_(False)
    return model


def _add_v4_spellings(raw: dict, family: str) -> dict:
    """Write transformers 4.x's RoPE fields next to 5.x's ``rope_parameters``.

    transformers 4.57 ignores ``rope_parameters`` (it would fall back to its default θ and no
    scaling); transformers 5 reads ``rope_parameters`` first and takes the legacy fields only as
    defaults (for LLaMA/Qwen ``rope_scaling`` replaces ``rope_parameters``, so it must carry the
    same values; for Gemma 3 it is merged into the full-attention entry).
    """
    rp = raw.get("rope_parameters")
    if not isinstance(rp, dict):
        return raw

    def legacy_scaling(params: dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            return None
        return {k: v for k, v in params.items() if k != "rope_theta"}

    if family == "gemma3":
        full, local = rp["full_attention"], rp["sliding_attention"]
        if legacy_scaling(local) is not None:
            raise ValueError("transformers 4.x cannot express rope scaling on sliding layers")
        raw["rope_theta"] = float(full["rope_theta"])
        raw["rope_local_base_freq"] = float(local["rope_theta"])
        raw["rope_scaling"] = legacy_scaling(full)
    else:
        raw["rope_theta"] = float(rp["rope_theta"])
        raw["rope_scaling"] = legacy_scaling(rp)
        if "partial_rotary_factor" in rp:  # a top-level field in transformers 4.x
            raw["partial_rotary_factor"] = rp["partial_rotary_factor"]
            if raw["rope_scaling"] is not None:
                raw["rope_scaling"].pop("partial_rotary_factor", None)
    return raw


def tiny_tokenizer(vocab_size: int = 101):
    """Word-level fast tokenizer over ``vocab_size`` ids: ``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2,
    ``<unk>`` 3, then ``w4`` … ``w{vocab_size-1}`` (text "w4 w17 w9" -> [4, 17, 9])."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL_TOKENS)
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>",
                                   eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def save_tiny(family: str, directory, seed: int = 0, tokenizer_from=None, **overrides) -> Path:
    """Save the tiny model (safetensors + config.json readable by transformers 4 and 5).

    With ``tokenizer_from`` (a tokenizer directory) that tokenizer is saved too, and the model's
    vocab_size and bos/eos/pad ids follow it; without it, ``tiny_tokenizer(vocab_size)`` is
    saved, so the directory is a complete checkpoint (``AutoTokenizer`` loads it).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = None
    if tokenizer_from is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
        overrides = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                     "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id, **overrides}
    model = tiny_model(family, seed=seed, **overrides)
    model.save_pretrained(str(directory), safe_serialization=True)
    config_path = directory / "config.json"
    raw = json.loads(config_path.read_text())
    raw.pop("_attn_implementation", None)
    raw.pop("attn_implementation", None)
    config_path.write_text(json.dumps(_add_v4_spellings(raw, family), indent=2, sort_keys=True)
                           + "\n")
    if tokenizer is None:
        tokenizer = tiny_tokenizer(model.config.vocab_size)
    tokenizer.save_pretrained(str(directory))
    return directory
