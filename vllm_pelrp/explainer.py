"""``load_explainer`` and ``Explainer``: the offline, in-process way to explain a model.

It loads a checkpoint, tokenises and generates; an explanation runs the same pipeline
(``pipeline.py``: plan, job, compute, assemble) as the vLLM plugin, all in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from . import pipeline, prompts
from .assemble import COMBINATIONS, DEFAULT_COMBINATION, token_spans
from .errors import ExplainInputError, PromptError
from .targets import MAX_PER_TOKEN_ROWS, check_mode
from .engine.additive import AdditiveWeights, encoder_forward
from .engine.heads import ClassifierHead, Pooling, normalized, pool
from .engine.spec import ModelWeights
from .models import SUPPORTED_ARCHITECTURES, architecture_for
from .explanation import Explanation, Token
from .grounding import DEFAULT_GROUNDING_THRESHOLD, SourceSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model_path(model: str | None) -> Path:
    """Local checkpoint directory for ``model``: None is the embedded default model, a shipped
    model's name (``gemma-3-270m``, ``vllm_pelrp.shipped_models``) its converted checkpoint
    (converted on first use), anything else a local directory."""
    from .shipped_models import DEFAULT_MODEL_NAME, shipped_checkpoint, shipped_model_names

    shipped = shipped_checkpoint(DEFAULT_MODEL_NAME if model is None else model)
    if shipped is not None:
        return shipped
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {model!r} is not a local directory; give a Hugging Face checkpoint directory "
            "(config.json + safetensors + tokenizer) of a supported architecture "
            f"({', '.join(SUPPORTED_ARCHITECTURES)}), a shipped model's name "
            f"({', '.join(shipped_model_names())}), or None for the embedded default model. "
            "Nothing is downloaded from a hub."
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint")
    return path


def load_explainer(
    model: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
) -> "Explainer | EncoderExplainer":
    """Load a local checkpoint of a registered architecture (``vllm_pelrp.models``; None: the
    embedded SmolLM2-135M-Instruct) for explanation: an ``Explainer`` for a causal LM (rotary
    decoders, GPT-2), an ``EncoderExplainer`` for a BERT-family encoder (a sentence-transformers
    directory as it is, or a plain checkpoint; a sequence classifier or cross-encoder)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    config = AutoConfig.from_pretrained(path)
    arch = architecture_for(config)
    torch_dtype = _as_dtype(dtype)
    name = path.name  # a shipped model's directory is named after it
    tokenizer = AutoTokenizer.from_pretrained(path)
    if arch.kind == "additive" and not arch.spec(config, 1).causal:
        return EncoderExplainer.from_directory(path, config, tokenizer, torch_dtype, device, name)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    hf_model.requires_grad_(False)
    return Explainer(hf_model, tokenizer, name=name)


class Explainer:
    """A model ready to explain: ``explain`` returns an ``Explanation``."""

    def __init__(self, hf_model: Any, tokenizer: Any, name: str = "model") -> None:
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.name = name
        self.weights: ModelWeights | AdditiveWeights = architecture_for(
            hf_model.config).weights_from_hf(hf_model)

    # ---- tokens ---------------------------------------------------------------------------
    def encode_prompt(
        self,
        text: str | None = None,
        *,
        messages: Sequence[dict] | None = None,
        chat: bool | None = None,
        documents: Sequence[str] | None = None,
    ) -> list[int]:
        """Prompt token ids (``prompts.encode_prompt``): ``messages`` always use the chat
        template; ``text`` uses it when ``chat`` is True, or when ``chat`` is None and the
        tokenizer has one. ``documents`` are rendered into the last user message, or around
        ``text``."""
        return prompts.encode_prompt(self.tokenizer, text, messages=messages, chat=chat,
                                     documents=documents)

    def encode_completion(self, text: str) -> list[int]:
        return prompts.encode_completion(self.tokenizer, text)

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
        return token_spans(self.tokenizer, ids, prompt_length)

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
        combination: str = DEFAULT_COMBINATION,
        documents: Sequence[str] | None = None,
        sources: Sequence[SourceSpec | dict] | None = None,
        grounding_threshold: float = DEFAULT_GROUNDING_THRESHOLD,
        sentences: bool = True,
    ) -> Explanation:
        """Explain a target logit of the model on prompt (+ completion).

        The prompt is ``text`` (tokenised as is), ``messages`` (chat template with generation
        prompt) or ``input_ids``. ``completion`` (text or ids) follows the prompt. ``target``:
        'next' (argmax next token after the whole input), 'completion' (sum of the completion
        tokens' logits), 'per_token' (one row per completion token, batched), {'span': [i, j]}
        (completion tokens i..j-1) or {'token_id': k} (logit of k at the last position).
        ``layer_inputs`` (saved residual stream, e.g. recorded by vLLM) skips the forward pass.
        ``combination`` picks how ``combined_relevance`` is formed (``assemble.COMBINATIONS``).

        Grounding (``explanation.grounding``, None unless sources are declared): ``documents``
        are rendered into the prompt with the documented template (into the last user message
        of ``messages``, or around ``text``) and become sources "document 1"…; ``sources``
        marks parts of the prompt ({'message': i}, {'text': '...'}, {'chars': [a, b]}, each with
        an optional 'name'). Each completion sentence is explained as a span target in the same
        batched backward (``sentences=False`` skips them). ``grounding_threshold`` sets
        ``Grounding.low_grounding``.
        """
        check_mode(mode)
        if combination not in COMBINATIONS:
            raise ExplainInputError(
                f"unknown combination {combination!r}; allowed: {', '.join(COMBINATIONS)}",
                "combination")
        given = [x is not None for x in (text, input_ids, messages)]
        if sum(given) != 1:
            raise PromptError("give exactly one of text, input_ids or messages as the prompt")
        if input_ids is not None:
            prompts.with_documents(None, None, documents)  # raises: documents need a text prompt
            prompt_ids = [int(i) for i in input_ids]
        else:  # the text as it is, messages through the chat template
            text, messages = prompts.with_documents(text, messages, documents)
            prompt_ids = prompts.encode_prompt(self.tokenizer, text, messages=messages,
                                               chat=False)
        completion_ids = prompts.encode_completion(self.tokenizer, completion) \
            if completion is not None and len(completion) else []
        planned = pipeline.plan(prompt_ids, completion_ids, target, tokenizer=self.tokenizer,
                                vocab_size=self.weights.spec.vocab_size, mode=mode,
                                max_per_token_rows=max_per_token_rows, documents=documents,
                                sources=sources, grounding_threshold=grounding_threshold,
                                sentences=sentences,
                                message_contents=prompts.message_contents(messages))
        job = pipeline.job(planned, per_layer=per_layer, combination=combination)
        result = pipeline.compute(self.weights, job, layer_inputs)
        return pipeline.assemble(planned, result, model=self.name, per_layer=per_layer,
                                 combination=combination)


