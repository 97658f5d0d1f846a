"""``load_explainer`` and ``Explainer``: tokenisation, targets and ``Explanation`` assembly around the
engine. The vLLM plugin calls the same ``Explainer.explanation_from_relevance`` path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .adapters.hf import check_architecture, weights_from_hf
from .engine.backward import (
    MODES,
    LogitSeeds,
    RelevanceResult,
    final_logits,
    forward_layer_inputs,
    relevance_from_layer_inputs,
)
from .engine.spec import ModelWeights
from .explanation import (
    Conservation,
    Explanation,
    LayerPositionalRelevance,
    RelevanceRow,
    ResolvedTarget,
    SpanTarget,
    Token,
    TokenIdTarget,
)

# Per-token targets run as one batched backward; rows beyond this need an explicit, larger cap
# (memory grows linearly in the number of rows: rows × T × hidden fp32 per layer).
MAX_PER_TOKEN_ROWS = 64

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGET_HELP = "'next', 'completion', 'per_token', {'span': [i, j]} or {'token_id': k}"


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model_path(model: str | None) -> Path:
    """Local checkpoint directory for ``model`` (None: the embedded default model)."""
    if model is None:
        from .default_model import ensure_default_checkpoint

        return ensure_default_checkpoint()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {model!r} is not a local directory; give a Hugging Face LLaMA checkpoint "
            "directory (config.json + safetensors + tokenizer), or None for the embedded default "
            "model. Nothing is downloaded from a hub."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint")
    return path


def load_explainer(
    model: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> "Explainer":
    """Load a LLaMA-family checkpoint (None: embedded SmolLM2-135M-Instruct) for explanation."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    check_architecture(config)
    torch_dtype = _as_dtype(dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    hf_model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    name = "SmolLM2-135M-Instruct" if model is None else path.name
    return Explainer(hf_model, tokenizer, name=name)


def _parse_target(target: Any) -> str | SpanTarget | TokenIdTarget:
    if isinstance(target, (SpanTarget, TokenIdTarget)):
        return target
    if target in ("next", "completion", "per_token"):
        return target
    if isinstance(target, dict):
        if set(target) == {"span"}:
            return SpanTarget(span=tuple(target["span"]))
        if set(target) == {"token_id"}:
            return TokenIdTarget(token_id=int(target["token_id"]))
    raise ValueError(f"unknown target {target!r}; allowed: {TARGET_HELP}")


class Explainer:
    """A model ready to explain: ``explain`` returns an ``Explanation``."""

    def __init__(self, hf_model: Any, tokenizer: Any, name: str = "model") -> None:
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.name = name
        self.weights: ModelWeights = weights_from_hf(hf_model)

    # ---- tokens ---------------------------------------------------------------------------
    def encode_prompt(
        self,
        text: str | None = None,
        *,
        messages: Sequence[dict] | None = None,
        chat: bool | None = None,
    ) -> list[int]:
        """Prompt token ids. ``messages`` always use the chat template; ``text`` uses it when
        ``chat`` is True, or when ``chat`` is None and the tokenizer has one."""
        if (text is None) == (messages is None):
            raise ValueError("give exactly one of text or messages")
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if messages is None and (chat is True or (chat is None and has_template)):
            messages = [{"role": "user", "content": text}]
        if messages is not None:
            if not has_template:
                raise ValueError("this tokenizer has no chat template; pass text with chat=False")
            ids = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        return [int(i) for i in self.tokenizer(text)["input_ids"]]

    def encode_completion(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 32) -> list[int]:
        """Greedy completion token ids (stops at EOS; the EOS token is kept)."""
        if max_new_tokens <= 0:
            return []
        device = self.weights.device
        input_ids = torch.tensor([list(prompt_ids)], device=device)
        output = self.hf_model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
        )
        return [int(i) for i in output[0, input_ids.shape[1] :]]

    def tokens(self, ids: Sequence[int], prompt_length: int) -> tuple[str, list[Token]]:
        """Decoded text and each token's text with character offsets into it."""
        pieces: list[str] = []
        window = 6  # earlier tokens decoded alongside, so leading spaces and byte merges are right
        for index in range(len(ids)):
            context = list(ids[max(0, index - window) : index])
            before = self.tokenizer.decode(context) if context else ""
            both = self.tokenizer.decode(context + [ids[index]])
            if both.startswith(before):
                pieces.append(both[len(before) :])
            else:  # a multi-byte character split across tokens: fall back to the lone token
                pieces.append(self.tokenizer.decode([ids[index]]))
        tokens, offset = [], 0
        for index, (token_id, piece) in enumerate(zip(ids, pieces)):
            role = "prompt" if index < prompt_length else "completion"
            tokens.append(
                Token(index=index, id=int(token_id), text=piece, start=offset,
                      end=offset + len(piece), role=role)
            )
            offset += len(piece)
        return "".join(pieces), tokens

    # ---- explanation ----------------------------------------------------------------------
    def explain(
        self,
        text: str | None = None,
        *,
        input_ids: Sequence[int] | None = None,
        completion: str | Sequence[int] | None = None,
        messages: Sequence[dict] | None = None,
        target: Any = "next",
        mode: str = "pa-lrp",
        per_layer: bool = False,
        max_per_token_rows: int = MAX_PER_TOKEN_ROWS,
        layer_inputs: Sequence[torch.Tensor] | None = None,
    ) -> Explanation:
        """Explain a target logit of the model on prompt (+ completion).

        The prompt is ``text`` (tokenised as is), ``messages`` (chat template with generation
        prompt) or ``input_ids``. ``completion`` (text or ids) follows the prompt. ``target``:
        'next' (argmax next token after the whole input), 'completion' (sum of the completion
        tokens' logits), 'per_token' (one row per completion token, batched), {'span': [i, j]}
        (completion tokens i..j-1) or {'token_id': k} (logit of k at the last position).
        ``layer_inputs`` (saved residual stream, e.g. recorded by vLLM) skips the forward pass.
        """
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
        given = [x is not None for x in (text, input_ids, messages)]
        if sum(given) != 1:
            raise ValueError("give exactly one of text, input_ids or messages as the prompt")
        if input_ids is not None:
            prompt_ids = [int(i) for i in input_ids]
        elif messages is not None:
            prompt_ids = self.encode_prompt(messages=messages)
        else:
            prompt_ids = self.encode_prompt(text, chat=False)
        if isinstance(completion, str):
            completion_ids = self.encode_completion(completion)
        else:
            completion_ids = [int(i) for i in (completion or [])]
        ids = prompt_ids + completion_ids
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.weights.spec.vocab_size
        if any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"token ids must lie in [0, {vocab})")
        device = self.weights.device
        input_tensor = torch.tensor(ids, device=device)
        positions = torch.arange(len(ids), device=device)
        last_logits = None
        if layer_inputs is None:
            layer_inputs, final_hidden = forward_layer_inputs(self.weights, input_tensor, positions)
            last_logits = final_logits(self.weights, final_hidden[-1:])[0]
        parsed = _parse_target(target)
        targets = self._resolve_target(
            parsed, len(prompt_ids), completion_ids, last_logits, layer_inputs, max_per_token_rows
        )
        seeds = LogitSeeds.from_rows([list(zip(t.positions, t.token_ids)) for t in targets])
        result = relevance_from_layer_inputs(self.weights, layer_inputs, positions, seeds, mode)
        return self.explanation_from_relevance(
            result, targets, ids, len(prompt_ids), mode, per_layer, per_token=parsed == "per_token"
        )

    def _resolve_target(
        self,
        target: str | SpanTarget | TokenIdTarget,
        prompt_length: int,
        completion_ids: list[int],
        last_logits: torch.Tensor | None,
        layer_inputs: Sequence[torch.Tensor],
        max_rows: int,
    ) -> list[ResolvedTarget]:
        last = prompt_length + len(completion_ids) - 1
        count = len(completion_ids)
        if target == "next":
            if last_logits is None:
                from .engine.backward import layer_forward, make_rope

                rope = make_rope(self.weights.spec, torch.arange(last + 1, device=self.weights.device),
                                 self.weights.dtype)
                with torch.no_grad():
                    final_hidden, _ = layer_forward(self.weights, self.weights.layers[-1],
                                                    layer_inputs[-1], rope, keep_cache=False)
                last_logits = final_logits(self.weights, final_hidden[-1:])[0]
            token_id = int(last_logits.argmax())
            return [ResolvedTarget(kind="next", positions=[last], token_ids=[token_id],
                                   description=f"argmax next token {token_id} after position {last}")]
        if isinstance(target, TokenIdTarget):
            if not 0 <= target.token_id < self.weights.spec.vocab_size:
                raise ValueError(
                    f"token_id {target.token_id} out of range [0, {self.weights.spec.vocab_size})"
                )
            return [ResolvedTarget(kind="token_id", positions=[last], token_ids=[target.token_id],
                                   description=f"logit of token {target.token_id} at position {last}")]
        if count == 0:
            raise ValueError(f"target {target!r} needs a completion; none was given")
        if target == "per_token":
            if count > max_rows:
                raise ValueError(
                    f"per_token target: {count} completion tokens exceed the cap of {max_rows} "
                    "rows per explanation; use a span, or raise max_per_token_rows"
                )
            return [self._span_target(k, k + 1, prompt_length, completion_ids, "per_token_row")
                    for k in range(count)]
        if target == "completion":
            return [self._span_target(0, count, prompt_length, completion_ids, "completion")]
        start, end = target.span
        if not (0 <= start < end <= count):
            raise ValueError(
                f"span [{start}, {end}) is out of range: the completion has {count} tokens, "
                f"so 0 <= i < j <= {count} is allowed"
            )
        return [self._span_target(start, end, prompt_length, completion_ids, "span")]

    @staticmethod
    def _span_target(start, end, prompt_length, completion_ids, kind) -> ResolvedTarget:
        positions = [prompt_length - 1 + k for k in range(start, end)]
        token_ids = completion_ids[start:end]
        description = (
            f"sum of the logits of completion tokens [{start}, {end})"
            if end - start > 1 else f"logit of completion token {start} (id {token_ids[0]})"
        )
        return ResolvedTarget(kind=kind, positions=positions, token_ids=token_ids,
                              span=(start, end), description=description)

    def explanation_from_relevance(
        self,
        result: RelevanceResult,
        targets: list[ResolvedTarget],
        ids: Sequence[int],
        prompt_length: int,
        mode: str,
        per_layer: bool,
        per_token: bool = False,
    ) -> Explanation:
        """Assemble the wire-format ``Explanation`` from the engine's raw relevance."""
        text, tokens = self.tokens(ids, prompt_length)
        rows = [
            _row(target, result.token[b], result.positional_cos[b], result.positional_sin[b],
                 float(result.target_logit[b]), float(result.softmax_absorbed[b].sum()), per_layer)
            for b, target in enumerate(targets)
        ]
        if per_token:
            count = len(ids) - prompt_length
            summary = _row(
                self._span_target(0, count, prompt_length, list(ids[prompt_length:]), "completion"),
                result.token.sum(0), result.positional_cos.sum(0), result.positional_sin.sum(0),
                float(result.target_logit.sum()), float(result.softmax_absorbed.sum()), per_layer,
            )
        else:
            summary, rows = rows[0], None
        return Explanation(
            **summary.model_dump(), model=self.name, mode=mode, text=text,
            prompt_length=prompt_length, tokens=tokens, rows=rows,
        )


