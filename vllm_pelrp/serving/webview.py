"""The web view: a page at ``/pelrp`` and the explanations it reopens by id, private to
their client.

Routes (attached by the endpoint plugin):

| route | returns |
|---|---|
| ``GET /pelrp``, ``GET /pelrp/`` | the page (``static/index.html``; ``?id=expl-…`` opens that explanation) |
| ``GET /pelrp/static/{name}`` | its script and style sheet (only the files in ``STATIC_FILES``) |
| ``GET /v1/explanations`` | summaries of the recent explanations whose ids the caller names (``?ids=``), newest first; every one for the operator |
| ``GET /v1/explanations/{id}`` | one of the caller's recent explanations (the wire format); 404 otherwise |

Privacy model. Every full explanation the server returns (generated or ``/v1/explain``) gets an
``id`` (``expl-`` + 32 hex digits from ``secrets``: 128 random bits) and is kept in memory, in a
store bounded in count (``VLLM_PELRP_RECENT_EXPLANATIONS``, default 256), in bytes of JSON
(``VLLM_PELRP_RECENT_MB``, default 64) and in time (``VLLM_PELRP_RECENT_TTL_S``, default 3600 s). The id is
a capability: it is returned only to the client that made the explanation, and nobody lists ids
they did not name. The usual deployment puts a gateway in front of the server with one API key
for many end users, so the key alone does not tell them apart. Who may read what:
- ``GET /v1/explanations?ids=…`` lists the explanations among the named ids that the caller may
  read (the web view keeps the ids it made in the browser); without ``ids`` it lists nothing;
- with ``--api-key`` (or ``VLLM_API_KEY``) an explanation is read, by id or in a listing, only
  with the API key that made it (the store keeps the key's SHA-256, never the key): another
  key's id answers 404, the same as an unknown id. Without an API key, whoever holds the id can
  read the explanation, like a share link;
- the operator listing of every explanation (``?scope=all``, filtered to one end user with
  ``?user=``: the OpenAI ``user`` field the request carried, which the store records) exists
  only when ``VLLM_PELRP_OPERATOR_KEY`` is set, for requests sending it in
  ``X-Pelrp-Operator-Key``; its summaries carry ``user``.

Compact explanations (``top_k``) are neither stored nor given an id. The page (static HTML,
script and style, no data) is served to anyone, like vLLM's ``/docs``; every route it reads
data from sits under ``/v1`` and is guarded by vLLM's ``--api-key`` like vLLM's own routes
(the page asks for the key when the server answers 401). The page is self-contained (no CDN, no
web fonts): it talks only to this server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from .. import settings
from ..html_page import STATIC_DIR
from ..vocabulary import ENCODER_TARGETS
from .http import error_response as _error
from .metrics import add_explanation_sink

STATIC_FILES = {"pelrp.js": "text/javascript; charset=utf-8",
                "pelrp.css": "text/css; charset=utf-8"}
ID_PATTERN = re.compile(r"^expl-[0-9a-f]{32}$")
_SPECIAL = re.compile(r"<\|[^|<>]*\|>")
_ENCODER_SPECIAL = re.compile(r"\[(?:CLS|SEP|PAD)\]|</?s>")  # BERT's and RoBERTa's markers
_IMAGE_TEXT_SPECIAL = re.compile(r"<\|(?:startoftext|endoftext)\|>")  # CLIP's text markers


def new_explanation_id() -> str:
    return f"expl-{secrets.token_hex(16)}"


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


def _image_summary(explanation: dict[str, Any], created: float) -> dict[str, Any]:
    """``summarize`` of an ``ImageExplanation``: the image's size, its patch count, and a
    similarity's text (as ``other``)."""
    grid = explanation["patch_relevance"]
    height, width = explanation.get("image_size") or (0, 0)
    target = explanation.get("target") or {}
    side = explanation.get("text") or None
    other = None
    if side:
        words = "".join(side.get("tokens") or []).replace("</w>", " ").replace("▁", " ")
        other = _preview(_IMAGE_TEXT_SPECIAL.sub(" ", words), 120)
    return {"id": explanation["id"], "created": created, "kind": "image",
            "model": explanation.get("model"), "mode": explanation.get("mode"),
            "target": target.get("description"), "target_kind": target.get("kind"),
            "target_value": target.get("value"), "num_tokens": grid["rows"] * grid["columns"],
            "prompt_length": 0, "prompt": f"image {height}×{width}", "completion": "",
            "other": other, "grounding_score": None, "low_grounding": None, "num_sources": 0}


