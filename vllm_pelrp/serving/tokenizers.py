"""A copy of the served model's tokenizer for each thread that tokenizes.

The plugin tokenizes on its own threads (``ExplainService.offload``) while vLLM tokenizes with
its tokenizer object on its own. A fast (Rust) tokenizer keeps its truncation and padding
settings in the object, and a call that changes them while another thread encodes with the same
object raises ``RuntimeError: Already borrowed`` (vLLM serialises its own calls for that reason).
So the plugin never calls vLLM's object: it copies it once, before serving (``ThreadTokenizers``),
and each thread tokenizes with a copy of that copy of its own.
"""

from __future__ import annotations

import copy
import threading
from typing import Any


class ThreadTokenizers:
    """The template copy of a tokenizer and one copy of it per calling thread (``get``)."""

    def __init__(self, tokenizer: Any) -> None:
        # copied now, while nothing else tokenizes with it (the server is not serving yet)
        self.template = copy.deepcopy(tokenizer)
        self._local = threading.local()
        self._lock = threading.Lock()
        self.copies = 0  # threads that have their own copy

    def get(self) -> Any:
        """The calling thread's own tokenizer (copied from the template on first use)."""
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            with self._lock:  # copying reads the template: one copy at a time
                tokenizer = copy.deepcopy(self.template)
                self.copies += 1
            self._local.tokenizer = tokenizer
        return tokenizer
