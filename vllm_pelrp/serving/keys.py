"""Recording keys: the worker records a request only on the API process's say-so.

An explained request reaches the worker tagged with ``vllm_xargs.pelrp_key``. A client can put
anything into ``vllm_xargs`` (on every vLLM route that takes it), so the tag alone proves
nothing. The API process therefore signs each key it hands out: the key is
``<request id>.<recordings>.<tag>``, with a random 128-bit request id, the number of
recordings (prompts × choices) it covers and an HMAC-SHA256 tag over both under a secret that
never leaves vLLM's processes: each API process makes its own and hands it to the workers
(``pelrp_setup`` over ``collective_rpc``), which keep one per API process; no worker method
returns it (vLLM's dev mode shows any client what ``/collective_rpc`` returns). The worker
records only keys whose tag it can verify, at most ``recordings`` of them each, and never a key
that was already claimed or released. The API process also strips every client-sent
``pelrp_*`` field from ``vllm_xargs`` on the routes it owns.

Plain strings and integers only: used on both sides of ``collective_rpc``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

KEY_FIELD = "pelrp_key"  # the vllm_xargs field the worker reads
RESERVED_PREFIX = "pelrp_"  # vllm_xargs fields a client may not send


def new_secret() -> str:
    return secrets.token_hex(32)


@dataclass(frozen=True)
class RecordingKey:
    key: str
    request_id: str
    recordings: int  # how many recordings (prompts x choices) the key covers


def _tag(secret: str, body: str) -> str:
    return hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()


def sign_key(secret: str, recordings: int) -> str:
    """A new key for one explained request that makes ``recordings`` recordings."""
    body = f"{secrets.token_hex(16)}.{int(recordings)}"
    return f"{body}.{_tag(secret, body)}"


def verify_key(secret: str | None, key: object) -> RecordingKey | None:
    """The signed key, or None when ``key`` was not signed with ``secret``."""
    if not secret or not isinstance(key, str) or len(key) > 200:
        return None
    body, _, tag = key.rpartition(".")
    request_id, _, count = body.partition(".")
    if len(request_id) != 32 or not count.isdigit() or len(tag) != 64:
        return None
    if not hmac.compare_digest(_tag(secret, body), tag):
        return None
    return RecordingKey(key, request_id, int(count))