def summarize(explanation: dict[str, Any], created: float) -> dict[str, Any]:
    """The line the page lists for a stored explanation (``kind`` "text" or "image"). An
    encoder's (wire format 2.1) has its target's kind and value, and for a similarity the other
    text (``other``); an image's, its size and patch count (``_image_summary``)."""
    if "patch_relevance" in explanation:  # an ImageExplanation: patches, not tokens
        return _image_summary(explanation, created)
    tokens = explanation.get("tokens") or []
    length = int(explanation.get("prompt_length") or 0)
    text = explanation.get("text") or ""
    cut = tokens[length]["start"] if length < len(tokens) else len(text)
    grounding = explanation.get("grounding") or None
    target = explanation.get("target") or {}
    summary = {
        "id": explanation["id"],
        "created": created,
        "kind": "text",
        "model": explanation.get("model"),
        "mode": explanation.get("mode"),
        "target": target.get("description"),
        "target_kind": target.get("kind"),
        "target_value": target.get("value"),
        "num_tokens": len(tokens),
        "prompt_length": length,
        "prompt": _preview(_last_message(text[:cut]), 120),
        "completion": _preview(text[cut:], 120),
        "other": None,
        "grounding_score": grounding["grounding_score"] if grounding else None,
        "low_grounding": grounding.get("low_grounding") if grounding else None,
        "num_sources": len(grounding["sources"]) if grounding else 0,
    }
    if target.get("kind") in ENCODER_TARGETS:  # all input: the text without [CLS] / [SEP]
        other = explanation.get("other") or None
        summary["prompt"] = _preview(_ENCODER_SPECIAL.sub(" ", text), 120)
        if other:
            summary["other"] = _preview(_ENCODER_SPECIAL.sub(" ", other.get("text") or ""), 120)
    return summary


@dataclass
class _Stored:
    body: bytes
    summary: dict[str, Any]
    owner: str | None  # "key:<sha256 of the API key>"; None: readable by whoever holds the id
    user: str | None  # the end user the request named (OpenAI's `user` field), for the operator
    expires: float  # time.monotonic()


MAX_LISTED_IDS = 100  # as many as the page remembers
MAX_USER_CHARS = 256  # of the `user` field, as stored and compared


