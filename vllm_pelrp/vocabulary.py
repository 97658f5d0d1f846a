"""The names that the engine, the wire format and the renderers share: explanation modes and
the target kinds of encoders. A leaf module (standard library only), so that the engine imports
it without pydantic and the HTTP side without torch."""

from __future__ import annotations

from typing import Literal, get_args

# pa-lrp: PA-LRP (positions are inputs); attnlrp: the baseline (cos/sin constant); cp-lrp:
# attention probabilities constant
Mode = Literal["pa-lrp", "attnlrp", "cp-lrp"]
MODES: tuple[str, ...] = get_args(Mode)

# targets of an encoder (all its tokens are input): a pooled dimension, the cosine similarity to
# another text, a classifier's label
ENCODER_TARGETS: tuple[str, ...] = ("dimension", "similarity", "label")