def combine_relevance(token: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The paper's single-norm combination: (R_tok + Σ_l |R_cos,l| + |R_sin,l|) / max_t |·|."""
    combined = token + cos.abs().sum(0) + sin.abs().sum(0)
    peak = combined.abs().max()
    return combined / peak if peak > 0 else combined


def _row(target, token, cos, sin, target_logit, absorbed, per_layer) -> RelevanceRow:
    token_sum = float(token.sum())
    positional_sum = float((cos + sin).sum())
    scale = max(abs(target_logit), 1e-12)
    conservation = Conservation(
        target_logit=target_logit,
        token_sum=token_sum,
        positional_sum=positional_sum,
        relative_error=abs(token_sum + positional_sum - target_logit) / scale,
        softmax_absorbed=absorbed,
        relative_error_excluding_softmax=abs(token_sum + positional_sum + absorbed - target_logit)
        / scale,
    )
    layers = None
    if per_layer:
        layers = [
            LayerPositionalRelevance(layer=index, cos=cos[index].tolist(), sin=sin[index].tolist())
            for index in range(cos.shape[0])
        ]
    return RelevanceRow(
        target=target,
        target_logit=target_logit,
        token_relevance=token.tolist(),
        positional_relevance=(cos + sin).sum(0).tolist(),
        positional_relevance_per_layer=layers,
        combined_relevance=combine_relevance(token, cos, sin).tolist(),
        conservation=conservation,
    )
