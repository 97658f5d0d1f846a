#!/usr/bin/env python3
"""Independent AttnLRP reference computed with LXT (``lxt`` on PyPI), efficient mode.

Runs in its own virtual environment (see ``references/lxt_env.sh``), because lxt 2.1
needs transformers 4.x::

    bash references/lxt_env.sh
    .venv-lxt/bin/python references/lxt_reference.py --model DIR \\
        --input-json IN.json --output-json OUT.json

IN.json::

    {"cases": [{"input_ids": [...], "target_position": int, "target_token_id": int}],
     "mode": "attnlrp",          # or "cp-lrp" (LXT's CP-LRP rule set) or "gradient"
                                 # (no LXT patch: plain Gradient x Input)
     "repeats": 5,               # timed repeats per case (median reported)
     "time": true,               # measure wall time and peak memory
     "threads": null,            # optional: torch.set_num_threads
     "only_target_logits": false # optional: lm_head only at target_position
                                 # (HF logits_to_keep); default = full logits,
                                 # as in LXT's own examples
    }

The model family comes from config.json's ``architectures``: Llama/Mistral ->
``LlamaForCausalLM``, Qwen2 -> ``Qwen2ForCausalLM``, Qwen3 -> ``Qwen3ForCausalLM``,
Gemma3ForCausalLM -> ``Gemma3ForCausalLM`` (text-only Gemma 3). For every case: that model
(fp32, eager attention), its transformers module patched with
``lxt.efficient.monkey_patch(modeling_<family>, lxt.efficient.models.<family>.<rule set>)``
(patching is process-global: one decoder family per process); ``inputs_embeds =
model.get_input_embeddings()(input_ids)`` as a leaf that requires grad (for Gemma 3 that
module already multiplies by sqrt(hidden_size), and the model does not scale inputs_embeds
again); ``logit = logits[0, target_position, target_token_id]``; ``logit.backward()``
(seed 1); token relevance = ``(inputs_embeds * inputs_embeds.grad).sum(-1)``.

BERT and GPT-2 (additive position embeddings; ``BertModel``, ``BertForSequenceClassification``,
``GPT2LMHeadModel``): LXT's ``lxt.efficient.models.bert.attnLRP`` (it replaces
``modeling_bert``'s classes with LXT's annotated copies; LXT 2.1 has no CP-LRP set for BERT) and
``lxt.efficient.models.gpt2.{attnLRP, cp_LRP}``; one process holds both (``--model`` of either).
A case may name its own ``"model"`` directory (BERT or GPT-2, when ``--model`` is) and gives a
target object (the flat target_position / target_token_id above still means a GPT-2 logit)::

    {"input_ids": [...], "token_type_ids": [...] (BERT, optional), "model": DIR (optional),
     "target": {"kind": "logit", "position": p, "token_id": t}            # GPT2LMHeadModel
             | {"kind": "pooled", "dim": k, "pooling": "mean" | "cls"}   # BERT encoder
             | {"kind": "cosine", "other_input_ids": [...], "pooling": ...}
             | {"kind": "class", "label": i}}     # BertForSequenceClassification

``pooled``: dimension k of the mean (or CLS) pooled last hidden state, before normalisation.
``cosine``: (a·b)/(‖a‖‖b‖) of the two texts' pooled vectors with the norms detached and
LXT's ``divide_gradient(·, 2)`` on a and on b (half of the dot product to each text), one
forward and backward per text. Per case the output has ``relevance`` = Σ_hidden E ⊙ g at
``inputs_embeds`` (the word embeddings E: what LXT's gradient×input gives) and, from hooks at
the embedding sum S = E + P (+ T) (input of BERT's embedding LayerNorm, of GPT-2's dropout),
``relevance_embedding_sum`` = Σ_hidden S ⊙ g, split into ``relevance`` +
``relevance_position`` (+ ``relevance_token_type``) (the gradient at S equals the gradient at
E); ``target_value`` (= ``logit``), ``relevance_sum``, ``relevance_embedding_sum_total`` and
their ratios to the target (``conservation``, ``conservation_embedding_sum``); for cosine the
second text's arrays with the suffix ``_other`` (totals over both texts). ``"time"`` gives
times for these cases, no memory measurement.

transformers 5.x checkpoints keep RoPE settings only in ``rope_parameters`` (Gemma 3: one
dict per layer type); missing 4.x fields (``rope_theta``, ``rope_scaling``,
``rope_local_base_freq``) are filled from it and reported as ``config_fixes``.

Timing (``"time": true``): one warm-up explanation, then ``repeats`` timed
explanations (forward + backward + relevance reduction); the median is
reported. Peak memory: each case is re-run in a fresh subprocess that loads the
model, does a tiny warm-up, resets the kernel's peak-RSS counter
(``/proc/self/clear_refs`` = 5), runs one explanation and reports
``VmHWM - VmRSS(before)`` = peak bytes beyond the loaded weights.
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
import types
import warnings

import torch


# ---------------------------------------------------------------------------
# LXT import (lxt.efficient.models imports torchvision for its ViT patch map;
# torchvision is deliberately not installed, so a stub stands in for it. The
# stub is only used as dict keys of the ViT map and never touches LLaMA.)
# ---------------------------------------------------------------------------

def _stub_torchvision() -> bool:
    if "torchvision" in sys.modules:  # the real one, or this stub (second family's patch)
        return False
    if importlib.util.find_spec("torchvision") is not None:
        return False
    tv = types.ModuleType("torchvision")
    tvm = types.ModuleType("torchvision.models")
    vt = types.ModuleType("torchvision.models.vision_transformer")
    vt.nn = torch.nn
    tv.models = tvm
    tvm.vision_transformer = vt
    sys.modules.update({"torchvision": tv, "torchvision.models": tvm,
                        "torchvision.models.vision_transformer": vt})
    return True


# checkpoint architecture -> family; family -> (transformers module, model class, config class)
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",  # loaded as LLaMA, as before (same layer structure)
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    # additive position embeddings (ADDITIVE_FAMILIES): the class is the architecture itself,
    # taken from the patched modeling module (LXT's BERT patch replaces the module's classes)
    "BertModel": "bert",
    "BertForSequenceClassification": "bert",
    "GPT2LMHeadModel": "gpt2",
}
FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaForCausalLM", "LlamaConfig"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM", "Qwen2Config"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3ForCausalLM", "Qwen3Config"),
    "gemma3": ("transformers.models.gemma3.modeling_gemma3", "Gemma3ForCausalLM",
               "Gemma3TextConfig"),
    "bert": ("transformers.models.bert.modeling_bert", None, "BertConfig"),
    "gpt2": ("transformers.models.gpt2.modeling_gpt2", "GPT2LMHeadModel", "GPT2Config"),
}
ADDITIVE_FAMILIES = ("bert", "gpt2")
# LXT 2.1 ships no CP-LRP rule set for BERT (lxt/efficient/models/bert.py: attnLRP only).
RULE_SETS = {"bert": ("attnlrp",)}
# Targets (a case's "target": {"kind": ...}) per family; "logit" is also the old flat form
# (target_position + target_token_id).
TARGET_KINDS = {"bert": ("pooled", "cosine", "class"), "gpt2": ("logit",)}


def architecture_of(model_dir: str) -> str:
    """The first of config.json's ``architectures`` that this script supports."""
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    raise SystemExit(f"{model_dir}: architectures {archs} not supported by lxt_reference.py "
                     f"(supported: {', '.join(ARCHITECTURES)})")


