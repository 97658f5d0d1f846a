"""RoBERTa / XLM-RoBERTa (``RobertaModel``, ``XLMRobertaModel``): BERT's layers and names; the
only difference is the position table's offset: position t reads row padding_idx + 1 + t.

Hugging Face gives pad tokens inside the input the row padding_idx (and counts only non-pad
tokens); vLLM reads padding_idx + 1 + t for every token. The engine follows vLLM by default;
pass ``positions`` to ``additive_relevance`` for HF's numbering of an input with pads.
"""

from __future__ import annotations

from typing import Any

from ..engine.additive import AdditiveSpec
from .additive_base import AdditiveArchitecture
from .bert import BERT_HF, BERT_VLLM, BLOCKS, encoder_spec


def spec(config: Any, tensor_parallel_size: int = 1) -> AdditiveSpec:
    return encoder_spec(config, tensor_parallel_size,
                        position_offset=int(config.pad_token_id) + 1)


ARCHITECTURE = AdditiveArchitecture(
    names=("RobertaModel", "XLMRobertaModel"), spec=spec, hf=BERT_HF, vllm=BERT_VLLM,
    model_types={"roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"},
    blocks=BLOCKS)
