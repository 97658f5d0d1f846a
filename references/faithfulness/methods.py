"""Attribution methods compared by the benchmark. Each gives one relevance value per token
(position 0..T-1) for the target logit at the last position.

* PA-LRP (one engine pass, mode ``pa-lrp``) gives the token part R_tok (T,) and the positional
  parts R_cos, R_sin (L, T); ``combine`` makes the variants (combined, token-only,
  position-only).
* ``attnlrp`` / ``cp-lrp``: our engine's other modes (token relevance).
* ``lxt-attnlrp``: LXT's AttnLRP in its own environment (``lxt_worker.py``), run beforehand.
* ``grad-x-input``: plain gradient × input embedding, summed over the hidden dim.
* ``integrated-gradients``: Captum's IntegratedGradients on the input embeddings, baseline =
  the neutral token's embedding at every position (what flipping inserts), summed over dim.
* ``attention-last``: last layer's attention of the last position, mean over heads.
* ``attention-rollout``: Abnar & Zuidema (2020): per layer 0.5·mean-head attention + 0.5·I,
  rows renormalised, multiplied through the layers; the last position's row.
* ``random``: uniform noise, seeded per case.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from vllm_pelrp.assemble import DEFAULT_COMBINATION as LIBRARY_DEFAULT
from vllm_pelrp.assemble import (
    COMBINATIONS as LIBRARY_COMBINATIONS,
    PAPER_COMBINATION,
    combination_rule,
    combine_by_rule,
)
from vllm_pelrp.engine.backward import LogitSeeds, relevance_from_input_ids

from .tasks import Case

def combination_label(name: str) -> str:
    """The library's combination name ("abs-single", "abs-single-w0.25") as the benchmark shows
    it ("pa-lrp[abs,single]", "pa-lrp[abs,single,w=0.25]")."""
    signed, per_part, weight = combination_rule(name)
    label = f"pa-lrp[{'signed' if signed else 'abs'},{'per-part' if per_part else 'single'}"
    return label + (f",w={weight:g}]" if weight != 1.0 else "]")


# The library's named ways to combine token and positional relevance (assemble.COMBINATIONS),
# under the benchmark's labels. signed: a layer's cos (or sin) part keeps its sign; abs: |.| per
# layer and per cos/sin (the paper). single: one normalisation of the sum (paper --single-norm);
# per-part: the token part, every layer's cos and sin part, and the positional sum are each
# max-normalised first (the paper without --single-norm); w: the positional part's weight.
COMBINATIONS = {combination_label(name): name for name in LIBRARY_COMBINATIONS}
PAPER_DEFAULT = combination_label(PAPER_COMBINATION)  # the paper's code
# The library's default (the study's dev winner, docs/faithfulness.md); the CI check uses it.
DEFAULT_COMBINATION = combination_label(LIBRARY_DEFAULT)


def combine(token: np.ndarray, cos: np.ndarray, sin: np.ndarray, signed: bool,
            per_part: bool, weight: float = 1.0) -> np.ndarray:
    """Combined relevance, max-normalised: the library's own rule (``combine_by_rule``)."""
    components = [*torch.from_numpy(cos), *torch.from_numpy(sin)]
    return combine_by_rule(torch.from_numpy(token), components, signed, per_part, weight).numpy()


