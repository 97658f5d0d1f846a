#!/usr/bin/env python3
"""LXT AttnLRP (efficient mode) for every faithfulness case, timed; runs inside ``.venv-lxt``.

Reuses ``references/lxt_reference.py`` (model loading with the transformers-4 config fix, LXT's
monkey patch of the checkpoint's family — LLaMA/Mistral, Qwen2, Qwen3 or Gemma 3, from
config.json's ``architectures`` — one explanation = forward + backward from the target logit
with seed 1, token relevance = Σ_dim embeddings ⊙ grad). The lm_head runs at the target
position only (HF ``logits_to_keep``), as our engine and the in-process gradient methods do:
the same relevance, without the logits of every position over the whole vocabulary (262,144
for Gemma 3). One warm-up explanation, then each case once, timed.

    .venv-lxt/bin/python references/lxt_flipping_worker.py IN.json OUT.json

IN.json: {"model": DIR, "threads": int|null,
          "cases": [{"input_ids": [...], "target_position": int, "target_token_id": int}]}
OUT.json: {"versions": {...}, "config_fixes": [...],
           "cases": [{"relevance": [...], "logit": float, "time_s": float}]}
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # references/

import torch  # noqa: E402
import lxt_reference as ref  # noqa: E402


def main(argv: list[str]) -> int:
    source, target = argv
    with open(source) as f:
        spec = json.load(f)
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    ref.apply_patch("attnlrp", ref.family_of(spec["model"]))
    model, fixes = ref.load_model(spec["model"])
    out = []
    for index, case in enumerate(spec["cases"]):
        ids = torch.tensor([case["input_ids"]])
        pos, tok = int(case["target_position"]), int(case["target_token_id"])
        if index == 0:  # warm-up
            ref.explain(model, ids, pos, tok, only_target_logits=True)
        start = time.perf_counter()
        relevance, logit = ref.explain(model, ids, pos, tok, only_target_logits=True)
        elapsed = time.perf_counter() - start
        out.append({"relevance": relevance.double().tolist(), "logit": logit, "time_s": elapsed})
    with open(target, "w") as f:
        json.dump({"versions": ref._versions(), "config_fixes": fixes, "cases": out}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
