"""The PA-LRP paper's patch-perturbation test on a small ViT trained here, on scikit-learn's
bundled handwritten digits (no ViT weights ship offline, so this is a small model trained on
this machine, not ImageNet).

    .venv/bin/python bench/quality/vision/perturbation.py [--epochs 40] [--seed 0]

1. **Model.** ``ViTForImageClassification`` with a learned position table: 8×8 digits
   upscaled to 16×16 (each pixel 2×2), 4×4 patches (16 of them and the class token), hidden 64,
   4 layers, 4 heads. Trained with a fixed seed on 80% of the 1,797 digits (stratified), in
   about a minute on two CPU cores; the other 20% (360 images) are held out.
2. **Explanations** of each held-out image's predicted class, per patch:
   - ``pa-lrp``: the patch's pixels' relevance plus its position's relevance clamped at ≥ 0
     (the paper's vision code: positional relevance spread over the patch, clamped);
   - ``pa-lrp pixels``: the pixels' part alone (no positional relevance), to tell the two
     parts' effects apart;
   - ``attnlrp``: AttnLRP's whole R(x) at the patch (pixels and position together);
   - ``cp-lrp``: the same with the attention probabilities held constant;
   - ``gradxinput``: plain autograd, Σ pixel ⊙ ∂logit/∂pixel over the patch;
   - ``random``: a random order (seeded).
3. **Perturbation**, as the paper (after Chefer et al.): remove the patches one at a time (set
   to 0, the training mean) in order of relevance, most relevant first (positive: the model's
   confidence should fall fast, lower is better) or least relevant first (negative: it should
   hold, higher is better). Per image the area under the curve of the explained class's
   probability over 0-15 patches removed; also top-1 accuracy against the true labels.
4. **Statistics:** per-image paired differences of PA-LRP against each other method, their
   mean and standard error (n = 360).

Writes ``bench/quality/vision/results/perturbation.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from vllm_pelrp.engine.driver import relevance, run_forward  # noqa: E402
from vllm_pelrp.models.vit import vit_from_hf, vit_seed  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("pa-lrp", "pa-lrp pixels", "attnlrp", "cp-lrp", "gradxinput", "random")
PATCHES = 16


def digits(seed: int):
    """(train images, train labels, test images, test labels): (N, 1, 16, 16) standardised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    images = images.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, None]  # 16×16
    labels = torch.tensor(data.target)
    train, test = train_test_split(range(len(labels)), test_size=0.2, random_state=seed,
                                   stratify=data.target)
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std  # removing a patch (0) is the training mean
    return images[train], labels[train], images[test], labels[test]


