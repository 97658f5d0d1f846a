#!/usr/bin/env python3
"""Independent AttnLRP reference computed with LXT (``lxt`` on PyPI), efficient mode.

Runs in its own virtual environment (see ``bench/lxt_env.sh``), because lxt 2.1
needs transformers 4.x::

    bash bench/lxt_env.sh
    .venv-lxt/bin/python bench/lxt_reference.py --model DIR \\
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
(patching is process-global: one family per process); ``inputs_embeds =
model.get_input_embeddings()(input_ids)`` as a leaf that requires grad (for Gemma 3 that
module already multiplies by sqrt(hidden_size), and the model does not scale inputs_embeds
again); ``logit = logits[0, target_position, target_token_id]``; ``logit.backward()``
(seed 1); token relevance = ``(inputs_embeds * inputs_embeds.grad).sum(-1)``.

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
}
FAMILIES = {
    "llama": ("transformers.models.llama.modeling_llama", "LlamaForCausalLM", "LlamaConfig"),
    "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM", "Qwen2Config"),
    "qwen3": ("transformers.models.qwen3.modeling_qwen3", "Qwen3ForCausalLM", "Qwen3Config"),
    "gemma3": ("transformers.models.gemma3.modeling_gemma3", "Gemma3ForCausalLM",
               "Gemma3TextConfig"),
}


def family_of(model_dir: str) -> str:
    """Model family of a checkpoint, from config.json's ``architectures``."""
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise SystemExit(f"{model_dir}: architectures {archs} not supported by lxt_reference.py "
                     f"(supported: {', '.join(ARCHITECTURES)})")


def _import_lxt(family: str = "llama"):
    """``(lxt.efficient.monkey_patch, lxt.efficient.models.<family>)``."""
    _stub_torchvision()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "'zennit' library is not available"
        from lxt.efficient import monkey_patch
        rules = importlib.import_module(f"lxt.efficient.models.{family}")
    return monkey_patch, rules


_PATCHED: tuple[str, str] | None = None  # (mode, family)


def apply_patch(mode: str, family: str = "llama") -> None:
    """Patch one family's transformers module globally (once per process).

    As LXT documents: ``monkey_patch(modeling_<family>, lxt.efficient.models.<family>.attnLRP)``
    (``cp_LRP`` for CP-LRP); ``gradient`` patches nothing.
    """
    global _PATCHED
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (one of {', '.join(FAMILIES)})")
    if _PATCHED is not None:
        same = _PATCHED == (mode, family) or _PATCHED[0] == mode == "gradient"
        if not same:
            raise RuntimeError(f"process already patched for {_PATCHED!r}")
        return
    if mode != "gradient":
        modeling = importlib.import_module(FAMILIES[family][0])
        monkey_patch, rules = _import_lxt(family)
        rule_set = {"attnlrp": rules.attnLRP, "cp-lrp": rules.cp_LRP}[mode]
        monkey_patch(modeling, rule_set)
    _PATCHED = (mode, family)


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
    """Load the checkpoint's causal LM (fp32, eager attention) -> (model, config fixes).

    The family comes from config.json's ``architectures``; it must be the patched one.
    """
    import transformers

    family = family_of(model_dir)
    if _PATCHED is not None and _PATCHED[0] != "gradient" and _PATCHED[1] != family:
        raise RuntimeError(f"process patched for {_PATCHED[1]!r}, checkpoint is {family!r}")
    _, model_name, config_name = FAMILIES[family]
    model_cls, config_cls = getattr(transformers, model_name), getattr(transformers, config_name)
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    config = config_cls.from_pretrained(model_dir)
    fixes = _legacy_rope_fixes(config, raw, family)
    model = model_cls.from_pretrained(
        model_dir, config=config, dtype=torch.float32, attn_implementation="eager")
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
                    "ForCausalLM)")
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
    lm_head_tied = (model.lm_head.weight.data_ptr()
                    == model.get_input_embeddings().weight.data_ptr())

    out_cases = []
    for case in spec["cases"]:
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
        "rope_theta": float(cfg.rope_theta),
        "rope_local_base_freq": (float(cfg.rope_local_base_freq)
                                 if getattr(cfg, "rope_local_base_freq", None) else None),
        "rope_scaling": getattr(cfg, "rope_scaling", None),
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
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