def token_only(token: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """PA-LRP's token part alone: R_tok."""
    return token


def position_only(token: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """PA-LRP's positional part alone: Σ_l |R_cos,l| + |R_sin,l|."""
    return np.abs(cos).sum(0) + np.abs(sin).sum(0)


def _combination(signed: bool, per_part: bool, weight: float = 1.0) -> Callable[..., np.ndarray]:
    return lambda token, cos, sin: combine(token, cos, sin, signed, per_part, weight)


# The candidates for the default (the study's dev stage): name -> f(token, cos, sin) -> (T,): the
# library's combinations, the token part alone, and a half weight on the paper's positional sum.
# The weighted variants came from the first dev numbers: Σ_l |R_cos,l| + |R_sin,l| is about 3x the
# token part in total (SmolLM2), so the paper's sum is mostly positional magnitude.
CANDIDATES: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    **{label: _combination(*combination_rule(name)) for label, name in COMBINATIONS.items()},
    "pa-lrp token-only": token_only,
    "pa-lrp[abs,single,w=0.5]": _combination(False, False, 0.5),
}


def pa_lrp_variants(token: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> dict[str, np.ndarray]:
    out = {name: fn(token, cos, sin) for name, fn in CANDIDATES.items()}
    out["pa-lrp position-only"] = position_only(token, cos, sin)
    return out


class Methods:
    """Runs the in-process methods on one model (an ``Explainer``)."""

    def __init__(self, explainer: Any, neutral_id: int, ig_steps: int = 16, seed: int = 0) -> None:
        self.ex = explainer
        self.model = explainer.hf_model
        self.weights = explainer.weights
        self.neutral_id = neutral_id
        self.ig_steps = ig_steps
        self.seed = seed

    # ---- LRP engine ------------------------------------------------------------------------
    def engine(self, case: Case, mode: str):
        seeds = LogitSeeds.from_rows([[(case.target_position, case.target_id)]])
        ids = torch.tensor(case.input_ids, device=self.weights.device)
        result = relevance_from_input_ids(self.weights, ids, seeds, mode)
        token = result.token[0].double().cpu().numpy()
        cos = result.positional_cos[0].double().cpu().numpy()
        sin = result.positional_sin[0].double().cpu().numpy()
        return token, cos, sin

    def pa_lrp(self, case: Case) -> dict[str, np.ndarray]:
        return pa_lrp_variants(*self.engine(case, "pa-lrp"))

    def attnlrp(self, case: Case) -> np.ndarray:
        return self.engine(case, "attnlrp")[0]

    def cp_lrp(self, case: Case) -> np.ndarray:
        return self.engine(case, "cp-lrp")[0]

    # ---- gradients -------------------------------------------------------------------------
    def _embeddings(self, ids: list[int]) -> torch.Tensor:
        table = self.model.get_input_embeddings()
        return table(torch.tensor([ids], device=table.weight.device)).detach()

    def _target_logit(self, embeds: torch.Tensor, target_id: int) -> torch.Tensor:
        return self.model(inputs_embeds=embeds, use_cache=False, logits_to_keep=1).logits[:, -1, target_id]

    def grad_x_input(self, case: Case) -> np.ndarray:
        embeds = self._embeddings(case.input_ids).requires_grad_(True)
        with torch.enable_grad():
            self._target_logit(embeds, case.target_id).sum().backward()
        return (embeds * embeds.grad).sum(-1)[0].detach().double().cpu().numpy()

    def integrated_gradients(self, case: Case) -> np.ndarray:
        from captum.attr import IntegratedGradients

        embeds = self._embeddings(case.input_ids)
        baseline = self._embeddings([self.neutral_id] * len(case.input_ids))
        ig = IntegratedGradients(lambda e: self._target_logit(e, case.target_id))
        with torch.enable_grad():
            attributions = ig.attribute(embeds, baselines=baseline, n_steps=self.ig_steps,
                                        internal_batch_size=self.ig_steps)
        return attributions.sum(-1)[0].detach().double().cpu().numpy()

    # ---- attention -------------------------------------------------------------------------
    @torch.no_grad()
    def attention_maps(self, case: Case) -> list[torch.Tensor]:
        """Per layer (heads, T, T) attention probabilities (eager attention for this call)."""
        config = self.model.config
        previous = config._attn_implementation
        try:
            self.model.set_attn_implementation("eager")
            out = self.model(torch.tensor([case.input_ids]), output_attentions=True, use_cache=False,
                             logits_to_keep=1)
        finally:
            self.model.set_attn_implementation(previous)
        return [a[0].float() for a in out.attentions]

    def attention_last(self, case: Case) -> np.ndarray:
        return self.attention_maps(case)[-1].mean(0)[-1].double().numpy()

    def attention_rollout(self, case: Case) -> np.ndarray:
        maps = self.attention_maps(case)
        length = maps[0].shape[-1]
        eye = torch.eye(length)
        rollout = eye
        for attention in maps:
            a = 0.5 * attention.mean(0) + 0.5 * eye
            a = a / a.sum(-1, keepdim=True)
            rollout = a @ rollout
        return rollout[-1].double().numpy()

    # ---- random ----------------------------------------------------------------------------
    def random(self, case: Case) -> np.ndarray:
        key = sum(ord(c) * (i + 1) for i, c in enumerate(case.item_id))
        return np.random.default_rng([self.seed, key]).random(len(case.input_ids))

    # ---- registry --------------------------------------------------------------------------
    def single(self) -> dict[str, Callable[[Case], np.ndarray]]:
        """Methods that give one relevance vector (PA-LRP variants come from ``pa_lrp``)."""
        return {
            "attnlrp (ours)": self.attnlrp,
            "cp-lrp (ours)": self.cp_lrp,
            "grad-x-input": self.grad_x_input,
            "integrated-gradients": self.integrated_gradients,
            "attention-last": self.attention_last,
            "attention-rollout": self.attention_rollout,
            "random": self.random,
        }


def timed(fn: Callable, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start
