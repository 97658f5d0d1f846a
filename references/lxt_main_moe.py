#!/usr/bin/env python3
"""LXT main's efficient AttnLRP with its ``qwen3_moe`` rules on the tiny random Qwen3-MoE,
against the float64 reference (tests/explicit_reference.py); writes LXT's relevance as an
artifact that CI (which cannot fetch LXT) holds the engine against.

The Qwen3-MoE rules are only on LXT's main branch (PyPI's lxt 2.1 predates them and runs on
transformers 4.57). Main targets transformers 5.9; it imports and runs under the main
environment's transformers 5.19, so this script runs in ``.venv`` with a checkout of LXT main
on the path::

    mkdir -p /tmp/lxt_main
    git -C <LRP-eXplains-Transformers clone> archive HEAD lxt | tar -x -C /tmp/lxt_main
    PYTHONPATH=$PWD .venv/bin/python references/lxt_main_moe.py --lxt /tmp/lxt_main \\
        --commit "$(git -C <clone> rev-parse HEAD)" --out tests/artifacts/lxt_main_qwen3_moe.json

Recipe (LXT's own): ``save_tiny("qwen3_moe", dir, seed=0)`` writes the hub's per-expert layout
(``mlp.experts.<e>.{gate,up,down}_proj.weight``); ``Qwen3MoeForCausalLM.from_pretrained`` fuses it
into transformers 5's 3D ``gate_up_proj`` / ``down_proj``, the layout LXT main's
``experts_forward`` indexes; the model runs in float64 with eager attention after
``monkey_patch(modeling_qwen3_moe, lxt.efficient.models.qwen3_moe.attnLRP)``;
``inputs_embeds = embed_tokens(ids)`` requires grad; backward from one logit; relevance =
``(inputs_embeds * grad).sum(-1)``. The reference's attnlrp relevance for the same model (the
un-fused copy read back from the directory), ids and target is computed in the same process
(it reads parameters only, so LXT's class patches do not touch it).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SEED = 0  # tiny_model / save_tiny weight seed
IDS_SEED = 11  # input ids: torch.randint(3, 101, (24,), Generator().manual_seed(IDS_SEED))
N_TOKENS = 24


def input_ids() -> list[int]:
    return torch.randint(3, 101, (N_TOKENS,), generator=torch.Generator().manual_seed(IDS_SEED)).tolist()


def lxt_relevance(model, ids: list[int], position: int, token_id: int) -> tuple[list[float], float]:
    emb = model.get_input_embeddings()(torch.tensor([ids])).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, use_cache=False).logits
    logit = logits[0, position, token_id]
    logit.backward()
    return (emb * emb.grad).sum(-1)[0].detach().tolist(), float(logit.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lxt", required=True, help="directory holding LXT main's lxt/ package")
    ap.add_argument("--commit", required=True, help="LXT main's commit (recorded)")
    ap.add_argument("--out", type=Path, help="artifact JSON to write")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(args.lxt).resolve()))
    sys.path.insert(0, str(ROOT / "tests"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import lxt
        from lxt.efficient import monkey_patch
        from lxt.efficient.models import qwen3_moe as lxt_qwen3_moe
    import transformers
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    from explicit_reference import explicit_forward, explicit_relevance
    from tiny_models import save_tiny

    if not str(Path(lxt.__file__).resolve()).startswith(str(Path(args.lxt).resolve())):
        raise SystemExit(f"imported lxt from {lxt.__file__}, not from {args.lxt}")
    ids = input_ids()
    with tempfile.TemporaryDirectory() as tmp:
        save_tiny("qwen3_moe", tmp, seed=SEED)
        model = modeling_qwen3_moe.Qwen3MoeForCausalLM.from_pretrained(
            tmp, attn_implementation="eager", experts_implementation="eager", dtype=torch.float64)
    model.eval()
    experts = model.model.layers[0].mlp.experts
    layout = f"{type(experts).__name__}.gate_up_proj {tuple(experts.gate_up_proj.shape)}"

    fw = explicit_forward(model, ids)
    T = len(ids)
    cases = [(T - 1, int(fw["logits"][T - 1].argmax())), (15, int(fw["logits"][15].argmax()))]
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits[0]
    forward_diff = float((hf_logits - fw["logits"]).abs().max())

    monkey_patch(modeling_qwen3_moe, lxt_qwen3_moe.attnLRP, verbose=False)
    results = []
    for position, token_id in cases:
        lxt_rel, logit = lxt_relevance(model, ids, position, token_id)
        ref = explicit_relevance(model, ids, [position], [token_id], mode="attnlrp")
        ref_rel = ref["token_relevance"].tolist()
        diff = max(abs(a - b) for a, b in zip(lxt_rel, ref_rel))
        scale = max(abs(b) for b in ref_rel)
        results.append(dict(
            target_position=position, target_token_id=token_id, target_logit=logit,
            lxt_relevance=lxt_rel, reference_relevance=ref_rel,
            max_abs_diff=diff, max_rel_diff=diff / scale,
            reference_softmax_absorbed=float(ref["softmax_absorbed"].sum()),
            reference_router_absorbed=float(ref["router_absorbed"].sum()),
        ))
        print(f"target ({position}, {token_id}) logit {logit:.6f}: max |LXT - reference| {diff:.3e} "
              f"(relative to max |reference| {diff / scale:.3e}); sum LXT {sum(lxt_rel):.6f}, "
              f"sum reference {sum(ref_rel):.6f}")
    out = dict(
        what="token relevance of LXT main's efficient AttnLRP (qwen3_moe rules) on the tiny Qwen3-MoE",
        lxt_commit=args.commit, lxt_source="github.com/rachtibat/LRP-eXplains-Transformers (main)",
        transformers=transformers.__version__, torch=torch.__version__, dtype="float64",
        model=dict(recipe="tests/tiny_models.py save_tiny('qwen3_moe', dir, seed=0), loaded with "
                          "Qwen3MoeForCausalLM.from_pretrained(dir, attn_implementation='eager', experts_implementation='eager', "
                          "dtype=torch.float64)", family="qwen3_moe", seed=SEED, experts_layout=layout),
        input_ids=ids, input_ids_recipe=f"torch.randint(3, 101, ({N_TOKENS},), "
                                         f"generator=torch.Generator().manual_seed({IDS_SEED}))",
        forward_max_abs_diff_hf_vs_reference=forward_diff, cases=results,
    )
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