def family_of(model_dir: str) -> str:
    """Model family of a checkpoint, from config.json's ``architectures``."""
    return ARCHITECTURES[architecture_of(model_dir)]


def _import_lxt(family: str = "llama"):
    """``(lxt.efficient.monkey_patch, lxt.efficient.models.<family>)``."""
    _stub_torchvision()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "'zennit' library is not available"
        from lxt.efficient import monkey_patch
        rules = importlib.import_module(f"lxt.efficient.models.{family}")
    return monkey_patch, rules


_PATCHED: tuple[str, frozenset[str]] | None = None  # (mode, families)


def apply_patch(mode: str, family: str = "llama") -> None:
    """Patch one family's transformers module globally (once per process and family).

    As LXT documents: ``monkey_patch(modeling_<family>, lxt.efficient.models.<family>.attnLRP)``
    (``cp_LRP`` for CP-LRP); ``gradient`` patches nothing. A process holds one decoder family,
    or the additive families (BERT and GPT-2) together in one mode: their rule sets patch their
    own modeling modules and ``torch.nn.LayerNorm`` / ``Dropout`` with the same functions (the
    second family's identical patches of those two are skipped as already applied).
    """
    global _PATCHED
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILIES)})")
    if mode != "gradient" and mode not in RULE_SETS.get(family, ("attnlrp", "cp-lrp")):
        raise SystemExit(f"LXT 2.1 has no {mode} rule set for {family} "
                         f"(available: {', '.join(RULE_SETS[family])}, gradient)")
    if _PATCHED is not None:
        patched_mode, families = _PATCHED
        if patched_mode == mode and (family in families or mode == "gradient"):
            return
        if not (patched_mode == mode and family in ADDITIVE_FAMILIES
                and families <= set(ADDITIVE_FAMILIES)):
            raise RuntimeError(f"process already patched for {_patched_text(_PATCHED)}; "
                               f"cannot add {mode} {family}")
    if mode != "gradient":
        modeling = importlib.import_module(FAMILIES[family][0])
        monkey_patch, rules = _import_lxt(family)
        rule_set = getattr(rules, {"attnlrp": "attnLRP", "cp-lrp": "cp_LRP"}[mode])
        with warnings.catch_warnings():
            if _PATCHED is not None:  # "LayerNorm already patched": the first family did it
                warnings.simplefilter("ignore")
            monkey_patch(modeling, rule_set)
    _PATCHED = (mode, (_PATCHED[1] if _PATCHED else frozenset()) | {family})


