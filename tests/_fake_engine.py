"""The plugin's HTTP side on a FastAPI app without vLLM's engine: a fake engine answers
``collective_rpc`` as the worker would, and a stand-in for vLLM's ``/v1/completions`` handler
returns a fixed completion. Shared by the unit tests of the HTTP layer.

With a ``FakeWorker`` (a small model's weights), the jobs run on the plugin's real worker
extension (``serving/worker.py``: ``pelrp_submit``/``pelrp_poll``, ``run_job``,
``pipeline.compute``), and every argument and reply crosses vLLM's msgpack encoding as it does
between the API process and the engine; the stand-in handler then "generates" the worker's fixed
completion and records its layer inputs as the recording hooks would."""

from __future__ import annotations

import asyncio
from functools import lru_cache
from typing import Any

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


def over_msgpack(value: Any) -> Any:
    """``value`` after vLLM's msgpack transport (what ``collective_rpc`` does to arguments and
    replies between processes): tuples become lists, nothing else survives but plain data."""
    from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

    return MsgpackDecoder().decode(MsgpackEncoder().encode(value))


def recorded(weights, key: str, prompt_ids: list[int], completion_ids: list[int],
             req_id: str = "r0"):
    """A request's recording as the op leaves it in a pool: the layer inputs of every position
    the model ran (all but the last completion token)."""
    import torch

    from vllm_pelrp.engine.backward import forward_layer_inputs
    from vllm_pelrp.serving.record_pool import RecordingPool
    from vllm_pelrp.serving.recorder import Recording

    ids = prompt_ids + completion_ids
    inputs, _ = forward_layer_inputs(weights, torch.tensor(ids[:-1]))
    stacked = torch.stack(inputs)  # (layers, positions, hidden)
    pool = RecordingPool(stacked.shape[0], stacked.shape[2], stacked.dtype, "cpu",
                         cap_bytes=len(ids) * stacked.shape[0] * stacked.shape[2]
                         * stacked.element_size() * 2, max_batch_tokens=len(ids),
                         page_tokens=4)
    pages = pool.allocate(len(ids))
    pool.buffer[:, torch.from_numpy(pool.slot_indices(pages, 0, stacked.shape[1]))] = stacked
    return Recording(req_id=req_id, key=key, prompt_token_ids=list(prompt_ids),
                     output_token_ids=list(completion_ids), capacity=len(ids), pages=pages,
                     pool=pool, first_position=0, end_position=len(ids) - 1)


class _Recordings:
    """The worker's recorder, as far as the jobs use it: recordings by key."""

    def __init__(self) -> None:
        self.by_key: dict[str, list] = {}

    def take(self, key: str) -> list:
        return self.by_key.pop(key, [])

    def release(self, key: str) -> int:
        return len(self.by_key.pop(key, []))


class FakeWorker:
    """The real worker extension on ``weights``, its recorder replaced by ``record``."""

    def __init__(self, weights, completion_ids: list[int]) -> None:
        from vllm_pelrp.serving.worker import PelrpWorkerExtension

        self.weights = weights
        self.completion_ids = list(completion_ids)  # what every "generation" returns
        self.extension = PelrpWorkerExtension()
        state = self.extension._pelrp()
        state.weights = weights
        state.recorder = _Recordings()  # no pool: jobs run inline, as under tensor parallelism
        self.submitted: list[list[dict]] = []  # the jobs as the worker received them

    def record(self, key: str, prompt_ids: list[int], completion_ids: list[int]) -> None:
        """Record a request's layer inputs as the hooks would: every position the model ran
        (all but the last completion token)."""
        recording = recorded(self.weights, key, prompt_ids, completion_ids,
                             req_id=f"r{len(self.extension._pelrp().recorder.by_key)}")
        self.extension._pelrp().recorder.by_key.setdefault(key, []).append(recording)

    def call(self, method: str, args: tuple) -> Any:
        args = over_msgpack(list(args))
        if method == "pelrp_submit":
            self.submitted.append(args[1])
        return over_msgpack(getattr(self.extension, method)(*args))


class FakeEngine:
    def __init__(self, info, worker: FakeWorker | None = None):
        self.info = info
        self.worker = worker
        self.calls = []

    async def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        self.calls.append(method)
        if method == "pelrp_setup":  # as the worker does: keeps the proposed secret, says so
            return [dict(self.info, key_accepted=bool(args) and bool(args[0]))]
        if method == "pelrp_stats":
            return [{"bytes": 0, "recordings": 0}]
        if self.worker is not None and method in ("pelrp_submit", "pelrp_poll", "pelrp_cancel",
                                                  "pelrp_release"):
            return [self.worker.call(method, args)]
        return [0]


def make_app(info, tokenizer=None, api_keys: bool = False,
             worker: FakeWorker | None = None) -> tuple[TestClient, FakeEngine]:
    """The plugin's routes on an app whose engine is ``FakeEngine(info, worker)``;
    ``api_keys``: as if the server ran with --api-key (explanations then belong to the bearer
    key)."""
    app = FastAPI()

    app.state.generated = []  # the requests the stand-in for vLLM's handler received

    @app.post("/v1/completions")
    async def original(request: dict, raw_request: Request):  # stands in for vLLM's handler
        app.state.generated.append(request)
        key = (getattr(request, "vllm_xargs", None) or {}).get("pelrp_key")
        if worker is None or key is None:
            return JSONResponse({"choices": [{"index": 0, "text": "ok"}]})
        # an explained request: "generate" the worker's completion and record it
        prompt = request.prompt
        prompt_ids = list(prompt) if isinstance(prompt, list) else [
            int(i) for i in service.tokenizer(prompt)["input_ids"]]
        worker.record(key, prompt_ids, worker.completion_ids)
        return JSONResponse({"choices": [{"index": 0, "text": "ok", "prompt_token_ids": prompt_ids,
                                          "token_ids": worker.completion_ids}]})

    plugin = PelrpEndpointPlugin()
    plugin.attach_router(app)
    # as vLLM's attach_endpoint_plugins does: the plugin's route replaces the original one
    first = app.router.routes.index(next(r for r in app.router.routes
                                         if getattr(r, "endpoint", None) is original))
    del app.router.routes[first]
    engine = FakeEngine(info, worker)
    service = ExplainService(engine, tokenizer=tokenizer or default_tokenizer(), model_name="m")
    asyncio.run(service.setup())
    app.state.pelrp_service = service
    app.state.pelrp_api_keys = api_keys
    return TestClient(app), engine
