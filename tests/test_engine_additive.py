"""The additive-position engine (BERT, RoBERTa, GPT-2, a sinusoidal-table GPT-2) against Hugging
Face's forward and the independent float64 reference (``explicit_reference_additive.py``);
conservation, the split of pa-lrp against attnlrp, the vLLM layout, tensor parallelism and the
errors of bad targets. Tiny random models (``tiny_additive.py``): seconds. Agreement with LXT
2.1: ``test_lxt_agreement.py``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from explicit_reference_additive import explicit_additive_relevance
from threaded_ranks import run_ranks
from tiny_additive import POSITIONS, sinusoidal_table, tiny_additive
from vllm_pelrp.engine.additive import (
    LogitSeeds,
    additive_relevance,
    encoder_forward,
    lm_logits,
    run_forward,
    sequence_classification_logits,
    sinusoidal_positions,
)
from vllm_pelrp.engine.heads import (
    ClassifierHead,
    HeadTargetError,
    Pooling,
    dimension_seed,
    label_seed,
    parse_encoder_target,
    pool,
    similarity_seeds,
)
from vllm_pelrp.engine.spec import UnsupportedModelError
from vllm_pelrp.models import architecture_for, decoder_architecture_for

MODES = ["pa-lrp", "attnlrp", "cp-lrp"]
LENGTH = 13
TOLERANCE = 1e-4


def relative_l2(actual, expected) -> float:
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


_MODELS: dict = {}


def model_and_weights(kind: str):
    """The tiny HF model of ``kind`` and the engine's weights (views of it), built once."""
    if kind not in _MODELS:
        model = tiny_additive(kind)
        weights = architecture_for(model.config).weights_from_hf(model)
        if kind == "gpt2_sinusoidal":  # a fixed table: the engine is told so
            weights.spec = dataclasses.replace(weights.spec, position_kind="absolute")
        _MODELS[kind] = model, weights
    return _MODELS[kind]