def _patched_text(patched: tuple[str, frozenset[str]]) -> str:
    return f"{patched[0]} {'+'.join(sorted(patched[1]))}"


# ---------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------

def _legacy_rope_fixes(config, raw: dict, family: str) -> list[str]:
    """Copy transformers 5.x ``rope_parameters`` to the 4.x fields where they are missing.

    Checkpoints written by transformers 5.x keep RoPE settings only under ``rope_parameters``
    (for Gemma 3 one dict per layer type); transformers 4.x ignores that key and silently
    falls back to its default θ without scaling.
    """
    rp = raw.get("rope_parameters")
    if not isinstance(rp, dict):
        return []
    fixes = []

    def scaling_of(params):
        rope_type = params.get("rope_type", params.get("type", "default"))
        return None if rope_type == "default" else {
            k: v for k, v in params.items() if k != "rope_theta"}

    if family == "gemma3" and "full_attention" in rp:
        full, local = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
        if "rope_theta" not in raw and "rope_theta" in full:
            config.rope_theta = float(full["rope_theta"])
            fixes.append(f"rope_theta={config.rope_theta} from rope_parameters.full_attention")
        if "rope_local_base_freq" not in raw and "rope_theta" in local:
            config.rope_local_base_freq = float(local["rope_theta"])
            fixes.append(f"rope_local_base_freq={config.rope_local_base_freq} "
                         "from rope_parameters.sliding_attention")
        if scaling_of(local) is not None:
            raise SystemExit("rope scaling on sliding-window layers cannot be expressed "
                             "in transformers 4.x")
        if scaling_of(full) is not None and not raw.get("rope_scaling"):
            config.rope_scaling = scaling_of(full)
            fixes.append(f"rope_scaling={config.rope_scaling} from rope_parameters.full_attention")
        return fixes
    if "rope_theta" not in raw and "rope_theta" in rp:
        config.rope_theta = float(rp["rope_theta"])
        fixes.append(f"rope_theta={config.rope_theta} from rope_parameters")
    if scaling_of(rp) is not None and not raw.get("rope_scaling"):
        config.rope_scaling = scaling_of(rp)
        fixes.append(f"rope_scaling={config.rope_scaling} from rope_parameters")
    return fixes


