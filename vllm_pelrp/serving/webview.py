"""The web view: a page at ``/pelrp`` and the recent explanations it reopens by id.

Routes (attached by the endpoint plugin):

| route | returns |
|---|---|
| ``GET /pelrp``, ``GET /pelrp/`` | the page (``static/index.html``; ``?id=expl-…`` opens that explanation) |
| ``GET /pelrp/static/{name}`` | its script and style sheet (only the files in ``STATIC_FILES``) |
| ``GET /v1/explanations`` | summaries of the recent explanations, newest first |
| ``GET /v1/explanations/{id}`` | one recent explanation (the wire format), 404 for an unknown id |

Every full explanation the server returns (generated or ``/v1/explain``) gets an ``id``
(``expl-<32 hex>``) and is kept in a bounded in-memory store: the last ``PELRP_RECENT_EXPLANATIONS``
(default 256) explanations, and at most ``PELRP_RECENT_MB`` (default 64) MiB of their JSON; the
oldest go first. Compact explanations (``top_k``) are neither stored nor given an id. The page
is self-contained (no CDN, no web fonts): it talks only to this server.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response

from .env import env_number
from .metrics import add_explanation_sink

STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {"pelrp.js": "text/javascript; charset=utf-8",
                "pelrp.css": "text/css; charset=utf-8"}
ID_PATTERN = re.compile(r"^expl-[0-9a-f]{32}$")
_SPECIAL = re.compile(r"<\|[^|<>]*\|>")


def new_explanation_id() -> str:
    return f"expl-{uuid.uuid4().hex}"


def _preview(text: str, limit: int) -> str:
    text = " ".join(_SPECIAL.sub(" ", text).split())
    return text if len(text) <= limit else text[:limit] + "…"


def _last_message(prompt: str) -> str:
    """The prompt's last message without chat-template markers and role line (a preview): the
    last piece between special tokens like ``<|im_start|>`` that is more than a role name."""
    for piece in reversed(_SPECIAL.split(prompt)):
        first, _, rest = piece.strip().partition("\n")
        if rest.strip() and re.fullmatch(r"[a-z_]+", first.strip()):  # "user\nWhat is ..."
            return rest
        if piece.strip() and not re.fullmatch(r"[a-z_]+", piece.strip()):
            return piece
    return prompt


def summarize(explanation: dict[str, Any], created: float) -> dict[str, Any]:
    """The line the page lists for a stored explanation."""
    tokens = explanation.get("tokens") or []
    length = int(explanation.get("prompt_length") or 0)
    text = explanation.get("text") or ""
    cut = tokens[length]["start"] if length < len(tokens) else len(text)
    grounding = explanation.get("grounding") or None
    return {
        "id": explanation["id"],
        "created": created,
        "model": explanation.get("model"),
        "mode": explanation.get("mode"),
        "target": (explanation.get("target") or {}).get("description"),
        "num_tokens": len(tokens),
        "prompt_length": length,
        "prompt": _preview(_last_message(text[:cut]), 120),
        "completion": _preview(text[cut:], 120),
        "grounding_score": grounding["grounding_score"] if grounding else None,
        "low_grounding": grounding.get("low_grounding") if grounding else None,
        "num_sources": len(grounding["sources"]) if grounding else 0,
    }


class RecentExplanations:
    """The last ``capacity`` explanations (at most ``max_bytes`` of JSON), by id."""

    def __init__(self, capacity: int = 256, max_bytes: int = 64 << 20) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[bytes, dict[str, Any]]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> "RecentExplanations":
        return cls(env_number("PELRP_RECENT_EXPLANATIONS", 256, integer=True),
                   int(env_number("PELRP_RECENT_MB", 64) * 2**20))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def add(self, explanation: dict[str, Any]) -> str | None:
        """Give a full explanation (wire dict, changed in place) its ``id`` unless it has one,
        and keep it. Compact explanations (no ``tokens``) are left alone."""
        if "tokens" not in explanation:
            return None
        if not explanation.get("id"):
            explanation["id"] = new_explanation_id()
        key = explanation["id"]
        body = json.dumps(explanation, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode()
        if self.capacity <= 0 or len(body) > self.max_bytes:
            return key
        with self._lock:
            if key in self._items:
                self._bytes -= len(self._items.pop(key)[0])
            self._items[key] = (body, summarize(explanation, time.time()))
            self._bytes += len(body)
            while len(self._items) > self.capacity or self._bytes > self.max_bytes:
                _, (old, _) = self._items.popitem(last=False)
                self._bytes -= len(old)
        return key

    def get(self, key: str) -> bytes | None:
        with self._lock:
            item = self._items.get(key)
        return item[0] if item else None

    def summaries(self) -> list[dict[str, Any]]:
        with self._lock:
            return [summary for _, summary in reversed(self._items.values())]


def _not_found(message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "NotFoundError", "param": param,
                                   "code": 404}}, status_code=404)


def attach(app: FastAPI, store: RecentExplanations | None = None) -> None:
    """Add the page's routes to ``app`` and start keeping explanations in ``store`` (default:
    one sized by ``PELRP_RECENT_EXPLANATIONS`` / ``PELRP_RECENT_MB``, read here so that a bad
    value stops the server at start instead of leaving it without the plugin)."""
    if store is None:
        store = RecentExplanations.from_env()
    add_explanation_sink(store.add)
    router = APIRouter()
    page = STATIC_DIR / "index.html"

    @router.get("/pelrp", include_in_schema=False)
    @router.get("/pelrp/", include_in_schema=False)
    async def pelrp_page():
        """The web view (self-contained HTML; ``?id=expl-…`` opens a recent explanation)."""
        return FileResponse(page, media_type="text/html; charset=utf-8",
                            headers={"cache-control": "no-cache"})

    @router.get("/pelrp/static/{name}", include_in_schema=False)
    async def pelrp_static(name: str):
        if name not in STATIC_FILES:
            return _not_found(f"no static file {name!r}; the page has: "
                              f"{', '.join(sorted(STATIC_FILES))}", "name")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name],
                            headers={"cache-control": "no-cache"})

    @router.get("/v1/explanations")
    async def list_explanations():
        """Summaries of the recent explanations kept in memory, newest first."""
        return JSONResponse({"object": "list", "capacity": store.capacity,
                             "data": store.summaries()})

    @router.get("/v1/explanations/{explanation_id}")
    async def get_explanation(explanation_id: str):
        """One recent explanation by id (the Explanation wire format)."""
        body = store.get(explanation_id)
        if body is None:
            if not ID_PATTERN.match(explanation_id):
                return _not_found(
                    f"{explanation_id!r} is not an explanation id: ids look like "
                    "'expl-' followed by 32 hex digits (the `id` of a returned explanation); "
                    "GET /v1/explanations lists the recent ones", "explanation_id")
            return _not_found(
                f"no recent explanation with id {explanation_id!r}: the server keeps only the "
                f"last {store.capacity} explanations, in memory (not across restarts); "
                "GET /v1/explanations lists them", "explanation_id")
        return Response(body, media_type="application/json")

    app.include_router(router)
