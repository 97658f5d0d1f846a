"""The faithfulness runner's report pieces that the decoder tasks (run.py) and the retrieval
task (retrieval.py) share: numbers, the timing table and the flipping curves' plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from references.faithfulness.protocol import CURVES, FRACTIONS

PALRP = "PA-LRP"  # drawn bold in the plots
RANDOM = "random"  # drawn dashed
TIMING_REFERENCE = "grad-x-input"  # timing ratios are relative to this


def fmt(mean: float, se: float | None = None, digits: int = 3) -> str:
    if se is None or not np.isfinite(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def timing_table(times: dict[str, list[float]]) -> list[str]:
    ref = float(np.mean(times[TIMING_REFERENCE])) if TIMING_REFERENCE in times else float("nan")
    lines = [f"| method | s / explanation | ratio to {TIMING_REFERENCE} |", "|---|---|---|"]
    for m in sorted(times, key=lambda m: np.mean(times[m])):
        t = float(np.mean(times[m]))
        lines.append(f"| {m} | {t:.3f} | {t / ref:.2f} |")
    return lines


def plot(summaries: dict[str, dict[str, dict]], path: Path, title: str, *, ylabel: str,
         flipped: str = "tokens", reading: str | None = None) -> None:
    """One row of the four curves per entry of ``summaries`` (a task or a split: method ->
    summary with ``curves[curve]``, or ``curves[curve][reading]`` when the curves have several
    readings); ``flipped`` names what the x axis counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(summaries)
    fig, axes = plt.subplots(len(rows), 4, figsize=(20, 4.6 * len(rows)), squeeze=False)
    names = sorted({m for r in rows for m in summaries[r]})
    cmap = plt.get_cmap("tab20")
    colours = {m: cmap(i % 20) for i, m in enumerate(names)}
    for row, label in enumerate(rows):
        for col, curve in enumerate(CURVES):
            ax = axes[row][col]
            for m in names:
                if m not in summaries[label]:
                    continue
                values = summaries[label][m]["curves"][curve]
                bold = m == PALRP
                ax.plot(FRACTIONS, values if reading is None else values[reading], label=m,
                        color="black" if bold else colours[m], lw=2.6 if bold else 1.2,
                        ls="--" if m == RANDOM else "-")
            ax.set_title(f"{label}: {curve.replace('_', ' ')}")
            ax.set_xlabel(f"fraction of {flipped} " + ("replaced" if "deletion" in curve else "restored"))
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