def load_model(model_dir: str):
    """Load the checkpoint's model (fp32, eager attention) -> (model, config fixes).

    The family comes from config.json's ``architectures``; it must be the patched one. The
    decoders load as their causal LM; BERT and GPT-2 as their architecture, from the (patched)
    modeling module: LXT's BERT patch replaces ``modeling_bert``'s classes with its own copies.
    """
    import transformers

    arch = architecture_of(model_dir)
    family = ARCHITECTURES[arch]
    if _PATCHED is not None and _PATCHED[0] != "gradient" and family not in _PATCHED[1]:
        raise RuntimeError(f"process patched for {_patched_text(_PATCHED)}, "
                           f"checkpoint is {family!r}")
    module_name, model_name, config_name = FAMILIES[family]
    kwargs = {}
    if family in ADDITIVE_FAMILIES:
        model_cls = getattr(importlib.import_module(module_name), arch)
        if arch == "BertModel":  # the pooler (CLS dense + tanh) is never a target here
            kwargs["add_pooling_layer"] = False
    else:
        model_cls = getattr(transformers, model_name)
    config_cls = getattr(transformers, config_name)
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    config = config_cls.from_pretrained(model_dir)
    fixes = _legacy_rope_fixes(config, raw, family)
    model = model_cls.from_pretrained(
        model_dir, config=config, dtype=torch.float32, attn_implementation="eager", **kwargs)
    model.eval()
    for p in model.parameters():  # as in LXT's examples: no parameter gradients
        p.requires_grad_(False)
    return model, fixes


# ---------------------------------------------------------------------------
# One explanation
# ---------------------------------------------------------------------------

def explain(model, input_ids: torch.Tensor, target_position: int, target_token_id: int,
            only_target_logits: bool = False):
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_(True)
    kwargs = {}
    pos = target_position
    if only_target_logits:
        kwargs["logits_to_keep"] = torch.tensor([target_position])
        pos = 0
    logits = model(inputs_embeds=embeds, use_cache=False, **kwargs).logits
    logit = logits[0, pos, target_token_id]
    logit.backward()
    relevance = (embeds * embeds.grad).sum(-1)[0]
    return relevance.detach(), float(logit.detach())


# ---------------------------------------------------------------------------
# BERT and GPT-2: additive position (and token-type) embeddings
# ---------------------------------------------------------------------------

def _embedding_parts(model):
    """The modules whose outputs are added to the word embeddings, and the module whose input
    is their sum: BERT ``embeddings.{position,token_type}_embeddings`` and
    ``embeddings.LayerNorm``; GPT-2 ``wpe`` and ``drop`` (LXT's patch makes Dropout the
    identity)."""
    base = model.base_model
    if hasattr(base, "wpe"):  # GPT2Model (token_type_ids are never passed: no wte(type) term)
        return {"position": base.wpe}, base.drop
    embeddings = base.embeddings
    return ({"position": embeddings.position_embeddings,
             "token_type": embeddings.token_type_embeddings}, embeddings.LayerNorm)


