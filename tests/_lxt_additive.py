#!/usr/bin/env python3
"""LXT 2.1's efficient AttnLRP on tiny BERT / GPT-2 checkpoints (``tests/tiny_additive.py``), for
``test_engine_additive.py``. Runs in LXT's environment (transformers 4.57)::

    .venv-lxt/bin/python tests/_lxt_additive.py IN.json OUT.json

IN.json: a list of cases ``{"family": "bert"|"gpt2", "arch", "dir", "ids", "token_types"?,
"target": ["dimension", k] | ["label", i] | ["logit", position, token_id]}`` (mean pooling for
``dimension``). Both families' ``attnLRP`` patches go into this one process (they patch
``torch.nn.LayerNorm`` alike). For each case: ``inputs_embeds`` (the word embeddings) as a leaf,
the target's backward (seed 1), g = its gradient; the model adds the position (and token-type)
embeddings to it, so it is the gradient at their sum too. OUT.json: per case the target value,
``word`` = Σ_d E ⊙ g and ``total`` = Σ_d (E + P (+ T)) ⊙ g per position.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
import types
import warnings

import torch


def _stub_torchvision() -> None:
    """lxt.efficient.models imports torchvision for its ViT map; a stub stands in (as in
    bench/lxt_reference.py). Only after transformers is imported (it probes torchvision)."""
    if importlib.util.find_spec("torchvision") is not None:
        return
    tv, tvm = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
    vt = types.ModuleType("torchvision.models.vision_transformer")
    vt.nn, tv.models, tvm.vision_transformer = torch.nn, tvm, vt
    sys.modules.update({"torchvision": tv, "torchvision.models": tvm,
                        "torchvision.models.vision_transformer": vt})


def main(in_path: str, out_path: str) -> None:
    import transformers

    cases = json.load(open(in_path))
    modeling = {family: importlib.import_module(f"transformers.models.{family}.modeling_{family}")
                for family in sorted({case["family"] for case in cases})}
    _stub_torchvision()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from lxt.efficient import monkey_patch

        for family, module in modeling.items():
            rules = importlib.import_module(f"lxt.efficient.models.{family}")
            monkey_patch(module, rules.attnLRP)
    results = []
    for case in cases:
        module = modeling[case["family"]]
        model = getattr(module, case["arch"]).from_pretrained(
            case["dir"], attn_implementation="eager", torch_dtype=torch.float32).eval()
        ids = torch.tensor([case["ids"]])
        kwargs = {}
        if case.get("token_types") is not None:
            kwargs["token_type_ids"] = torch.tensor([case["token_types"]])
        words = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        output = model(inputs_embeds=words, **kwargs)
        kind, *args = case["target"]
        if kind == "logit":
            value = output.logits[0, args[0], args[1]]
        elif kind == "label":
            value = output.logits[0, args[0]]
        else:
            value = output.last_hidden_state[0].mean(0)[args[0]]
        value.backward()
        grad = words.grad[0]
        length = ids.shape[1]
        if case["family"] == "gpt2":
            others = model.transformer.wpe.weight[:length]
        else:
            embeddings = getattr(model, "bert", model).embeddings
            types_ = kwargs.get("token_type_ids", torch.zeros_like(ids))
            others = (embeddings.position_embeddings.weight[:length]
                      + embeddings.token_type_embeddings(types_)[0])
        results.append({"value": float(value),
                        "word": (words[0] * grad).sum(-1).tolist(),
                        "total": ((words[0] + others) * grad).sum(-1).tolist(),
                        "transformers": transformers.__version__})
    json.dump(results, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