class RecentExplanations:
    """The last ``capacity`` explanations (at most ``max_bytes`` of JSON, for at most
    ``ttl_seconds`` each), by id, each with its owner."""

    def __init__(self, capacity: int = 256, max_bytes: int = 64 << 20,
                 ttl_seconds: float = 3600.0) -> None:
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self._items: OrderedDict[str, _Stored] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> "RecentExplanations":
        return cls(settings.get("VLLM_PELRP_RECENT_EXPLANATIONS"),
                   int(settings.get("VLLM_PELRP_RECENT_MB") * 2**20),
                   settings.get("VLLM_PELRP_RECENT_TTL_S"))

    def __len__(self) -> int:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def add(self, explanation: dict[str, Any], owner: str | None = None,
            user: str | None = None) -> str | None:
        """Give a full explanation (wire dict, changed in place) its ``id`` unless it has one,
        and keep it for ``owner``, noting the end ``user`` the request named (the operator
        listing shows it). Compact explanations (no ``tokens``) are left alone; an image
        explanation (``patch_relevance``) is kept like a full one."""
        if "tokens" not in explanation and "patch_relevance" not in explanation:
            return None
        if not explanation.get("id"):
            explanation["id"] = new_explanation_id()
        key = explanation["id"]
        body = json.dumps(explanation, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode()
        if self.capacity <= 0 or len(body) > self.max_bytes or self.ttl_seconds <= 0:
            return key
        now = time.monotonic()
        stored = _Stored(body, summarize(explanation, time.time()), owner, _user(user),
                         now + self.ttl_seconds)
        with self._lock:
            if key in self._items:
                self._bytes -= len(self._items.pop(key).body)
            self._items[key] = stored
            self._bytes += len(body)
            while len(self._items) > self.capacity or self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old.body)
            self._expire(now)
        return key

    def _expire(self, now: float) -> None:
        while self._items:
            key, oldest = next(iter(self._items.items()))
            if oldest.expires > now:
                return
            del self._items[key]
            self._bytes -= len(oldest.body)

    def get(self, key: str, owner: str | None = None) -> bytes | None:
        """The explanation, when ``owner`` may read it (its owner, or anyone for an explanation
        kept without owner); None otherwise, as for an unknown id."""
        with self._lock:
            self._expire(time.monotonic())
            item = self._items.get(key)
        return item.body if item is not None and _readable(item, owner) else None

    def summaries(self, owner: str | None = None, ids: list[str] | None = None,
                  everyone: bool = False, user: str | None = None) -> list[dict[str, Any]]:
        """Newest first: those ``owner`` may read among ``ids`` (the ids are capabilities: none
        given, none listed); or, for the operator (``everyone``), every explanation, or those
        of the end ``user`` when given, each with its ``user``."""
        with self._lock:
            self._expire(time.monotonic())
            items = list(self._items.values())
        if everyone:
            wanted_user = _user(user)
            return [dict(item.summary, user=item.user) for item in reversed(items)
                    if user is None or item.user == wanted_user]
        wanted = set(ids or ())
        return [item.summary for item in reversed(items)
                if item.summary["id"] in wanted and _readable(item, owner)]


def _user(user: object) -> str | None:
    """The ``user`` field as stored: text, at most ``MAX_USER_CHARS`` characters."""
    return user[:MAX_USER_CHARS] if isinstance(user, str) and user else None


def _readable(item: _Stored, owner: str | None) -> bool:
    return item.owner is None or (owner is not None and hmac.compare_digest(item.owner, owner))


def owner_of(request: Request) -> str | None:
    """Whom an explanation made by ``request`` belongs to: its API key (as a SHA-256) on a
    server with ``--api-key``; None without one (the id is the capability)."""
    if not getattr(request.app.state, "pelrp_api_keys", False):
        return None
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None  # vLLM's middleware refuses such requests under /v1 before they get here
    return "key:" + hashlib.sha256(token.encode()).hexdigest()


OPERATOR_ENV = "VLLM_PELRP_OPERATOR_KEY"
OPERATOR_HEADER = "x-pelrp-operator-key"


