#!/usr/bin/env python3
"""LXT main's torchvision-ViT rules (``lxt.efficient.models.vit_torch.cp_LRP``: CP-LRP in the
attention, the identity rule on GELU, LayerNorm with σ held) on the tiny ViT of
``tests/tiny_vision.py``; writes the pixels' relevance as an artifact that CI (which cannot
fetch LXT) holds the engine's cp-lrp against (``tests/test_engine_vit.py``).

LXT main patches torchvision's ``vision_transformer.nn`` classes, which are ``torch.nn``'s.
torchvision does not import next to this project's CPU torch, so a stand-in module
``torchvision.models.vision_transformer`` whose ``nn`` is ``torch.nn`` is registered before
LXT's ``vit_torch`` is imported: LXT's own rule table is applied, unchanged, to the plain
``torch.nn`` copy of torchvision's ``VisionTransformer`` forward (``tiny_vision.TorchvisionViT``).
LXT's example adds zennit's Gamma rules on Conv2d and Linear; with γ = 0 they are LRP-0, the
plain gradient×input, which is what runs here (no zennit). The model runs in float64; relevance
= pixels ⊙ ∂logit/∂pixels::

    mkdir -p /tmp/lxt_main
    git -C <LRP-eXplains-Transformers clone> archive HEAD lxt | tar -x -C /tmp/lxt_main
    PYTHONPATH=$PWD .venv/bin/python references/lxt_main_vit.py --lxt /tmp/lxt_main \\
        --commit "$(git -C <clone> rev-parse HEAD)" --out tests/artifacts/lxt_main_vit_cp.json
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
LABEL = 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lxt", required=True, help="directory holding LXT main's lxt/ package")
    ap.add_argument("--commit", required=True, help="LXT main's commit (recorded)")
    ap.add_argument("--out", type=Path, help="artifact JSON to write")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.lxt).resolve()))
    sys.path.insert(0, str(ROOT / "tests"))
    import lxt
    import lxt.efficient  # noqa: F401  (and transformers, before the stand-in exists)

    stand_in = types.ModuleType("torchvision.models.vision_transformer")
    stand_in.nn = torch.nn
    for name in ("torchvision", "torchvision.models"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision.models.vision_transformer"] = stand_in
    from lxt.efficient.models.vit_torch import cp_LRP

    from tiny_vision import SEED, image, torchvision_vit

    if not str(Path(lxt.__file__).resolve()).startswith(str(Path(args.lxt).resolve())):
        raise SystemExit(f"imported lxt from {lxt.__file__}, not from {args.lxt}")
    model = torchvision_vit().double()
    with torch.no_grad():
        plain = model(image().double()[None])[0]
    for module_class, patch in cp_LRP.items():  # LXT's monkey_patch, on the classes it names
        patch(module_class)
    pixels = image().double()[None].requires_grad_(True)
    logits = model(pixels)[0]
    logits[LABEL].backward()
    relevance = (pixels * pixels.grad)[0]
    print(f"logit {float(logits[LABEL].detach()):.6f} (unpatched {float(plain[LABEL]):.6f}); "
          f"Σ pixel relevance {float(relevance.sum()):.6f}")
    out = dict(
        what="pixel relevance of LXT main's torchvision-ViT rules (cp_LRP, LRP-0 on conv and "
             "linear layers) on tests/tiny_vision.py's ViT",
        lxt_commit=args.commit, lxt_source="github.com/rachtibat/LRP-eXplains-Transformers (main)",
        torch=torch.__version__, dtype="float64", seed=SEED, label=LABEL,
        logit=float(logits[LABEL].detach()), unpatched_logit=float(plain[LABEL]),
        pixel_relevance=relevance.detach().tolist())
    if args.out:
        args.out.write_text(json.dumps(out) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