class _EmbeddingProbe:
    """Forward hooks that keep the added embeddings and the embedding sum S (with its gradient)
    of every forward pass while active, in call order."""

    def __init__(self, model):
        self.parts, self.sum_module = _embedding_parts(model)
        self.passes: list[dict] = []
        self._handles = []

    def __enter__(self):
        for name, module in self.parts.items():
            self._handles.append(module.register_forward_hook(self._part_hook(name)))
        self._handles.append(self.sum_module.register_forward_pre_hook(self._sum_hook))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _part_hook(self, name):
        def hook(module, args, output):
            if not self.passes or "sum" in self.passes[-1]:
                self.passes.append({})
            self.passes[-1][name] = output.detach()
        return hook

    def _sum_hook(self, module, args):
        total = args[0]
        if total.requires_grad:
            total.retain_grad()
        self.passes[-1]["sum"] = total


def _side(embeds: torch.Tensor, probe_pass: dict, suffix: str = "") -> dict:
    """Per-token relevance of one text: LXT's own E⊙g at inputs_embeds and the split of
    S⊙g_S, S = E + P (+ T), over its terms (g_S = g: the sum passes the gradient unchanged)."""
    grad = embeds.grad[0]
    total = probe_pass["sum"]
    out = {"relevance": (embeds[0] * grad).sum(-1)}
    out["relevance_embedding_sum"] = (total[0] * total.grad[0]).sum(-1)
    for name in ("position", "token_type"):
        if name in probe_pass:
            out[f"relevance_{name}"] = (probe_pass[name][0] * total.grad[0]).sum(-1)
    parts = embeds.detach() + sum(probe_pass[n] for n in ("position", "token_type")
                                  if n in probe_pass)
    out["check_sum_equals_parts"] = float((total.detach() - parts).abs().max())
    out["check_grad_sum_equals_grad_embeds"] = float((total.grad - embeds.grad).abs().max())
    return {f"{key}{suffix}": (value.detach().double().tolist() if torch.is_tensor(value)
                               else value) for key, value in out.items()}


def _pool(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """One text's last hidden states [T, H] -> [H] (no padding: every token counts)."""
    if pooling == "mean":
        return hidden.mean(0)
    if pooling == "cls":
        return hidden[0]
    raise ValueError(f"unknown pooling {pooling!r} (mean | cls)")


def _leaf_embeds(model, ids: list[int]) -> torch.Tensor:
    return model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)


def _token_types(case: dict, key: str = "token_type_ids"):
    return None if case.get(key) is None else torch.tensor([case[key]])