def attach(app: FastAPI, store: RecentExplanations | None = None,
           responses: dict[int | str, dict[str, Any]] | None = None,
           route_class: type | None = None) -> RecentExplanations:
    """Add the page's routes to ``app`` and start keeping explanations in ``store`` (default:
    one sized by ``VLLM_PELRP_RECENT_EXPLANATIONS`` / ``_RECENT_MB`` / ``_RECENT_TTL_S``,
    read here so that a bad value stops the server at start instead of leaving it without the
    plugin). ``responses``: the error responses to document on the data routes;
    ``route_class``: the routes' class (the endpoint plugin's OpenAI-shaped errors)."""
    if store is None:
        store = RecentExplanations.from_env()
    operator_key = settings.get(OPERATOR_ENV)
    add_explanation_sink(store.add)
    router = APIRouter(**({"route_class": route_class} if route_class else {}))
    page = STATIC_DIR / "index.html"
    documented = responses or {}

    @router.get("/pelrp", include_in_schema=False)
    @router.get("/pelrp/", include_in_schema=False)
    async def pelrp_page():
        """The web view (self-contained HTML; ``?id=expl-…`` opens a recent explanation)."""
        return FileResponse(page, media_type="text/html; charset=utf-8",
                            headers={"cache-control": "no-cache"})

    @router.get("/pelrp/static/{name}", include_in_schema=False)
    async def pelrp_static(name: str):
        if name not in STATIC_FILES:
            return _error(f"no static file {name!r}; the page has: "
                          f"{', '.join(sorted(STATIC_FILES))}", 404, "name")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name],
                            headers={"cache-control": "no-cache"})

    @router.get("/v1/explanations", responses={
        k: v for k, v in documented.items() if k in (400, 401, 403)})
    async def list_explanations(
            request: Request,
            ids: str | None = Query(None, max_length=MAX_LISTED_IDS * 38,
                                    pattern=r"^[0-9a-z,-]*$", description=(
                "Comma-separated explanation ids: list only these (each one that the caller "
                "may read). Required, except for the operator listing: ids are capabilities, "
                "and nobody lists ids they did not name.")),
            scope: Literal["own", "all"] = Query("own", description=(
                "'all': every client's explanations, for the operator (needs "
                f"VLLM_PELRP_OPERATOR_KEY on the server and its value in {OPERATOR_HEADER}).")),
            user: str | None = Query(None, max_length=MAX_USER_CHARS, description=(
                "The operator listing of one end user's explanations: those whose request "
                "carried this OpenAI `user` field (implies scope=all)."))):
        """Summaries of recent explanations kept in memory, newest first: those the caller
        names in ``ids``, or every one for the operator."""
        if scope == "all" or user is not None:
            what = "the operator listing (scope=all" + (", user=…)" if user is not None else ")")
            given = request.headers.get(OPERATOR_HEADER) or ""
            if not operator_key:
                return _error(f"{what} is off on this server; it is on only when the server is "
                              f"started with {OPERATOR_ENV} set", 403,
                              "scope" if user is None else "user")
            if not hmac.compare_digest(given.encode(), operator_key.encode()):
                return _error(f"{what} needs the operator key ({OPERATOR_ENV}) in the "
                              f"{OPERATOR_HEADER} header", 403, "scope" if user is None else "user")
            return JSONResponse({"object": "list", "capacity": store.capacity,
                                 "data": store.summaries(everyone=True, user=user)})
        if ids is None:
            return _error(
                "explanation ids are capabilities: the server lists only the ids you name "
                "(?ids=expl-…,expl-…; each id is returned with its explanation), never every "
                "explanation made with an API key; the operator listing (scope=all) needs "
                f"{OPERATOR_ENV}", 400, "ids")
        wanted = [i for i in (part.strip() for part in ids.split(",")) if i]
        bad = [i for i in wanted if not ID_PATTERN.match(i)]
        if bad or len(wanted) > MAX_LISTED_IDS:
            return _error(f"ids: {bad[0]!r} is not an explanation id; ids look like 'expl-' "
                          "followed by 32 hex digits" if bad else
                          f"ids: {len(wanted)} ids given; at most {MAX_LISTED_IDS}", 400, "ids")
        return JSONResponse({"object": "list", "capacity": store.capacity,
                             "data": store.summaries(owner_of(request), wanted)})

    @router.get("/v1/explanations/{explanation_id}", responses={
        k: v for k, v in documented.items() if k in (401, 404)})
    async def get_explanation(explanation_id: str, request: Request):
        """One of the caller's recent explanations by id (the Explanation wire format)."""
        body = store.get(explanation_id, owner_of(request))
        if body is None:
            if not ID_PATTERN.match(explanation_id):
                return _error(
                    f"{explanation_id[:80]!r} is not an explanation id: ids look like 'expl-' "
                    "followed by 32 hex digits (the `id` of a returned explanation)", 404,
                    "explanation_id")
            return _error(
                f"no explanation with id {explanation_id!r} that you can read: the server keeps "
                f"the last {store.capacity} explanations for {store.ttl_seconds:g} s, in memory "
                "(not across restarts), each readable only with the API key that made it (on a "
                "server with --api-key)", 404, "explanation_id")
        return Response(body, media_type="application/json")

    app.include_router(router)
    return store