class EncoderExplainer:
    """A BERT-family encoder ready to explain (``load_explainer``): an embedding model (its
    pooling and normalisation read from a sentence-transformers directory; a plain checkpoint
    pools the [CLS] state and normalises, as vLLM's default for BertModel), or a sequence
    classifier / cross-encoder. ``explain`` returns an ``Explanation``."""

    def __init__(self, hf_model: Any, tokenizer: Any, *, pooling: Pooling,
                 name: str = "model") -> None:
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.name = name
        self.pooling = pooling
        self.weights: AdditiveWeights = architecture_for(hf_model.config).weights_from_hf(hf_model)
        spec = self.weights.spec
        self.head = ClassifierHead.of(self.weights) if spec.num_labels else None
        self.label_names = {int(i): str(n) for i, n in
                            (getattr(hf_model.config, "id2label", None) or {}).items()} \
            if self.head is not None else None

    @classmethod
    def from_directory(cls, path: Path, config: Any, tokenizer: Any, dtype: torch.dtype,
                       device: str | torch.device, name: str) -> "EncoderExplainer":
        from transformers import AutoModel, AutoModelForSequenceClassification

        from .sentence_models import read_sentence_config

        classifier = any(a.endswith("ForSequenceClassification")
                         for a in getattr(config, "architectures", None) or [])
        loader = AutoModelForSequenceClassification if classifier else AutoModel
        hf_model = loader.from_pretrained(path, dtype=dtype).to(device).eval()
        hf_model.requires_grad_(False)
        sentence = read_sentence_config(path)
        pooling = (Pooling(sentence.pooling, sentence.normalize) if sentence is not None
                   else Pooling("cls", normalize=True))
        return cls(hf_model, tokenizer, pooling=pooling, name=name)

    @property
    def max_length(self) -> int:
        spec = self.weights.spec
        return spec.max_positions - spec.position_offset

    @torch.no_grad()
    def embed(self, text: str | Sequence[int]) -> list[float]:
        """The embedding the model serves: pooled and, if its pooling says so, normalised."""
        planned = self._plan(text, {"dimension": 0}, "pa-lrp", None)
        hidden = encoder_forward(self.weights, torch.tensor(planned.texts[0]),
                                 None if planned.token_type_ids is None
                                 else torch.tensor(planned.token_type_ids[0]))
        return normalized(pool(hidden, self.pooling), self.pooling).tolist()

    def _plan(self, text: Any, target: Any, mode: str, text_pair: str | None
              ) -> pipeline.EncoderPlan:
        return pipeline.plan_encoder(
            self.tokenizer, text, target, mode=mode, text_pair=text_pair,
            vocab_size=self.weights.spec.vocab_size, max_length=self.max_length,
            has_token_types=self.weights.token_type_embeddings is not None,
            label_names=self.label_names)

    def explain(self, text: str | Sequence[int], *, target: Any, text_pair: str | None = None,
                mode: str = "pa-lrp", combination: str = DEFAULT_COMBINATION) -> Explanation:
        """Explain an encoder target of ``text`` (a string or token ids; ``text_pair``: a
        cross-encoder's second text).

        ``target``: ``{'dimension': k}`` (dimension k of the pooled embedding, before
        normalisation), ``{'similarity': other}`` (the cosine of this text's and ``other``'s
        embeddings; ``other``'s explanation is ``explanation.other``, and each side's relevance
        conserves half of the cosine) or ``{'label': i}`` (a classifier's logit; i an index or a
        name of the model's id2label). Token, positional (the position table's share,
        ``positional_parts`` 'position_embedding') and token-type relevance per token."""
        if combination not in COMBINATIONS:
            raise ExplainInputError(
                f"unknown combination {combination!r}; allowed: {', '.join(COMBINATIONS)}",
                "combination")
        planned = self._plan(text, target, mode, text_pair)
        result = pipeline.compute_encoder(self.weights, pipeline.encoder_job(planned),
                                          pooling=self.pooling, head=self.head)
        return pipeline.assemble_encoder(planned, result, model=self.name,
                                         combination=combination)