def explain_additive(model, case: dict) -> dict:
    """One explanation on BERT or GPT-2 (LXT's rules as patched; seed 1 at the target scalar).

    Targets (``case["target"]["kind"]``):
    - ``logit`` (GPT2LMHeadModel): ``logits[0, position, token_id]``;
    - ``pooled`` (BertModel / BertForSequenceClassification's encoder): dimension ``dim`` of
      the ``pooling`` ("mean", default, or "cls") of the last hidden state, before any
      normalisation;
    - ``cosine`` (same encoder): cos(a, b) of the pooled vectors of ``input_ids`` (a) and
      ``other_input_ids`` (b) as (a·b)/(‖a‖‖b‖) with both norms detached and LXT's
      ``divide_gradient(·, 2)`` on a and on b (half of the dot product to each side); one
      forward and backward per text;
    - ``class`` (BertForSequenceClassification): ``logits[0, label]``.
    """
    target = case["target"]
    kind = target["kind"]
    result = {"target_kind": kind}
    with _EmbeddingProbe(model) as probe:
        embeds = _leaf_embeds(model, case["input_ids"])
        types = _token_types(case)
        if kind == "logit":
            logits = model(inputs_embeds=embeds, use_cache=False).logits
            value = logits[0, target["position"], target["token_id"]]
        elif kind == "class":
            value = model(inputs_embeds=embeds, token_type_ids=types).logits[0, target["label"]]
        elif kind in ("pooled", "cosine"):
            encoder = model.base_model
            pooling = target.get("pooling", "mean")
            a = _pool(encoder(inputs_embeds=embeds, token_type_ids=types).last_hidden_state[0],
                      pooling)
            if kind == "pooled":
                value = a[target["dim"]]
            else:
                from lxt.efficient.rules import divide_gradient

                other = _leaf_embeds(model, target["other_input_ids"])
                b = _pool(encoder(inputs_embeds=other,
                                  token_type_ids=_token_types(target, "other_token_type_ids"))
                          .last_hidden_state[0], pooling)
                scale = a.detach().norm() * b.detach().norm()
                value = (divide_gradient(a, 2) * divide_gradient(b, 2)).sum() / scale
                result["cosine_plain"] = float(
                    torch.nn.functional.cosine_similarity(a.detach(), b.detach(), dim=0))
        else:
            raise ValueError(f"unknown target kind {kind!r}")
        value.backward()
    result.update(_side(embeds, probe.passes[0]))
    total = sum(result["relevance"])
    total_sum = sum(result["relevance_embedding_sum"])
    if kind == "cosine":
        result.update(_side(other, probe.passes[1], "_other"))
        total += sum(result["relevance_other"])
        total_sum += sum(result["relevance_embedding_sum_other"])
    value = float(value.detach())
    result.update({
        "target_value": value, "logit": value,
        "relevance_sum": total, "relevance_embedding_sum_total": total_sum,
        "conservation": total / value if value != 0 else None,
        "conservation_embedding_sum": total_sum / value if value != 0 else None,
    })
    return result


def _normalize_additive_case(case: dict, family: str, arch: str, vocab: int) -> dict:
    """A checked copy of a BERT/GPT-2 case with its target in ``{"kind": ...}`` form."""
    ids = [int(t) for t in case["input_ids"]]
    if not ids:
        raise ValueError("empty input_ids")
    if "target" in case:
        target = dict(case["target"])
    elif "target_token_id" in case:  # the decoders' flat form
        target = {"kind": "logit", "position": case["target_position"],
                  "token_id": case["target_token_id"]}
    else:
        raise ValueError("a case needs a 'target' (or target_position + target_token_id)")
    kind = target.get("kind")
    if kind not in TARGET_KINDS[family]:
        raise ValueError(f"target kind {kind!r} not available for {family} "
                         f"(one of {', '.join(TARGET_KINDS[family])})")
    if kind == "class" and arch != "BertForSequenceClassification":
        raise ValueError(f"target kind 'class' needs BertForSequenceClassification, not {arch}")
    for key in ("input_ids", "other_input_ids"):
        seq = ids if key == "input_ids" else target.get(key)
        if seq is not None and not all(0 <= int(t) < vocab for t in seq):
            raise ValueError(f"{key} out of range (vocab {vocab})")
    if kind == "logit":
        position = int(target["position"])
        target["position"] = position + len(ids) if position < 0 else position
        if not 0 <= target["position"] < len(ids):
            raise ValueError(f"target position {position} out of range for {len(ids)} tokens")
        if not 0 <= int(target["token_id"]) < vocab:
            raise ValueError(f"target token_id {target['token_id']} out of range (vocab {vocab})")
    if kind == "cosine":
        target["other_input_ids"] = [int(t) for t in target["other_input_ids"]]
        if not target["other_input_ids"]:
            raise ValueError("empty other_input_ids")
    out = {"input_ids": ids, "target": target}
    if case.get("token_type_ids") is not None:
        out["token_type_ids"] = [int(t) for t in case["token_type_ids"]]
        if len(out["token_type_ids"]) != len(ids):
            raise ValueError("token_type_ids and input_ids differ in length")
    return out