def inputs(kind: str, seed: int = 0, length: int = LENGTH):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (length,), generator=generator)
    types = None
    if kind.startswith("bert"):  # two segments
        types = torch.tensor([0] * (length // 2) + [1] * (length - length // 2))
    return ids, types


# ---- forward ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "bert_cls", "roberta", "gpt2", "gpt2_sinusoidal"])
def test_forward_equals_hf(kind):
    model, weights = model_and_weights(kind)
    ids, types = inputs(kind, seed=1, length=POSITIONS - 3)
    with torch.no_grad():
        out = model(ids[None], token_type_ids=None if types is None else types[None],
                    output_hidden_states=True)
    hidden = encoder_forward(weights, ids, types)
    # HF's last hidden_states entry: after ln_f for GPT-2, the last layer's output for BERT
    assert (hidden - out.hidden_states[-1][0]).abs().max() < 1e-5
    if kind.startswith("gpt2"):
        assert (lm_logits(weights, hidden) - out.logits[0]).abs().max() < 1e-5
    if kind == "bert_cls":
        assert (sequence_classification_logits(weights, hidden) - out.logits[0]).abs().max() < 1e-5


def test_positions_override_equals_hf_position_ids():
    model, weights = model_and_weights("gpt2")
    ids, _ = inputs("gpt2", length=9)
    positions = torch.arange(9) + 20
    with torch.no_grad():
        expected = model(ids[None], position_ids=positions[None], output_hidden_states=True)
    hidden = encoder_forward(weights, ids, positions=positions)
    assert (hidden - expected.hidden_states[-1][0]).abs().max() < 1e-5


def test_sinusoidal_table_computed_from_the_spec_equals_the_stored_one():
    """The sinusoidal model's table (written into wpe by the tests' own formula) equals the
    engine's ``sinusoidal_positions``; without a stored table the engine computes it."""
    model, weights = model_and_weights("gpt2_sinusoidal")
    table = sinusoidal_positions(POSITIONS, weights.spec.hidden_size)
    assert torch.allclose(table, sinusoidal_table(POSITIONS, weights.spec.hidden_size),
                          atol=1e-6)
    assert torch.allclose(weights.position_embeddings, table, atol=1e-6)
    computed = dataclasses.replace(weights, position_embeddings=None)
    ids, _ = inputs("gpt2_sinusoidal")
    seeds = LogitSeeds.from_rows([[(LENGTH - 1, 7)]])
    stored = additive_relevance(weights, ids, seeds, "pa-lrp")
    fresh = additive_relevance(computed, ids, seeds, "pa-lrp")
    assert torch.allclose(stored.positional, fresh.positional, rtol=1e-5, atol=1e-6)
    assert torch.allclose(stored.token, fresh.token, rtol=1e-5, atol=1e-6)
    learned = dataclasses.replace(computed, spec=dataclasses.replace(weights.spec,
                                                                     position_kind="learned"))
    with pytest.raises(ValueError, match="learned positions need the position table"):
        encoder_forward(learned, ids)


# ---- engine == explicit float64 reference ------------------------------------------------------
def _engine_target(kind, weights, ids, types, target):
    """The engine's seed for a reference target."""
    name, value = next((k, v) for k, v in target.items() if k != "pooling")
    if name == "logits":
        return LogitSeeds.from_rows([value])
    hidden = encoder_forward(weights, ids, types)
    if name == "dimension":
        return dimension_seed(hidden, value, Pooling(target.get("pooling", "mean")))
    return label_seed(hidden, value, ClassifierHead.of(weights))


def _compare(result, reference, mode, has_types):
    """Engine row 0 against the reference dict; returns the worst relative L2."""
    assert float(result.target_logit[0]) == pytest.approx(reference["target"], rel=1e-5, abs=1e-6)
    errors = {"token": relative_l2(result.token[0], reference["token"]),
              "bias_absorbed": relative_l2(result.bias_absorbed[0], reference["bias_absorbed"])}
    if mode == "pa-lrp":
        assert reference["positional"].abs().sum() > 0
        errors["positional"] = relative_l2(result.positional[0], reference["positional"])
        if has_types:
            errors["token_type"] = relative_l2(result.token_type[0], reference["token_type"])
    else:
        assert result.positional.abs().max() == 0
        if has_types:
            assert result.token_type.abs().max() == 0
    if mode == "cp-lrp":
        assert result.softmax_absorbed.abs().max() == 0
    else:
        errors["softmax_absorbed"] = relative_l2(result.softmax_absorbed[0],
                                                 reference["softmax_absorbed"])
    assert float(result.embedding_bias_absorbed[0]) == pytest.approx(
        reference["embedding_bias"], rel=1e-4, abs=1e-6)
    assert float(result.head_bias_absorbed[0]) == pytest.approx(
        reference["head_bias"], rel=1e-4, abs=1e-6)
    assert max(errors.values()) < TOLERANCE, errors
    # conservation: every unit of the target is somewhere
    total = result.input_relevance + result.absorbed
    assert torch.allclose(total, result.target_logit, rtol=TOLERANCE, atol=1e-6)
    return max(errors.values())


CASES = [
    ("bert", {"dimension": 5}),
    ("bert", {"dimension": 17, "pooling": "cls"}),
    ("bert", {"dimension": 40, "pooling": "max"}),
    ("bert_cls", {"label": 2}),
    ("roberta", {"dimension": 9}),
    ("gpt2", {"logits": [(LENGTH - 1, 5), (6, 40)]}),
    ("gpt2_sinusoidal", {"logits": [(LENGTH - 1, 77)]}),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind,target", CASES, ids=[f"{k}-{next(iter(t))}" for k, t in CASES])
def test_engine_matches_explicit_reference(kind, target, mode):
    model, weights = model_and_weights(kind)
    ids, types = inputs(kind)
    result = additive_relevance(weights, ids, _engine_target(kind, weights, ids, types, target),
                                mode, token_type_ids=types)
    pooling = target.get("pooling", "mean")
    reference_target = {k: v for k, v in target.items() if k != "pooling"}
    reference = explicit_additive_relevance(
        model, ids.tolist(), reference_target, mode, pooling=pooling,
        token_type_ids=None if types is None else types.tolist())
    _compare(result, reference, mode, has_types=weights.token_type_embeddings is not None)


@pytest.mark.parametrize("mode", MODES)
def test_similarity_matches_explicit_reference(mode):
    """cosine(a, b): each side's relevance conserves ½·cos; the two sides sum to cos."""
    model, weights = model_and_weights("bert")
    ids_a, types_a = inputs("bert", seed=2)
    ids_b, types_b = inputs("bert", seed=3, length=9)
    forward_a = run_forward(weights, ids_a, types_a)
    forward_b = run_forward(weights, ids_b, types_b)
    pooling = Pooling("mean", normalize=True)
    seeds = similarity_seeds(forward_a.final_hidden, forward_b.final_hidden, pooling)
    side_a = additive_relevance(weights, ids_a, seeds.first, mode, forward=forward_a)
    side_b = additive_relevance(weights, ids_b, seeds.second, mode, forward=forward_b)
    reference = explicit_additive_relevance(
        model, ids_a.tolist(), {"similarity": ids_b.tolist()}, mode,
        token_type_ids=types_a.tolist(), other_token_type_ids=types_b.tolist())
    assert float(seeds.cosine) == pytest.approx(reference["cosine"], rel=1e-5)
    # normalisation does not change the cosine
    a, b = (torch.nn.functional.normalize(pool(f.final_hidden, pooling), dim=0)
            for f in (forward_a, forward_b))
    assert float(seeds.cosine) == pytest.approx(float(a @ b), rel=1e-5)
    _compare(side_a, reference["first"], mode, has_types=True)
    _compare(side_b, reference["second"], mode, has_types=True)
    assert float(side_a.target_logit[0] + side_b.target_logit[0]) == pytest.approx(float(seeds.cosine),
                                                                        rel=1e-5)


# ---- the split: pa-lrp vs attnlrp -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_pa_lrp_splits_exactly_what_attnlrp_gives_the_token(kind):
    """pa-lrp and attnlrp run the same backward; only the input sum is split, so at every
    position attnlrp's token = pa-lrp's token + positional + token_type, and all absorbed
    amounts are equal. cp-lrp is a different backward."""
    _, weights = model_and_weights(kind)
    ids, types = inputs(kind, seed=4)
    if kind == "gpt2":
        seed = LogitSeeds.from_rows([[(LENGTH - 1, 9)], [(3, 50)]])
    else:
        seed = dimension_seed(encoder_forward(weights, ids, types), [3, 30], Pooling("mean"))
    pa = additive_relevance(weights, ids, seed, "pa-lrp", token_type_ids=types)
    attn = additive_relevance(weights, ids, seed, "attnlrp", token_type_ids=types)
    split = pa.token + pa.positional + (pa.token_type if pa.token_type is not None else 0)
    assert torch.allclose(split, attn.token, rtol=1e-5, atol=1e-6)
    assert (pa.positional.abs() > 0).any() and not torch.allclose(pa.token, attn.token)
    for name in ("softmax_absorbed", "bias_absorbed", "embedding_bias_absorbed",
                 "head_bias_absorbed", "target_logit"):
        assert torch.equal(getattr(pa, name), getattr(attn, name)), name
    cp = additive_relevance(weights, ids, seed, "cp-lrp", token_type_ids=types)
    assert not torch.allclose(cp.token, attn.token, rtol=1e-3)


def test_rows_are_independent():
    """Several target rows at once equal one row at a time."""
    _, weights = model_and_weights("gpt2")
    ids, _ = inputs("gpt2")
    rows = [[(LENGTH - 1, 9)], [(3, 50), (8, 11)]]
    both = additive_relevance(weights, ids, LogitSeeds.from_rows(rows))
    for index, row in enumerate(rows):
        one = additive_relevance(weights, ids, LogitSeeds.from_rows([row]))
        assert torch.allclose(both.token[index], one.token[0], rtol=1e-5, atol=1e-7)
        assert torch.allclose(both.positional[index], one.positional[0], rtol=1e-5, atol=1e-7)


def test_plain_seed_gradient_equals_hidden_seed():
    _, weights = model_and_weights("bert")
    ids, types = inputs("bert")
    seed = dimension_seed(encoder_forward(weights, ids, types), 11, Pooling("cls"))
    as_seed = additive_relevance(weights, ids, seed, token_type_ids=types)
    as_tensor = additive_relevance(weights, ids, seed.gradient, token_type_ids=types)
    assert torch.equal(as_seed.token, as_tensor.token)
    assert torch.equal(as_seed.target_logit, as_tensor.target_logit)


def test_bfloat16_weights_stay_close_to_float32():
    """bf16 weights: the forward runs in bf16, the relevance in fp32, within about 1e-2."""
    model, weights = model_and_weights("gpt2")
    half = architecture_for(model.config).weights_from_hf(
        tiny_additive("gpt2").to(torch.bfloat16))
    ids, _ = inputs("gpt2")
    seed = LogitSeeds.from_rows([[(LENGTH - 1, 9)]])
    full, low = (additive_relevance(w, ids, seed) for w in (weights, half))
    assert low.token.dtype == torch.float32
    assert relative_l2(low.token[0], full.token[0]) < 5e-2
    assert relative_l2(low.positional[0], full.positional[0]) < 5e-2


# ---- weights from vLLM's layout, tensor parallelism ----------------------------------------------
def _vllm_state(kind, model):
    """The parameters as vLLM names them: BERT's q/k/v packed into qkv_proj (BertModel under
    ``model.``, the classifier's backbone under ``bert.``); GPT-2's Conv1D weights transposed."""
    state = {}
    for name, param in model.named_parameters():
        if kind.startswith("gpt2"):
            if param.dim() == 2 and any(p in name for p in ("c_attn", "c_proj", "c_fc")):
                param = param.T
            state[name] = param
            continue
        for part in ("query", "key", "value"):
            if f".self.{part}." in name:
                break
        else:
            state[name if kind == "bert_cls" else "model." + name] = param
            continue
        if part != "query":
            continue
        for suffix in ("weight", "bias"):
            if name.endswith(suffix):
                parts = [dict(model.named_parameters())[name.replace("query", p)]
                         for p in ("query", "key", "value")]
                packed = name.replace("query", "qkv_proj")
                state[packed if kind == "bert_cls" else "model." + packed] = torch.cat(parts)
    return state


@pytest.mark.parametrize("kind", ["bert", "bert_cls", "gpt2"])
def test_vllm_layout_gives_the_same_relevance(kind):
    model, weights = model_and_weights(kind)
    arch = architecture_for(model.config)
    packed = arch.weights_from_vllm(_vllm_state(kind, model), arch.spec(model.config, 1))
    ids, types = inputs(kind)
    if kind == "gpt2":
        seed = LogitSeeds.from_rows([[(LENGTH - 1, 9)]])
    elif kind == "bert_cls":
        seed = label_seed(encoder_forward(weights, ids, types), 1, ClassifierHead.of(weights))
    else:
        seed = dimension_seed(encoder_forward(weights, ids, types), 3, Pooling("mean"))
    expected = additive_relevance(weights, ids, seed, token_type_ids=types)
    result = additive_relevance(packed, ids, seed, token_type_ids=types)
    assert torch.equal(result.token, expected.token)
    assert torch.equal(result.positional, expected.positional)


def _shard(kind, state, spec, rank, ranks):
    """One rank's vLLM shards: q/k/v/up rows (and biases), o/down columns; the rest whole."""
    heads = spec.num_heads * spec.head_dim  # full sizes: spec of one rank
    out = {}
    for name, tensor in state.items():
        packed = ("c_attn" in name) or ("qkv_proj" in name)
        o_proj = "attn.c_proj" in name or "attention.output.dense" in name
        up = "c_fc" in name or "intermediate.dense" in name
        down = ("mlp.c_proj" in name or ("output.dense" in name and not o_proj))
        if packed:
            parts = tensor.split(heads)
            out[name] = torch.cat([p.chunk(ranks)[rank] for p in parts])
        elif up:
            out[name] = tensor.chunk(ranks)[rank]
        elif (o_proj or down) and tensor.dim() == 2:
            out[name] = tensor.chunk(ranks, dim=1)[rank]
        else:
            out[name] = tensor
    return out


@pytest.mark.parametrize("kind", ["bert_cls", "gpt2"])
def test_two_tensor_parallel_ranks_equal_one(kind):
    """Two ranks in threads, each with its vLLM shards and an all-reduce between them, give the
    one-rank relevance: the reduces sit where the partial sums are, and replicated biases are
    booked once."""
    model, weights = model_and_weights(kind)
    arch = architecture_for(model.config)
    state = _vllm_state(kind, model)
    full_spec = arch.spec(model.config, 1)
    rank_spec = arch.spec(model.config, 2)
    ids, types = inputs(kind)
    if kind == "gpt2":
        seed = LogitSeeds.from_rows([[(LENGTH - 1, 9)], [(4, 60)]])
    else:
        seed = label_seed(encoder_forward(weights, ids, types), [0, 2], ClassifierHead.of(weights))
    expected = additive_relevance(weights, ids, seed, token_type_ids=types)

    def run(rank, all_reduce):
        shard = arch.weights_from_vllm(_shard(kind, state, full_spec, rank, 2), rank_spec,
                                       all_reduce=all_reduce)
        return additive_relevance(shard, ids, seed, token_type_ids=types)

    for result in run_ranks(2, run):
        for name in ("token", "positional", "target_logit", "softmax_absorbed", "bias_absorbed",
                     "embedding_bias_absorbed", "head_bias_absorbed"):
            assert torch.allclose(getattr(result, name), getattr(expected, name), rtol=1e-4,
                                  atol=1e-6), name


# ---- registry and errors ------------------------------------------------------------------------
def test_registry_tells_additive_from_decoder_architectures():
    for kind, name in (("bert", "BertModel"), ("bert_cls", "BertForSequenceClassification"),
                       ("roberta", "RobertaModel"), ("gpt2", "GPT2LMHeadModel")):
        model, weights = model_and_weights(kind)
        arch = architecture_for(model.config)
        assert arch.kind == "additive" and name in arch.names
        with pytest.raises(UnsupportedModelError, match=f"{name} is not supported by the "
                           "PA-LRP engine for rotary decoders.*supported: LlamaForCausalLM"):
            decoder_architecture_for(model.config)
        with pytest.raises(UnsupportedModelError, match="additive-position model"):
            arch.decoder  # what the vLLM recorder of rotary decoders looks up
    assert model_and_weights("roberta")[1].spec.position_offset == 2  # padding_idx 1 + 1
    assert model_and_weights("bert_cls")[1].spec.num_labels == 3
    assert model_and_weights("bert")[1].pooler is not None  # HF's BertModel keeps its pooler
    from transformers import BertConfig, GPT2Config

    with pytest.raises(UnsupportedModelError, match="hidden_act='relu' is not supported"):
        architecture_for(BertConfig(architectures=["BertModel"], hidden_act="relu")).spec(
            BertConfig(hidden_act="relu"), 1)
    with pytest.raises(UnsupportedModelError, match="do not split over 3 ranks"):
        arch = architecture_for(GPT2Config(architectures=["GPT2LMHeadModel"]))
        arch.spec(GPT2Config(n_head=4, n_embd=64), 3)


def test_bad_targets_name_what_is_allowed():
    _, bert = model_and_weights("bert")
    _, classifier = model_and_weights("bert_cls")
    _, gpt2 = model_and_weights("gpt2")
    ids, types = inputs("bert")
    hidden = encoder_forward(bert, ids, types)
    with pytest.raises(HeadTargetError, match=r"dimension 64 is out of range: the embedding "
                       r"has 64 dimensions, allowed 0 to 63"):
        dimension_seed(hidden, 64, Pooling())
    with pytest.raises(HeadTargetError, match="dimension must be a whole number"):
        dimension_seed(hidden, 1.5, Pooling())
    head = ClassifierHead.of(classifier, {0: "neg", 1: "neutral", 2: "pos"})
    with pytest.raises(HeadTargetError, match=r"label 3 is out of range: the classifier has 3 "
                       r"labels, allowed 0 to 2 \(0: 'neg', 1: 'neutral', 2: 'pos'\)"):
        label_seed(hidden, 3, head)
    with pytest.raises(HeadTargetError, match=r"unknown label 'happy'; allowed: 0 to 2"):
        label_seed(hidden, "happy", head)
    by_name = label_seed(hidden, "pos", head)
    assert torch.equal(by_name.gradient, label_seed(hidden, 2, head).gradient)
    with pytest.raises(HeadTargetError, match="no sequence-classification head"):
        ClassifierHead.of(dataclasses.replace(bert, classifier=None))
    with pytest.raises(UnsupportedModelError, match="pooling 'lasttoken' is not supported; "
                       "supported: mean, cls, max"):
        Pooling("lasttoken")
    with pytest.raises(HeadTargetError, match=r"allowed: \{'dimension': k\}"):
        parse_encoder_target({"dim": 3})
    assert parse_encoder_target({"label": 1}) == ("label", 1)
    with pytest.raises(ValueError, match="logit targets need an LM head"):
        additive_relevance(bert, ids, LogitSeeds.from_rows([[(0, 5)]]), token_type_ids=types)
    with pytest.raises(ValueError, match="a seed gradient must be"):
        additive_relevance(bert, ids, torch.zeros(1, 3, 64), token_type_ids=types)
    with pytest.raises(ValueError, match=r"token type ids must lie in \[0, 2\)"):
        encoder_forward(bert, ids, torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="41 tokens exceed the model's 40 positions"):
        encoder_forward(bert, torch.randint(3, 101, (41,)))
    with pytest.raises(ValueError, match="unknown mode 'lrp'; allowed: pa-lrp, attnlrp, cp-lrp"):
        additive_relevance(gpt2, ids, LogitSeeds.from_rows([[(0, 5)]]), mode="lrp")
    with pytest.raises(ValueError, match="a target position lies outside the input's 13 tokens"):
        additive_relevance(gpt2, ids, LogitSeeds.from_rows([[(13, 5)]]))
    with pytest.raises(ValueError, match="no token-type embedding"):
        encoder_forward(gpt2, ids, types)


# ---- a real encoder ------------------------------------------------------------------------------
@pytest.mark.slow
def test_minilm_similarity_conserves_on_the_real_model():
    """all-MiniLM-L6-v2 (BertModel, mean pooling + normalize; unpacked once into the user cache):
    forward equals HF, the seeds' cosine is the model's, both sides conserve in every mode."""
    from transformers import AutoModel, AutoTokenizer

    from vllm_pelrp.sentence_models import read_sentence_config
    from vllm_pelrp.shipped_models import MINILM_NAME, ensure_checkpoint

    directory = ensure_checkpoint(MINILM_NAME, progress=False)
    sentence = read_sentence_config(directory)
    pooling = Pooling(sentence.pooling, sentence.normalize)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModel.from_pretrained(directory).eval()
    weights = architecture_for(model.config).weights_from_hf(model)
    texts = [tokenizer(text, return_tensors="pt") for text in
             ("A man is playing a guitar on stage.", "Someone performs music with a guitar.")]
    forwards = [run_forward(weights, t.input_ids[0], t.token_type_ids[0]) for t in texts]
    with torch.no_grad():
        hidden = [model(**t).last_hidden_state[0] for t in texts]
    for forward, expected in zip(forwards, hidden):
        assert (forward.final_hidden - expected).abs().max() < 1e-5
    seeds = similarity_seeds(forwards[0].final_hidden, forwards[1].final_hidden, pooling)
    expected = torch.nn.functional.cosine_similarity(hidden[0].mean(0), hidden[1].mean(0), dim=0)
    assert float(seeds.cosine) == pytest.approx(float(expected), rel=1e-5)
    tokens = {}
    for mode in MODES:
        sides = [additive_relevance(weights, t.input_ids[0], seed, mode, forward=forward)
                 for t, seed, forward in zip(texts, (seeds.first, seeds.second), forwards)]
        total = sum(float(s.input_relevance[0] + s.absorbed[0]) for s in sides)
        assert total == pytest.approx(float(seeds.cosine), rel=1e-4)
        tokens[mode] = sides[0]
    pa = tokens["pa-lrp"]
    assert torch.allclose(pa.token + pa.positional + pa.token_type, tokens["attnlrp"].token,
                          rtol=1e-4, atol=1e-6)


# ---- memory: the fused attention backward, no T×T tensor ----------------------------------------
@pytest.mark.parametrize("kind, rows, row_chunk", [("bert", 4, None), ("gpt2", 4, None),
                                                   ("gpt2", 12, 4)])
def test_no_t_by_t_tensor_and_the_estimate_bounds_the_peak(kind, rows, row_chunk):
    """At 300 tokens (more than any other dimension of the tiny model), a forward and backward
    of ``rows`` targets (``row_chunk`` at a time) creates no tensor with two dims ≥ T (the
    attention runs through the fused kernel), and ``engine/cost.py``'s working set bounds the
    measured peak."""
    from memory_probe import SquareShapes, peak_bytes

    from vllm_pelrp.engine.cost import ModelShape, working_set

    length = 300
    positions = {"n_positions": 512} if kind == "gpt2" else {"max_position_embeddings": 512}
    model = tiny_additive(kind, **positions)
    weights = architecture_for(model.config).weights_from_hf(model)
    ids, types = inputs(kind, length=length)
    if kind == "gpt2":
        seed = LogitSeeds.from_rows([[(length - 1 - r, 9)] for r in range(rows)])
    else:
        seed = dimension_seed(encoder_forward(weights, ids, types), list(range(rows)),
                              Pooling("mean"))

    def explain():
        return additive_relevance(weights, ids, seed, token_type_ids=types, row_chunk=row_chunk)

    with SquareShapes(length) as shapes:
        explain()
    assert shapes.found == []
    measured = peak_bytes(explain)
    estimate = working_set(ModelShape.of_spec(weights.spec, torch.float32, row_chunk=row_chunk),
                           rows, length, from_ids=True).total
    assert measured <= estimate <= 1.6 * measured, (estimate, measured)  # 1.22-1.34 measured


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_row_chunks_give_the_same_result_with_a_checkpoint_per_chunk_and_layer(kind):
    """Rows are independent: 7 rows 3 at a time equal 7 at once, bit for bit, and the
    checkpoint (cancellation, the fair scheduler's slices) comes after each chunk's layer."""
    from vllm_pelrp.engine.additive import relevance_from_forward, run_forward

    model, weights = model_and_weights(kind)
    ids, types = inputs(kind)
    forward = run_forward(weights, ids, types)
    if kind == "gpt2":
        seed = LogitSeeds.from_rows([[(LENGTH - 1 - r, 5 + r)] for r in range(7)])
    else:
        seed = dimension_seed(forward.final_hidden, list(range(7)), Pooling("mean"))
    whole = relevance_from_forward(weights, forward, seed, "pa-lrp")
    calls = []
    chunked = relevance_from_forward(weights, forward, seed, "pa-lrp",
                                     checkpoint=lambda: calls.append(1), row_chunk=3)
    for name, value in vars(whole).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, getattr(chunked, name)), name
        else:
            assert value == getattr(chunked, name), name
    assert len(calls) == 3 * weights.spec.num_layers
