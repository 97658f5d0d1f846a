"""Small random Hugging Face checkpoints of the additive-position family (positions added to the
input as a table), one per kind:

* ``bert``:             BertModel, 2 layers, hidden 64, 4 heads of 16, intermediate 128, erf GELU,
                        40 positions, 2 token types;
* ``bert_cls``:         BertForSequenceClassification on the same backbone, 3 labels (pooler +
                        classifier with biases), ``id2label`` neg/neutral/pos;
* ``roberta``:          RobertaModel, the BERT backbone with RoBERTa's position offset
                        (pad_token_id 1: position t reads row 2 + t), 1 token type;
* ``gpt2``:             GPT2LMHeadModel, 2 layers, hidden 64, 4 heads, gelu_new, 40 positions, tied
                        LM head;
* ``gpt2_sinusoidal``:  that GPT-2 with its ``wpe`` overwritten by the fixed sinusoidal table
                        (``sinusoidal_table``): the engine declares it ``position_kind="absolute"``.

Every parameter is randomised (LayerNorm γ around 1, non-zero LayerNorm β and linear biases), so
every rule and every bias's booking is exercised. ``save_tiny_additive`` writes safetensors and a
config.json that transformers 5 (main env) and 4.57 (LXT's env) both load as the same model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

KINDS = ("bert", "bert_cls", "roberta", "gpt2", "gpt2_sinusoidal")
ARCHITECTURES = {
    "bert": "BertModel",
    "bert_cls": "BertForSequenceClassification",
    "roberta": "RobertaModel",
    "gpt2": "GPT2LMHeadModel",
    "gpt2_sinusoidal": "GPT2LMHeadModel",
}
VOCAB = 101
POSITIONS = 40
LABELS = {0: "neg", 1: "neutral", 2: "pos"}


def tiny_config(kind: str, **overrides):
    """transformers config of the tiny ``kind`` model (``architectures`` set, fp32)."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if kind.startswith("gpt2"):
        from transformers import GPT2Config

        settings = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                        n_positions=POSITIONS, activation_function="gelu_new",
                        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=2,
                        eos_token_id=1)
        config_cls = GPT2Config
    else:
        from transformers import BertConfig, RobertaConfig

        settings = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, hidden_act="gelu",
                        max_position_embeddings=POSITIONS, type_vocab_size=2,
                        layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0)
        config_cls = BertConfig
        if kind == "bert_cls":
            settings.update(num_labels=len(LABELS), id2label=dict(LABELS),
                            label2id={v: k for k, v in LABELS.items()})
        if kind == "roberta":
            config_cls = RobertaConfig
            settings.update(pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
                            max_position_embeddings=POSITIONS + 2)
    settings.update(architectures=[ARCHITECTURES[kind]], dtype="float32")
    settings.update(overrides)
    return config_cls(**settings)


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed absolute table (Vaswani et al.), written here independently of the engine:
    P[t, 2i] = sin(t / 10000^(2i/d)), P[t, 2i+1] = cos(t / 10000^(2i/d))."""
    table = torch.zeros(num_positions, dim, dtype=torch.float64)
    for t in range(num_positions):
        for i in range(0, dim, 2):
            angle = t / math.pow(10000.0, i / dim)
            table[t, i] = math.sin(angle)
            if i + 1 < dim:
                table[t, i + 1] = math.cos(angle)
    return table.float()


def _randomise(model, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    norms = {name for name, module in model.named_modules()
             if isinstance(module, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            module, _, kind = name.rpartition(".")
            if module in norms:
                param.copy_(1.0 + 0.2 * noise if kind == "weight" else 0.1 * noise)
            elif kind == "bias":
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.15 * noise)


def tiny_additive(kind: str, seed: int = 0, **overrides):
    """Random tiny HF model of ``kind`` (eval, fp32, eager attention, no grad)."""
    import transformers

    config = tiny_config(kind, **overrides)
    config._attn_implementation = "eager"
    model = getattr(transformers, ARCHITECTURES[kind])(config)
    model.to(torch.float32)
    _randomise(model, seed)
    if kind == "gpt2_sinusoidal":
        with torch.no_grad():
            model.transformer.wpe.weight.copy_(sinusoidal_table(POSITIONS, config.n_embd))
    model.eval()
    model.requires_grad_(False)
    return model


def save_tiny_additive(kind: str, directory, seed: int = 0, **overrides) -> Path:
    """Save the tiny model as safetensors + a config.json readable by transformers 4 and 5."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = tiny_additive(kind, seed=seed, **overrides)
    model.save_pretrained(str(directory), safe_serialization=True)
    config_path = directory / "config.json"
    raw = json.loads(config_path.read_text())
    for key in ("_attn_implementation", "attn_implementation"):
        raw.pop(key, None)
    raw.setdefault("torch_dtype", "float32")  # transformers 4's name of "dtype"
    if not kind.startswith("gpt2"):
        raw.setdefault("position_embedding_type", "absolute")  # transformers 4 reads it
    config_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    return directory