def _run_additive_case(case: dict, models: dict, mode: str, do_time: bool,
                       repeats: int) -> dict:
    """One BERT/GPT-2 case, on its own ``"model"`` directory if it names one (BERT or GPT-2:
    the other additive family is patched into this process when first met)."""
    model_dir = os.path.abspath(case.get("model") or next(iter(models)))
    if model_dir not in models:
        family = family_of(model_dir)
        if family not in ADDITIVE_FAMILIES:
            raise SystemExit(f"{model_dir} is {family}: a case's own model must be "
                             f"{' or '.join(ADDITIVE_FAMILIES)}")
        apply_patch(mode, family)
        models[model_dir], _ = load_model(model_dir)
    model = models[model_dir]
    arch = type(model).__name__
    family = ARCHITECTURES[arch]
    if family == "gpt2" and case.get("token_type_ids") is not None:
        raise ValueError("token_type_ids are for BERT only")
    checked = _normalize_additive_case(case, family, arch, model.config.vocab_size)
    res = {"model": model_dir, "family": family, "architecture": arch,
           "n_tokens": len(checked["input_ids"]),
           "target": checked["target"], **explain_additive(model, checked)}
    if do_time:
        times = []  # the explanation above is the warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            explain_additive(model, checked)
            times.append(time.perf_counter() - t)
        res["time_s_median"] = statistics.median(times)
        res["times_s"] = times
    return res


def _normalize_case(case, seq_vocab: int):
    ids = [int(t) for t in case["input_ids"]]
    n = len(ids)
    if n == 0:
        raise ValueError("empty input_ids")
    pos = int(case["target_position"])
    if pos < 0:
        pos += n
    if not 0 <= pos < n:
        raise ValueError(f"target_position {case['target_position']} out of range for {n} tokens")
    tok = int(case["target_token_id"])
    if not 0 <= tok < seq_vocab:
        raise ValueError(f"target_token_id {tok} out of range (vocab {seq_vocab})")
    return ids, pos, tok


# ---------------------------------------------------------------------------
# Memory measurement (fresh subprocess per case)
# ---------------------------------------------------------------------------

def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
    return int(m.group(1)) if m else -1


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_worker() -> None:
    spec = json.load(sys.stdin)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    apply_patch(spec["mode"], family_of(spec["model"]))
    rss_start = _proc_status_kib("VmRSS")
    model, _ = load_model(spec["model"])
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    weights_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    ids, pos, tok = spec["input_ids"], spec["target_position"], spec["target_token_id"]
    # tiny warm-up: lazy library initialisation, not the explanation's memory
    n_w = min(2, len(ids))
    explain(model, torch.tensor([ids[:n_w]]), n_w - 1, tok, spec["only_target_logits"])
    gc.collect()
    rss_before = _proc_status_kib("VmRSS")
    hwm_before = _proc_status_kib("VmHWM")
    reset_ok = _reset_peak_rss()
    explain(model, torch.tensor([ids]), pos, tok, spec["only_target_logits"])
    hwm_after = _proc_status_kib("VmHWM")
    if reset_ok:
        peak_extra = (hwm_after - rss_before) * 1024
        method = "VmHWM (reset via clear_refs) - VmRSS after load"
    else:  # lower bound only: load transients may already have set the peak
        peak_extra = max(0, hwm_after - hwm_before) * 1024
        method = "VmHWM delta (clear_refs unavailable; lower bound)"
    json.dump({"peak_bytes_beyond_weights": peak_extra,
               "rss_after_load_bytes": rss_before * 1024,
               "rss_process_start_bytes": rss_start * 1024,
               "weights_bytes": weights_bytes,
               "memory_method": method}, sys.stdout)


