"""With the plugin loaded, plain requests run as vLLM would run them (issue 22): vLLM's resolved
compilation and CUDA-graph settings, and every engine argument but the worker extension, are
exactly those vLLM picks without the plugin.

The configs are resolved by vLLM's own ``EngineArgs.create_engine_config`` on the default model,
first without the plugin, then after ``register()`` with ``VLLM_PLUGINS=pelrp``, in a child
process (the plugin's wrappers stay for the life of a process).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

SCRIPT = r"""
import copy, json, os, sys
from vllm.engine.arg_utils import EngineArgs
from vllm_pelrp.default_model import default_checkpoint_dir


def resolved(**overrides):
    args = EngineArgs(model=str(default_checkpoint_dir()), kv_cache_memory_bytes=2**28,
                      max_model_len=2048, **overrides)
    config = args.create_engine_config()
    given = {k: repr(v) for k, v in vars(args).items()}
    return {"compilation": repr(config.compilation_config),
            "enforce_eager": config.model_config.enforce_eager,
            "extension": config.parallel_config.worker_extension_cls,
            "args": given}


cases = {"default": {}, "eager": {"enforce_eager": True}}
without = {name: resolved(**kw) for name, kw in cases.items()}
os.environ["VLLM_PLUGINS"] = "pelrp"
from vllm_pelrp.serving import plugin
plugin.register()
with_plugin = {name: resolved(**kw) for name, kw in cases.items()}
print("RESULT" + json.dumps({"without": without, "with": with_plugin}))
"""


def test_the_plugin_leaves_vllms_compilation_and_cuda_graph_settings_alone():
    from vllm_pelrp import settings

    env = settings.environment(VLLM_PLUGINS=[])
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT"):])
    for case in ("default", "eager"):
        without, with_plugin = result["without"][case], result["with"][case]
        assert with_plugin["compilation"] == without["compilation"], case
        assert with_plugin["enforce_eager"] == without["enforce_eager"], case
        assert with_plugin["extension"] == "vllm_pelrp.serving.worker.PelrpWorkerExtension"
        changed = {k for k in without["args"] if without["args"][k] != with_plugin["args"][k]}
        assert changed == {"worker_extension_cls"}, (case, changed)
    assert result["without"]["eager"]["enforce_eager"]
