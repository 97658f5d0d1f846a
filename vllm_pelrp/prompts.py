"""Prompt building, in one place: a text or chat prompt (with documents rendered in) → token ids.

The offline ``Explainer`` and the server's ``/v1/explain`` both call these; the tokenizer is a
Hugging Face one. Errors the caller causes are ``PromptError`` / ``GroundingError`` (400 on the
server), each naming the request field at fault.
"""

from __future__ import annotations

from typing import Any, Sequence

from .errors import GroundingError, PromptError
from .grounding import documents_into_messages, render_documents


def with_documents(text: str | None, messages: Sequence[dict] | None,
                   documents: Sequence[str] | None) -> tuple[str | None, list[dict] | None]:
    """The prompt with ``documents`` rendered in: into the last user message, or around text."""
    if documents is None:
        return text, (list(messages) if messages is not None else None)
    if messages is not None:
        return None, documents_into_messages(messages, documents)
    if text is None:
        raise GroundingError("documents are rendered into a text or messages prompt; with "
                             "input_ids, mark the sources with sources=[{'chars': [a, b]}] "
                             "instead", "documents")
    return render_documents(text, documents)[0], None


def message_contents(messages: Sequence[Any] | None) -> list[str | None] | None:
    """Each chat message's content when it is a string (what ``message`` sources point at)."""
    if messages is None:
        return None
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else getattr(
            message, "content", None)
        out.append(content if isinstance(content, str) else None)
    return out


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_ids(tokenizer: Any, messages: Sequence[dict], param: str = "messages") -> list[int]:
    """The chat template applied with the generation prompt, as token ids. A tokenizer without
    a template, or messages the template cannot render, are the caller's error."""
    if not has_chat_template(tokenizer):
        raise PromptError("this model's tokenizer has no chat template; give the prompt as text "
                          "(offline: chat=False)", param)
    try:
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
    except Exception as error:  # noqa: BLE001 - jinja errors
        raise PromptError(f"the model's chat template cannot render these messages "
                          f"({type(error).__name__}: {error})", param) from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def encode_prompt(tokenizer: Any, text: str | None = None, *,
                  messages: Sequence[dict] | None = None, chat: bool | None = None,
                  documents: Sequence[str] | None = None) -> list[int]:
    """Prompt token ids. ``messages`` always use the chat template; ``text`` uses it when
    ``chat`` is True, or when ``chat`` is None and the tokenizer has one. ``documents`` are
    rendered into the prompt (``grounding.render_documents``): into the last user message, or
    around ``text``."""
    if (text is None) == (messages is None):
        raise PromptError("give exactly one of text or messages")
    text, messages = with_documents(text, messages, documents)
    if messages is None and (chat is True or (chat is None and has_chat_template(tokenizer))):
        messages = [{"role": "user", "content": text}]
    if messages is not None:
        return chat_ids(tokenizer, messages)
    return [int(i) for i in tokenizer(text)["input_ids"]]


def encode_completion(tokenizer: Any, completion: str | Sequence[int]) -> list[int]:
    """Completion token ids (text is tokenized without special tokens); a given completion
    without tokens is an error."""
    if isinstance(completion, str):
        ids = [int(i) for i in tokenizer(completion, add_special_tokens=False)["input_ids"]]
    else:
        ids = [int(i) for i in completion]
    if not ids:
        raise PromptError("the completion tokenizes to no tokens; give some text",
                          "completion")
    return ids