def measure_memory(model_dir, mode, ids, pos, tok, threads, only_target_logits):
    spec = {"model": model_dir, "mode": mode, "input_ids": ids, "target_position": pos,
            "target_token_id": tok, "threads": threads,
            "only_target_logits": only_target_logits}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_memory-worker"],
                          input=json.dumps(spec), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def _versions():
    import transformers

    def ver(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"lxt": ver("lxt"), "transformers": transformers.__version__,
            "torch": torch.__version__, "python": sys.version.split()[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model directory (HF Llama/Mistral/Qwen2/Qwen3/Gemma3 "
                    "ForCausalLM, BertModel, BertForSequenceClassification, GPT2LMHeadModel)")
    ap.add_argument("--input-json")
    ap.add_argument("--output-json")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (overrides 'threads' in the input)")
    ap.add_argument("--_memory-worker", dest="memory_worker", action="store_true",
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_worker:
        _memory_worker()
        return 0
    if not (args.model and args.input_json and args.output_json):
        ap.error("--model, --input-json and --output-json are required")

    with open(args.input_json) as f:
        spec = json.load(f)
    mode = str(spec.get("mode", "attnlrp")).lower().replace("_", "-")
    if mode == "cplrp":
        mode = "cp-lrp"
    if mode not in ("attnlrp", "cp-lrp", "gradient"):
        raise SystemExit(f"unknown mode {spec.get('mode')!r} (attnlrp | cp-lrp | gradient)")
    repeats = max(1, int(spec.get("repeats", 1)))
    do_time = bool(spec.get("time", False))
    only_target = bool(spec.get("only_target_logits", False))
    threads = args.threads if args.threads is not None else spec.get("threads")
    if threads:
        torch.set_num_threads(int(threads))

    family = family_of(args.model)
    apply_patch(mode, family)
    t0 = time.perf_counter()
    model, fixes = load_model(args.model)
    load_s = time.perf_counter() - t0
    cfg = model.config
    for fix in fixes:
        print(f"lxt_reference: config fix for transformers 4.x: {fix}", file=sys.stderr)
    lm_head = getattr(model, "lm_head", None)
    lm_head_tied = (None if lm_head is None else lm_head.weight.data_ptr()
                    == model.get_input_embeddings().weight.data_ptr())
    models = {os.path.abspath(args.model): model}

    out_cases = []
    for case in spec["cases"]:
        if family in ADDITIVE_FAMILIES:
            out_cases.append(_run_additive_case(case, models, mode, do_time, repeats))
            continue
        ids, pos, tok = _normalize_case(case, cfg.vocab_size)
        input_ids = torch.tensor([ids])
        rel, logit = explain(model, input_ids, pos, tok, only_target)
        res = {"n_tokens": len(ids), "target_position": pos, "target_token_id": tok,
               "logit": logit, "relevance": rel.tolist(), "relevance_sum": float(rel.sum()),
               "conservation": float(rel.sum()) / logit if logit != 0 else None}
        if do_time:
            times = []  # the explanation above is the warm-up
            for _ in range(repeats):
                t = time.perf_counter()
                explain(model, input_ids, pos, tok, only_target)
                times.append(time.perf_counter() - t)
            res["time_s_median"] = statistics.median(times)
            res["times_s"] = times
            res.update(measure_memory(args.model, mode, ids, pos, tok, threads, only_target))
        out_cases.append(res)

    rope_theta = getattr(cfg, "rope_theta", None)
    result = {
        "versions": _versions(),
        "mode": mode,
        "model": os.path.abspath(args.model),
        "dtype": "float32",
        "attn_implementation": cfg._attn_implementation,
        "num_threads": torch.get_num_threads(),
        "only_target_logits": only_target,
        "family": family,
        "architecture": type(model).__name__,
        "rope_theta": None if rope_theta is None else float(rope_theta),
        "rope_local_base_freq": (float(cfg.rope_local_base_freq)
                                 if getattr(cfg, "rope_local_base_freq", None) else None),
        "rope_scaling": getattr(cfg, "rope_scaling", None),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "lm_head_tied": lm_head_tied,
        "config_fixes": fixes,
        "load_time_s": load_s,
        "repeats": repeats if do_time else 0,
        "cases": out_cases,
    }
    with open(args.output_json, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
