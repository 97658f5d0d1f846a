"""The errors a caller (not the model or the server) is at fault for: a leaf module, imported by
target resolution, grounding, prompts and the serving side alike. The server answers 400 for
``ExplainInputError`` and its subclasses, naming ``param``."""

from __future__ import annotations


class ExplainInputError(ValueError):
    """The request is at fault, not the model or the server: the server answers 400 for this type
    (and its subclasses), whatever the message says. ``param`` names the request field at fault,
    as the ``explain`` options and the Python API call it ('target', 'sources', 'prompt', ...);
    the HTTP side adds the route's prefix (``explain.``)."""

    param = "explain"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param

    def __reduce__(self):  # keeps ``param`` across pickling (and copy)
        return type(self), (str(self), self.param)


class TargetError(ExplainInputError):
    """A target that cannot be explained on this prompt and completion."""

    param = "target"


class CostError(ExplainInputError):
    """An explanation over a cap on its size (target rows)."""

    param = "target"


class PromptError(ExplainInputError):
    """A prompt that cannot be explained (none, empty, token ids outside the vocabulary)."""

    param = "prompt"


class GroundingError(ExplainInputError):
    """Sources or documents that cannot be placed in the prompt (``grounding.py``)."""

    param = "sources"
