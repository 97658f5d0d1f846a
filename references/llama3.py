"""Llama 3's rotary embedding as its checkpoints configure it (Llama-3.1-8B's ``rope_scaling``
and ``rope_theta``): what the RoPE-LRP kernel checks (tests/_kernel_interp_check.py) and the GPU
benchmarks run the kernel and the engine with. Plain values, importable on a bare machine."""

ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
ROPE_THETA = 500000.0
