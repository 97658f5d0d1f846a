"""The plugin's HTTP side on a FastAPI app without vLLM's engine: a fake engine answers
``collective_rpc`` as the worker would, and a stand-in for vLLM's ``/v1/completions`` handler
returns a fixed completion. Shared by the unit tests of the HTTP layer."""

from __future__ import annotations

import asyncio
from functools import lru_cache

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from vllm_pelrp.serving.api import PelrpEndpointPlugin
from vllm_pelrp.serving.service import ExplainService


@lru_cache(maxsize=1)
def default_tokenizer():
    """The default model's tokenizer (the checkpoint is converted once into the user cache)."""
    from transformers import AutoTokenizer

    from vllm_pelrp.default_model import ensure_default_checkpoint

    return AutoTokenizer.from_pretrained(ensure_default_checkpoint())


class FakeEngine:
    def __init__(self, info):
        self.info = info
        self.calls = []

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(method)
        if method == "pelrp_setup":  # as the worker does: keeps the first proposed secret
            return [dict(self.info, key_secret=args[1] if len(args) > 1 else None)]
        if method == "pelrp_stats":
            return [{"bytes": 0, "recordings": 0}]
        return [0]


def make_app(info, tokenizer=None, api_keys: bool = False) -> tuple[TestClient, FakeEngine]:
    """The plugin's routes on an app whose engine is ``FakeEngine(info)``; ``api_keys``: as if
    the server ran with --api-key (explanations then belong to the bearer key)."""
    app = FastAPI()

    app.state.generated = []  # the requests the stand-in for vLLM's handler received

    @app.post("/v1/completions")
    async def original(request: dict, raw_request: Request):  # stands in for vLLM's handler
        app.state.generated.append(request)
        return JSONResponse({"choices": [{"index": 0, "text": "ok"}]})

    plugin = PelrpEndpointPlugin()
    plugin.attach_router(app)
    # as vLLM's attach_endpoint_plugins does: the plugin's route replaces the original one
    first = app.router.routes.index(next(r for r in app.router.routes
                                         if getattr(r, "endpoint", None) is original))
    del app.router.routes[first]
    engine = FakeEngine(info)
    service = ExplainService(engine, tokenizer=tokenizer or default_tokenizer(), model_name="m")
    asyncio.run(service.setup())
    app.state.pelrp_service = service
    app.state.pelrp_api_keys = api_keys
    return TestClient(app), engine