def train(images, labels, epochs: int, seed: int):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=128, image_size=16, patch_size=4, num_channels=1,
                       num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6)
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    steps = epochs * math.ceil(len(labels) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), 64):
            batch = order[start:start + 64]
            loss = torch.nn.functional.cross_entropy(
                model(pixel_values=images[batch]).logits, labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def patch_scores(model, vision, image: torch.Tensor, label: int, method: str,
                 generator: torch.Generator) -> torch.Tensor:
    """One image's per-patch scores (16,) for ``method``."""
    if method == "random":
        return torch.rand(PATCHES, generator=generator)
    if method == "gradxinput":
        pixels = image.clone().requires_grad_(True)
        model(pixel_values=pixels[None]).logits[0, label].backward()
        grid = (pixels * pixels.grad).detach()[0]
        return grid.unfold(0, 4, 4).unfold(1, 4, 4).sum((-1, -2)).flatten()
    mode = "pa-lrp" if method == "pa-lrp pixels" else method
    forward = run_forward(vision.blocks, image)
    seed = vit_seed(vision, forward.final_hidden, {"label": label})
    result = relevance(vision.blocks, forward.layer_inputs, forward.positions, seed, mode,
                       forward=forward)
    scores = result.token[0, 1:]
    if method == "pa-lrp":
        scores = scores + result.position_embedding[0, 1:].clamp_min(0)
    return scores


@torch.no_grad()
def curves(model, images, explained, labels, orders) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the explained class's probability and top-1 correctness with the first k
    patches of its order removed, k = 0…15: (N, 16) each."""
    probs, correct = [], []
    for removed in range(PATCHES):
        masked = images.clone()
        for n, order in enumerate(orders):
            for patch in order[:removed].tolist():
                row, column = divmod(patch, 4)
                masked[n, :, 4 * row:4 * row + 4, 4 * column:4 * column + 4] = 0
        logits = model(pixel_values=masked).logits
        probs.append(logits.softmax(-1).gather(1, explained[:, None])[:, 0])
        correct.append((logits.argmax(-1) == labels).float())
    return torch.stack(probs, 1), torch.stack(correct, 1)


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a - b).double()
    return float(diff.mean()), float(diff.std() / math.sqrt(len(diff)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=RESULTS / "perturbation.json")
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    console = Console()
    started = time.perf_counter()
    train_x, train_y, test_x, test_y = digits(args.seed)
    model = train(train_x, train_y, args.epochs, args.seed)
    trained = time.perf_counter() - started
    with torch.no_grad():
        predicted = model(pixel_values=test_x).logits.argmax(-1)
    accuracy = float((predicted == test_y).float().mean())
    console.print(f"trained in {trained:.0f} s; held-out accuracy {accuracy:.4f} "
                  f"({len(test_y)} images)")
    vision = vit_from_hf(model)
    generator = torch.Generator().manual_seed(args.seed)
    metrics = {}
    for method in METHODS:
        scores = torch.stack([patch_scores(model, vision, image, int(label), method, generator)
                              for image, label in zip(test_x, predicted)])
        for kind, descending in (("positive", True), ("negative", False)):
            orders = scores.argsort(-1, descending=descending)
            probs, correct = curves(model, test_x, predicted, test_y, orders)
            metrics[(method, kind)] = (probs.mean(1), correct.mean(1))
    table = Table(title="Patch perturbation, area under the curve (mean over 360 held-out "
                        "images; positive: lower is better, negative: higher is better)")
    for column in ("method", "positive, probability", "positive, accuracy",
                   "negative, probability", "negative, accuracy"):
        table.add_column(column)
    summary = {}
    for method in METHODS:
        row = {f"{kind}_{name}": float(values.mean())
               for kind in ("positive", "negative")
               for name, values in zip(("probability", "accuracy"), metrics[(method, kind)])}
        summary[method] = row
        table.add_row(method, *(f"{row[key]:.4f}" for key in (
            "positive_probability", "positive_accuracy", "negative_probability",
            "negative_accuracy")))
    console.print(table)
    differences = Table(title="PA-LRP minus each method, per-image paired differences of the "
                              "probability AUC (mean ± standard error)")
    differences.add_column("against")
    differences.add_column("positive (negative is better)")
    differences.add_column("negative (positive is better)")
    paired_results = {}
    for method in METHODS[1:]:
        positive = paired(metrics[("pa-lrp", "positive")][0], metrics[(method, "positive")][0])
        negative = paired(metrics[("pa-lrp", "negative")][0], metrics[(method, "negative")][0])
        paired_results[method] = {"positive": positive, "negative": negative}
        differences.add_row(method, f"{positive[0]:+.4f} ± {positive[1]:.4f}",
                            f"{negative[0]:+.4f} ± {negative[1]:.4f}")
    console.print(differences)
    seconds = time.perf_counter() - started
    console.print(f"total {seconds:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "command": " ".join(["bench/quality/vision/perturbation.py", *sys.argv[1:]]),
        "epochs": args.epochs, "seed": args.seed, "held_out_images": len(test_y),
        "held_out_accuracy": accuracy, "train_seconds": trained, "total_seconds": seconds,
        "auc": summary,
        "pa_lrp_minus": {m: {k: {"mean": v[0], "standard_error": v[1]} for k, v in d.items()}
                         for m, d in paired_results.items()},
        "torch_threads": torch.get_num_threads(),
    }, indent=2) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
